"""Client-side callbacks: Lightning callbacks that also see client boundaries.

The client runtime trains one or many clients inside one ``Trainer.fit``. A
:class:`FederatedCallback` gets extra hooks around each client's local work:

* :meth:`FederatedCallback.transform_module` after the client's weights are loaded, before its
  optimizer is built: change the module here (e.g. insert gate modules: their parameters are then
  trained); undo it in ``on_client_end``;
* :meth:`FederatedCallback.on_client_start` once its optimizer is fresh, before its first batch;
* :meth:`FederatedCallback.extra_loss` at every training step: a scalar tensor added to the
  loss ``training_step`` returns (e.g. a lasso on gate outputs), differentiated by autograd;
* :meth:`FederatedCallback.on_client_end` after its last batch, before its weights are read.

Both receive a :class:`ClientContext`: the task, the client's persistent state (kept by the
transport across rounds, checkpointed with the run, never sent unless an algorithm says so), and
``result_extras`` where a callback puts tensors to send back. Ordinary Lightning hooks
(``on_before_optimizer_step`` ...) carry per-step work. Keep callbacks thin: math lives in
``lightning_fedprune.core``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.core.messages import ClientTask

__all__ = ["ClientContext", "FederatedCallback"]


@dataclass
class ClientContext:
    """Everything a callback may need about the client being trained.

    Attributes:
        task: the task being run.
        state: the client's persistent state (mutable; saved by the transport after the client).
        result_extras: tensors to add to the result's ``extras``.
        result_config: JSON values to add to the result's ``config``.
        num_steps: optimizer steps done so far for this client.
        result_weights: when a callback sets it (in ``on_client_end``), these tensors are sent as
            the result's ``weights`` instead of the module's communicated state (e.g. an upload
            compressed into ``result_extras`` sends ``{}`` here).
        flops_saved_per_example: forward FLOPs per example that sparse compute skips (e.g. pruned
            FC weights); the runtime charges the simulated clock the dense count minus this.
        extra_examples: examples a callback ran through extra forward + backward passes of the
            module (e.g. Per-FedAvg's Hessian-vector products); the runtime charges the simulated
            clock for them as for training examples.
        plan: the task's kept channels in full-model coordinates (a
            :class:`~lightning_fedprune.core.plans.Plan`) when the task carries them
            (``config["kept"]``), so a client can line its own full-size tensors up with the
            round's sub-model; ``None`` otherwise.
        local_test_loader: the client's local test (validation) data when the runtime evaluates
            clients locally, else ``None``.
        metrics_extra: floats to add to the result's ``metrics.extra``; a callback that sets
            ``local_test_acc`` / ``local_test_loss`` here (e.g. evaluating the client's model with
            its own client-side modules in place) replaces the runtime's own local evaluation.
    """

    task: ClientTask
    state: dict[str, Any]
    result_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    result_config: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 0
    result_weights: dict[str, torch.Tensor] | None = None
    flops_saved_per_example: float = 0.0
    extra_examples: int = 0
    plan: Any = None
    local_test_loader: Any = None
    metrics_extra: dict[str, float] = field(default_factory=dict)


class FederatedCallback(pl.Callback):
    """A Lightning callback with client-boundary hooks. Override only what you need."""

    def transform_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        """Called before the client's optimizer is built: change the module here (parameters of
        modules added now are trained); undo the change in :meth:`on_client_end`."""

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        """Called when a client's local work begins."""

    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> torch.Tensor | None:
        """A scalar term added to the loss of every training step (``None``: nothing).

        Called right after ``training_step``; the term joins the loss before ``backward``, so its
        gradient flows through autograd. Needs automatic optimization.
        """
        return None

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        """Called when a client's local work is done (its trained weights are still in the module)."""
