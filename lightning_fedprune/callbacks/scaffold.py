"""SCAFFOLD's client side: gradient correction by control variates, option II update."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.control_variates import SCAFFOLD_CONTROL, SCAFFOLD_DELTA, scaffold_client_update

__all__ = ["ScaffoldCallback"]

_STATE_KEY = "scaffold.c_i"


@register_client_callback("scaffold")
class ScaffoldCallback(FederatedCallback):
    """Corrects every local gradient by ``c - c_i`` and updates ``c_i`` with option II.

    * ``c`` arrives in the task's extras (``scaffold.c/<name>``);
    * ``c_i`` lives in the client's persistent state (zeros the first time), so it survives
      across rounds and run checkpoints, and is never sent;
    * after ``K`` local steps with learning rate ``eta``::

          c_i+ = c_i - c + (x - y) / (K * eta)

      and ``c_i+ - c_i`` goes back in the result's extras (``scaffold.dc/<name>``).

    ``eta`` is the learning rate of the optimizer's first param group at the optimizer steps: with
    a local schedule (e.g. the runtime's ``lr_schedule="cosine"``) the mean over the ``K`` steps,
    so that ``K * eta`` is the sum of the step sizes (option II for varying rates). With momentum
    or adaptive optimizers option II is an approximation (as in the paper's experiments).
    """

    def __init__(self) -> None:
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._correction: dict[str, torch.Tensor] = {}
        self._x: dict[str, torch.Tensor] = {}
        self._c: dict[str, torch.Tensor] = {}
        self._ci: dict[str, torch.Tensor] = {}
        self._lrs: list[float] = []

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        extras = ctx.task.extras
        self._params = [(n, p) for n, p in pl_module.named_parameters() if (SCAFFOLD_CONTROL + n) in extras]
        # on the parameters' device (a client training on a GPU); a no-op on the CPU
        self._c = {n: extras[SCAFFOLD_CONTROL + n].to(p.device) for n, p in self._params}
        stored = ctx.state.get(_STATE_KEY, {})
        self._ci = {n: stored[n].to(p.device) if n in stored else torch.zeros_like(p) for n, p in self._params}
        self._correction = {n: self._c[n] - self._ci[n] for n, _ in self._params}
        self._x = {n: p.detach().clone() for n, p in self._params}
        self._lrs = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is not None:
            self._lrs.append(float(optimizer.param_groups[0]["lr"]))
        with torch.no_grad():
            for n, p in self._params:
                if p.grad is not None:
                    p.grad.add_(self._correction[n])

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        k = ctx.num_steps
        eta = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0
        if self._lrs and any(lr != self._lrs[0] for lr in self._lrs):
            eta = sum(self._lrs) / len(self._lrs)  # K * eta = the sum of the step sizes
        new_ci: dict[str, torch.Tensor] = {}
        for n, p in self._params:
            new_ci[n] = scaffold_client_update(self._ci[n], self._c[n], self._x[n], p.detach(), num_steps=k, lr=eta)
            ctx.result_extras[SCAFFOLD_DELTA + n] = new_ci[n] - self._ci[n]
        ctx.state[_STATE_KEY] = new_ci
        self._params, self._correction, self._x, self._c, self._ci, self._lrs = [], {}, {}, {}, {}, []
