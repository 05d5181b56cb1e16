"""FedProx's client side: the proximal term ``mu/2 * ||w - w_global||^2``, as a gradient term."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import PROX_MU
from lightning_fedprune.errors import ConfigError

__all__ = ["FedProxCallback"]


@register_client_callback("fedprox")
class FedProxCallback(FederatedCallback):
    """Adds ``mu * (w - w_global)`` to each parameter's gradient before every optimizer step.

    This is exactly the gradient of FedProx's proximal term, so the user's ``training_step``
    stays unchanged. ``mu`` comes from the task (``config["prox_mu"]``) unless given here.

    Args:
        mu: fixed proximal coefficient; ``None`` reads it from each task.
    """

    def __init__(self, mu: float | None = None) -> None:
        if mu is not None and not mu >= 0:
            raise ConfigError(f"`mu` must be >= 0, got {mu}")
        self.mu = mu
        self._anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._mu_now = 0.0

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        self._mu_now = float(self.mu if self.mu is not None else ctx.task.config.get(PROX_MU, 0.0))
        # the global weights are what the module holds now, before any local step
        self._anchor = [(p, p.detach().clone()) for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._mu_now == 0.0:
            return
        with torch.no_grad():
            for p, w0 in self._anchor:
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=self._mu_now)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        self._anchor = []
