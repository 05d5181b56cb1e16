"""Dynamic channel gates in Lightning: FedDP's client side and a callback for centralized training.

The gate math (pooling, linear, sigmoid, top-k, saliency scaling, lasso, FLOPs, gated inference)
is in :mod:`lightning_fedprune.core.gates`; these callbacks only insert the gates into a module,
add the lasso to the loss and keep the gates' tensors where they belong.

* :class:`GateCallback` (client callback ``"gates"``, requested by the ``feddp`` wrapper): for
  every client it inserts gates into the module in ``transform_module`` (before the optimizer is
  built, so they train with the network), loads them from the client's persistent state
  (``ctx.state["feddp.gates"]``; fresh gates the first time), adds
  ``lambda * sum_k E||linear(s_k)||_1`` to every training step's loss, and in ``on_client_end``
  saves them back to the client's state and removes them, before the runtime reads the weights.
  Gates are therefore never sent, in either direction; the client's state is checkpointed with
  the run (simulation) or by the client process (FedML). The keep ratio and lambda come from the
  task (``gate_keep_ratio``, ``gate_lasso``). When the client has local test (validation) data,
  the callback evaluates the GATED model on it before removing the gates and reports
  ``local_test_acc`` / ``local_test_loss`` and the mean theoretical FLOPs per sample,
  ``gated_flops`` against ``dense_flops`` (scalars in the result's metrics; no gate tensor). The
  server's global evaluation sees the backbone without gates: for a gated run it measures the
  dense backbone, which was never trained to run without its gates.
  A structured sub-model task (FedMP under the ``feddp`` wrapper, which adds the task's kept
  channels, ``config["kept"]``) gets gates on the received sub-model's convolutions; the client's
  stored gate state stays at the full model's width and is sliced by the kept channels before
  training and scattered back after it (see :mod:`lightning_fedprune.core.gates`), so it survives
  any change of the sub-model's width between rounds. ``dense_flops`` is then the received
  sub-model's.
* :class:`DynamicGating`: the same gates in an ordinary (centralized) ``Trainer``: inserted at
  ``setup`` (before ``configure_optimizers``), the lasso added to ``training_step``'s loss while
  fitting, gates checkpointed with the Trainer's checkpoint (``state_dict``), removed by
  :meth:`DynamicGating.remove`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import GATE_KEEP_RATIO, GATE_LASSO
from lightning_fedprune.core.gates import (
    DEFAULT_LASSO,
    GateIndex,
    GateSet,
    GateSite,
    check_keep_ratio,
    check_lasso,
    dense_flops_per_sample,
    find_gate_sites,
    gated_flops_per_sample,
    scatter_gate_state,
    slice_gate_state,
    widen_sites,
)
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.evaluation import evaluate

log = logging.getLogger(__name__)

__all__ = ["GateCallback", "DynamicGating", "GATE_STATE_KEY"]

#: client-state key of the gates' tensors (``"<conv name>/<param>" -> tensor``)
GATE_STATE_KEY = "feddp.gates"


def _example(pl_module: Any, example: Any) -> Any:
    if example is not None:
        return example
    getter = getattr(pl_module, "federated_example_input", None)
    if callable(getter):
        return getter()
    arr = getattr(pl_module, "example_input_array", None)
    if arr is None:
        raise ConfigError(
            f"{type(pl_module).__name__} has no example input to find its gateable layers: set `example_input_array` "
            "or pass `example=` to DynamicGating"
        )
    return arr


def _conv_signature(module: torch.nn.Module) -> tuple:
    return tuple((n, tuple(m.weight.shape)) for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d))


@register_client_callback("gates")
class GateCallback(FederatedCallback):
    """FedDP's client side (see the module docstring): client-local gates with a lasso."""

    def __init__(self) -> None:
        self.gates: GateSet | None = None
        self.lam = 0.0
        self._sites: dict[tuple, list[GateSite]] = {}
        self._dense: dict[tuple, float] = {}
        self._full_state: dict[str, torch.Tensor] | None = None  # a sub-model task's full-width gates
        self._index: dict[str, GateIndex] | None = None

    def transform_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        self._remove()  # a previous client that failed mid-training left its gates in
        cfg = ctx.task.config
        if GATE_KEEP_RATIO not in cfg:
            raise ConfigError(
                f"the 'gates' client callback needs `{GATE_KEEP_RATIO}` in the task config: wrap the strategy with the "
                "'feddp' wrapper"
            )
        keep = check_keep_ratio(cfg[GATE_KEEP_RATIO])
        self.lam = check_lasso(cfg.get(GATE_LASSO, 0.0))
        sig = _conv_signature(pl_module)
        if sig not in self._sites:
            example = _example(pl_module, None)
            self._sites[sig] = find_gate_sites(pl_module, example)[0]
            self._dense[sig] = float(dense_flops_per_sample(pl_module, example)[0])
        self._sig = sig
        sites = self._sites[sig]
        plan = ctx.plan
        index = None
        if plan is not None:  # a sub-model: the client's gates are kept at the full model's width
            index = {s.conv: plan.indices(f"{s.conv}.weight")[:2] for s in sites}
            full_channels = {s.conv: plan.full_shapes[f"{s.conv}.weight"][:2] for s in sites}
            full = GateSet(widen_sites(sites, full_channels), keep)
        else:
            full = GateSet(sites, keep)
        stored = ctx.state.get(GATE_STATE_KEY)
        if stored:
            full.load_gate_state(stored)
        if index is None:
            gates = full
        else:
            self._full_state, self._index = full.gate_state(), index
            gates = GateSet(sites, keep)
            gates.load_gate_state(slice_gate_state(self._full_state, index))
        gates.attach(pl_module)
        self.gates = gates

    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> torch.Tensor | None:
        if self.gates is None or self.lam == 0.0:
            return None
        return self.gates.lasso(self.lam)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        if self.gates is not None:
            state = self.gates.gate_state()
            if self._index is not None and self._full_state is not None:
                state = scatter_gate_state(self._full_state, state, self._index)
            ctx.state[GATE_STATE_KEY] = state
            if ctx.local_test_loader is not None:
                ctx.metrics_extra.update(self._evaluate(pl_module, ctx.local_test_loader))
        self._remove()

    def _evaluate(self, pl_module: pl.LightningModule, loader: Any) -> dict[str, float]:
        """The gated model on the client's local test data: accuracy, loss and mean FLOPs per sample."""
        assert self.gates is not None
        ev = evaluate(pl_module, loader)
        total, n = 0.0, 0
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            total += float(gated_flops_per_sample(pl_module, self.gates, x).sum())
            n += int(x.shape[0])
        out = {"local_test_acc": ev["accuracy"], "local_test_loss": ev["loss"], "dense_flops": self._dense[self._sig]}
        if n:
            out["gated_flops"] = total / n
        return out

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self.gates is not None:
            self.gates.detach()
        self.gates = None
        self._full_state, self._index = None, None


