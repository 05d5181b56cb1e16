"""FlexCom's client side: upload a top-k sparsified update instead of the full weights."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.compression import TOPK_PREFIX, compress_upload
from lightning_fedprune.core.contract import UPLOAD, UPLOAD_ERROR_FEEDBACK, UPLOAD_KEEP_RATIO

__all__ = ["TopKUploadCallback", "KEEP_RATIO_KEY", "ERROR_FEEDBACK_KEY", "RESIDUAL_STATE_KEY"]

#: task config key holding the client's keep ratio in (0, 1]; absent -> the callback does nothing
KEEP_RATIO_KEY = UPLOAD_KEEP_RATIO
#: task config key switching error feedback on (default off)
ERROR_FEEDBACK_KEY = UPLOAD_ERROR_FEEDBACK
#: client-state key of the error-feedback memory
RESIDUAL_STATE_KEY = "topk.residual"


@register_client_callback("topk_upload")
class TopKUploadCallback(FederatedCallback):
    """Sends ``top-k(trained - received)`` per tensor instead of the trained weights.

    * ``on_client_start``: remembers the received weights (``pl_module.federated_state()``,
      cloned), only when the task asks for compression.
    * ``on_client_end``: with ``task.config["upload_keep_ratio"]`` set, compresses the update with
      :func:`~lightning_fedprune.core.compression.compress_upload`, puts the payload in the
      result's extras under ``topk/`` and sends no weights (``ctx.result_weights = {}``,
      ``ctx.result_config[UPLOAD] = "topk"``). Non-float tensors go densely (``topk/<key>/raw``).
      The server rebuilds the trained weights with
      :func:`~lightning_fedprune.core.compression.decode_topk_result` from what it sent.
    * Error feedback (``task.config["upload_error_feedback"] = True``): what was not sent stays in
      the client's persistent state under ``"topk.residual"`` and is added to the next round's
      update before compressing, so every coordinate is eventually sent (EF-SGD style). The
      memory is kept per client across rounds (checkpointed with the client store) and never
      sent; a task without error feedback leaves it untouched. Its entries whose shape no longer
      matches (e.g. the client now trains another sub-model) count as zero.

    The callback holds no state between clients, so it needs no ``state_dict``.
    """

    def __init__(self) -> None:
        self._received: dict[str, torch.Tensor] | None = None

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        if ctx.task.config.get(KEEP_RATIO_KEY) is None:
            self._received = None
            return
        self._received = {k: v.detach().clone() for k, v in pl_module.federated_state().items()}

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        keep_ratio = ctx.task.config.get(KEEP_RATIO_KEY)
        received, self._received = self._received, None
        if keep_ratio is None or received is None:
            return
        feedback = bool(ctx.task.config.get(ERROR_FEEDBACK_KEY, False))
        residual = ctx.state.get(RESIDUAL_STATE_KEY, {}) if feedback else None
        payload, new_residual = compress_upload(pl_module.federated_state(), received, keep_ratio, residual=residual)
        for name, tensor in payload.items():
            ctx.result_extras[TOPK_PREFIX + name] = tensor
        ctx.result_weights = {}
        ctx.result_config[UPLOAD] = "topk"
        if feedback:
            ctx.state[RESIDUAL_STATE_KEY] = new_residual
