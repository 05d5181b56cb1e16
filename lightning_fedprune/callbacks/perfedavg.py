"""Per-FedAvg's client side (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020): MAML steps inside Lightning.

:class:`PerFedAvgCallback` (client callback ``"perfedavg"``) turns every optimizer step of the
client's ordinary ``Trainer`` into one Per-FedAvg step (math in :mod:`lightning_fedprune.core.meta`):

* each training batch is cut into ``D``, ``D'`` (and ``D''`` for the Hessian-free variant);
* before the module's ``training_step`` runs, the parameters take the inner step
  ``w̃ = w − α ∇f(w; D)``; ``training_step`` then sees only ``D'``, so Lightning's backward gives
  ``∇f(w̃; D')`` (with the user's loss, logging and any extra loss terms);
* in ``on_before_optimizer_step`` the parameters go back to ``w``; the Hessian-free variant
  replaces the gradient by ``g − α·d`` with the finite-difference Hessian-vector product on
  ``D''`` (its two gradients are charged to the simulated clock: ``ClientContext.extra_examples``);
  the user's optimizer (learning rate ``β``) then steps from ``w``.

The loss of the inner step and of the Hessian-vector product is the module's
``federated_evaluate_batch`` loss sum divided by the number of targets (cross-entropy by default).

**Personalized evaluation.** With a local test split, the client's personalized model is its model
after ONE step ``w − α ∇f(w; B)`` on its first training batch ``B`` of the round, where ``w`` is the
received global model (``adapt_from="received"``, Per-FedAvg's evaluation) or the locally trained
one (``"trained"``). Its local test accuracy and loss replace the runtime's own local evaluation
(``local_test_acc`` / ``local_test_loss``); the module is restored afterwards (buffers included).

The settings come with each task (``task.config["perfedavg"]``, set by
:class:`~lightning_fedprune.strategies.PerFedAvg`). Needs automatic optimization.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import PERFEDAVG
from lightning_fedprune.core.meta import batch_size_of, gradients, hessian_vector_product, meta_gradient, part_sizes, split_batch
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.evaluation import evaluate

__all__ = ["PerFedAvgCallback", "mean_loss"]


def mean_loss(module: Any, batch: Any) -> torch.Tensor:
    """The module's loss on ``batch`` (its ``federated_evaluate_batch`` loss sum per target)."""
    loss_sum, _, targets = module.federated_evaluate_batch(batch)
    n = targets.numel() if targets is not None else batch_size_of(batch)
    return loss_sum / max(1, n)


@register_client_callback("perfedavg")
class PerFedAvgCallback(FederatedCallback):
    """Per-FedAvg's local MAML steps and one-step personalized evaluation (see the module docstring)."""

    def __init__(self) -> None:
        self._settings: dict[str, Any] | None = None
        self._previous: Any = None
        self._saved: list[torch.Tensor] | None = None
        self._hessian_batch: Any = None
        self._first_batch: Any = None
        self._received: dict[str, torch.Tensor] | None = None
        self._ctx: ClientContext | None = None

    # ------------------------------------------------------------------ client boundaries
    def transform_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        settings = ctx.task.config.get(PERFEDAVG)
        if settings is None:
            self._settings = None
            return
        if not pl_module.automatic_optimization:
            raise ConfigError(f"Per-FedAvg needs automatic optimization; {type(pl_module).__name__} sets `automatic_optimization = False`")
        self._settings = dict(settings)
        self._ctx = ctx
        self._first_batch = None
        self._previous = pl_module.__dict__.get("training_step")
        step = pl_module.training_step

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return step(self._inner_step(pl_module, batch), *args, **kwargs)

        object.__setattr__(pl_module, "training_step", training_step)

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        if self._settings is not None and ctx.local_test_loader is not None and self._settings.get("adapt_from", "received") == "received":
            self._received = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        if self._settings is None:
            return
        self._unwrap(pl_module)
        if ctx.local_test_loader is not None and self._first_batch is not None:
            ev = self.personalized_evaluation(pl_module, self._first_batch, ctx.local_test_loader, start=self._received)
            ctx.metrics_extra["local_test_acc"] = ev["accuracy"]
            ctx.metrics_extra["local_test_loss"] = ev["loss"]
        self._reset()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a client's code failed: the runtime goes on with the others, with the module unwrapped
        if self._settings is not None:
            self._unwrap(pl_module)
        self._reset()

    def _reset(self) -> None:
        self._settings = self._previous = self._saved = self._hessian_batch = None
        self._first_batch = self._received = self._ctx = None

    def _unwrap(self, pl_module: Any) -> None:
        if self._previous is not None:
            object.__setattr__(pl_module, "training_step", self._previous)
        elif "training_step" in pl_module.__dict__:
            object.__delattr__(pl_module, "training_step")
        self._previous = None

    # ------------------------------------------------------------------ one MAML step
    def _params(self, pl_module: Any) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _inner_step(self, pl_module: Any, batch: Any) -> Any:
        """Cut the batch, take the inner step on ``D``; return ``D'`` for ``training_step``."""
        s = self._settings
        assert s is not None
        if self._first_batch is None:
            self._first_batch = batch
        parts = split_batch(batch, part_sizes(batch_size_of(batch), s["variant"], s.get("inner_fraction")))
        params = self._params(pl_module)
        self._saved = [p.detach().clone() for p in params]
        grads = gradients(mean_loss(pl_module, parts[0]), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(float(s["alpha"]) * g)
        self._hessian_batch = parts[2] if len(parts) > 2 else None
        return parts[1]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._settings is None or self._saved is None:
            return
        s = self._settings
        params = self._params(pl_module)
        with torch.no_grad():
            for p, w in zip(params, self._saved):
                p.copy_(w)  # the step starts from w, with the gradient taken at w̃
        self._saved = None
        if self._hessian_batch is None:
            return
        outer = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        batch = self._hessian_batch
        hvp = hessian_vector_product(lambda: mean_loss(pl_module, batch), params, outer, float(s["delta"]))
        if self._ctx is not None:
            self._ctx.extra_examples += 2 * batch_size_of(batch)  # two more gradients on D''
        for p, g in zip(params, meta_gradient(outer, float(s["alpha"]), hvp)):
            p.grad = g
        self._hessian_batch = None

    # ------------------------------------------------------------------ personalization
    def personalized_evaluation(
        self, pl_module: Any, batch: Any, loader: Any, *, start: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Local test metrics of ``start`` (default: the module's current weights) after one step
        ``w − α ∇f(w; batch)``; the module is left exactly as it was."""
        assert self._settings is not None
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        was_training = pl_module.training
        try:
            if start is not None:
                pl_module.load_state_dict(start)
            params = self._params(pl_module)
            grads = gradients(mean_loss(pl_module, batch), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(float(self._settings["alpha"]) * g)
            return evaluate(pl_module, loader)
        finally:
            pl_module.load_state_dict(current)
            pl_module.train(was_training)