class DynamicGating(pl.Callback):
    """Dynamic channel gates with a lasso in an ordinary Lightning training (see module docstring).

    Args:
        keep_ratio: fraction of output channels each gate keeps, in (0, 1].
        lasso: lambda of the lasso on the gates' linear outputs (>= 0; default
            :data:`~lightning_fedprune.core.gates.DEFAULT_LASSO`, 1e-4).
        layers: names of the convolutions to gate (default: every gateable one).
        example: an example input batch to find the gateable layers (default: the module's
            ``example_input_array`` or ``federated_example_input()``).

    Attributes:
        gates: the :class:`~lightning_fedprune.core.gates.GateSet` once set up.
        lasso_history: the lasso term of every training step (floats).

    Raises:
        ConfigError: ``keep_ratio`` outside (0, 1] or ``lasso`` < 0.
    """

    def __init__(self, *, keep_ratio: float = 0.5, lasso: float = DEFAULT_LASSO, layers: Sequence[str] | None = None, example: Any = None) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.lasso = check_lasso(lasso)
        self.layers = tuple(layers) if layers is not None else None
        self.example = example
        self.gates: GateSet | None = None
        self.lasso_history: list[float] = []
        self._pending: dict[str, torch.Tensor] | None = None
        self._wrapped: Any = None

    @property
    def state_key(self) -> str:
        return f"DynamicGating{{keep_ratio={self.keep_ratio}, layers={self.layers}}}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.gates is None:
            self.gates = GateSet.for_model(pl_module, _example(pl_module, self.example), keep_ratio=self.keep_ratio, layers=self.layers)
        if self._pending is not None:
            self.gates.load_gate_state(self._pending)
            self._pending = None
        if not self.gates.attached:
            self.gates.attach(pl_module)
        if stage == "fit" and self._wrapped is None:
            self._wrap_training_step(pl_module)

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        step = pl_module.training_step
        gates = self.gates
        assert gates is not None

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if out is None or self.lasso == 0.0:
                return out
            term = gates.lasso(self.lasso)
            self.lasso_history.append(float(term.detach()))
            if isinstance(out, Mapping):
                return {**out, "loss": out["loss"] + term}
            return out + term

        object.__setattr__(pl_module, "training_step", training_step)
        self._wrapped = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            object.__delattr__(self._wrapped, "training_step")
            self._wrapped = None

    def remove(self) -> None:
        """Take the gates out of the module (they keep their values; ``gates.attach`` re-inserts them)."""
        if self.gates is not None:
            self.gates.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "gates": self.gates.gate_state() if self.gates is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("gates")
        if saved is None:
            return
        if self.gates is not None:
            self.gates.load_gate_state(saved)
        else:
            self._pending = dict(saved)
