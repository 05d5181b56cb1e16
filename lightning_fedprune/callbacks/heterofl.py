"""HeteroFL's client side: the scaler and static BatchNorm (Diao, Ding, Tarokh, ICLR 2021).

* :class:`HeteroFLScaler` (client callback ``"heterofl_scaler"``): while a client trains a sub-model
  that keeps a fraction ``q = 1 - rate`` of the channels (``task.config["pruning_ratio"]``), every
  hidden convolution's and linear layer's output is divided by ``q`` (forward hooks, training mode
  only; the classifier and other unprunable layers are left alone), so activations keep the full
  model's scale. Removed when the client's local work ends.
* :class:`StaticBatchNorm` (client callback ``"heterofl_static_bn"``): BatchNorm layers normalize
  with the batch's statistics and do not update their running statistics during local training
  (momentum 0), so sub-models of different widths never average their statistics into the global
  ones. Restored when the client's local work ends.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import PRUNING_RATIO
from lightning_fedprune.core.plans import matches_unprunable

__all__ = ["HeteroFLScaler", "StaticBatchNorm"]

_SCALED = (nn.modules.conv._ConvNd, nn.Linear)


@register_client_callback("heterofl_scaler")
class HeteroFLScaler(FederatedCallback):
    """Divides hidden layer outputs by the kept fraction while training (see the module docstring)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def transform_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        rate = float(ctx.task.config.get(PRUNING_RATIO, 0.0))
        if rate <= 0.0:
            return
        scale = 1.0 / (1.0 - rate)
        unprunable = tuple(getattr(pl_module, "federated_unprunable", ()))

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            return output * scale if module.training else output

        for name, module in pl_module.named_modules():
            if isinstance(module, _SCALED) and not matches_unprunable(name, unprunable):
                self._handles.append(module.register_forward_hook(hook))

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@register_client_callback("heterofl_static_bn")
class StaticBatchNorm(FederatedCallback):
    """BatchNorm with batch statistics and frozen running statistics while training."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []

    def transform_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                self._saved.append((module, module.momentum))
                module.momentum = 0.0

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        for module, momentum in self._saved:
            module.momentum = momentum
        self._saved = []
