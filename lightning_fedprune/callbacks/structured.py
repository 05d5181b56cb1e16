"""Structured pruning during ordinary (centralized) Lightning training.

:class:`StructuredPruning` physically removes filters / neurons / LSTM hidden units from the
LightningModule at chosen epochs, with FedMP's rule (same ratio in every prunable group, smallest
L1 norm removed; see :class:`~lightning_fedprune.core.plans.Planner`), then rebuilds the optimizers
so training goes on with the smaller model::

    trainer = Trainer(max_epochs=10, callbacks=[StructuredPruning(0.5, epoch=2)])
    trainer.fit(module)                      # epochs 0-1 dense, epochs 2-9 on the pruned model

    StructuredPruning({2: 0.3, 5: 0.6})      # prune in steps; ratios relative to the original model

The math lives in :mod:`lightning_fedprune.core.plans`; this callback only decides when and
swaps the module's tensors. Pruning happens at the first training batch of a scheduled epoch (the
batch also serves as the example input for tracing when the module has none). Later steps of a
schedule prune the already pruned model again, keeping ``int(C * (1 - ratio))`` of each group's
ORIGINAL ``C`` channels; :attr:`StructuredPruning.plan` is the accumulated plan in the original
model's coordinates.

Checkpoints: the callback's state (the plan and the epochs done) is saved; on resume the module is
reshaped to the checkpoint's tensor shapes before Lightning loads the weights (a load pre-hook
registered in ``setup``), so ``trainer.fit(module, ckpt_path=...)`` works with a fresh, full-size
module. Optimizer state and learning-rate schedulers start afresh at each pruning step. Use it with
single-device strategies (DDP buckets are built for the original parameters).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_fedprune.core.pruning.plan import Plan
from lightning_fedprune.core.pruning.resize import resize_module
from lightning_fedprune.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["StructuredPruning"]


class StructuredPruning(pl.Callback):
    """Prune a LightningModule's channels at scheduled epochs (see the module docstring).

    Args:
        ratio: The pruning ratio in ``[0, 1)`` applied at ``epoch``, or a schedule
            ``{epoch: ratio}`` with non-decreasing ratios (relative to the original model).
        epoch: The epoch at which a single ``ratio`` is applied.
        unprunable: Module name patterns never pruned on their output side; default: the
            module's ``federated_unprunable`` if it has one, else ``("classifier",)``.
        example_input: Input batch for tracing; default: the module's ``example_input_array``,
            then its ``federated_example_input()``, then the first tensor of the training batch
            (its first sample).

    Raises:
        ConfigError: On an invalid ratio, epoch or schedule.
    """

    def __init__(
        self,
        ratio: float | Mapping[int, float],
        *,
        epoch: int = 0,
        unprunable: Iterable[str] | None = None,
        example_input: Any = None,
    ) -> None:
        if isinstance(ratio, Mapping):
            if epoch != 0:
                raise ConfigError("give either a schedule {epoch: ratio} or `ratio` with `epoch`, not both")
            schedule = dict(ratio)
        else:
            schedule = {epoch: ratio}
        if not schedule:
            raise ConfigError("the pruning schedule is empty")
        checked: dict[int, float] = {}
        for e, r in sorted(schedule.items(), key=lambda kv: kv[0] if isinstance(kv[0], int) else -1):
            if isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise ConfigError(f"pruning epochs must be integers >= 0, got {e!r}")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r < 1.0:
                raise ConfigError(f"`ratio` must be a number in [0, 1), got {r!r} (epoch {e})")
            if checked and r < max(checked.values()):
                raise ConfigError(f"pruning ratios must not decrease over epochs, got {schedule}")
            checked[e] = float(r)
        self.schedule = checked
        self.unprunable = None if unprunable is None else tuple([unprunable] if isinstance(unprunable, str) else unprunable)
        self.example_input = example_input
        #: The accumulated plan in the original model's coordinates (``None`` before the first step).
        self.plan: Plan | None = None
        #: Epochs whose pruning step has been applied.
        self.done: list[int] = []
        self._group_sizes: list[int] | None = None
        self._hook: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=sorted(self.schedule.items()))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": None if self.plan is None else self.plan.to_json(),
            "done": list(self.done),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = state_dict.get("plan")
        self.plan = None if plan is None else Plan.from_json(plan)
        self.done = [int(e) for e in state_dict.get("done", [])]
        self._group_sizes = None if self.plan is None else list(self.plan.group_sizes)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the load pre-hook that reshapes the module to a checkpoint's (pruned) shapes."""
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(_reshape_to_checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, check that the module has the restored plan's shapes."""
        if self.plan is None:
            return
        own = pl_module.state_dict()
        expected = self.plan.sub_shapes()
        wrong = [k for k, s in expected.items() if k in own and tuple(own[k].shape) != s]
        if wrong:
            raise ConfigError(
                f"the module's tensors {wrong[:5]} do not have the restored pruning plan's shapes; "
                "resume from the checkpoint that saved this callback's state"
            )

    # ------------------------------------------------------------------ pruning
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        due = [e for e in self.schedule if e <= epoch and e not in self.done]
        if not due:
            return
        target = max(due)  # a resumed run that skipped steps goes straight to the latest ratio
        self.prune(pl_module, self.schedule[target], batch=batch)
        self.done.extend(sorted(due))
        trainer.strategy.setup_optimizers(trainer)

    def prune(self, pl_module: pl.LightningModule, ratio: float, *, batch: Any = None) -> Plan:
        """Prune ``pl_module`` in place to ``ratio`` of the ORIGINAL model and return the step's plan
        (in the coordinates of the module as it was before this step).

        The caller rebuilds the optimizers (:meth:`on_train_batch_start` calls
        ``trainer.strategy.setup_optimizers(trainer)``).
        """
        from lightning_fedprune.core.pruning.planner import Planner  # imports torch-pruning (and timm)

        example = self._example(pl_module, batch)
        unprunable = self.unprunable
        if unprunable is None:
            unprunable = tuple(getattr(pl_module, "federated_unprunable", ("classifier",)))
        planner = Planner.from_module(pl_module, example, unprunable=unprunable)
        state = pl_module.state_dict()
        if self.plan is None:
            step = planner.plan(state, ratio)
            self._group_sizes = list(planner.group_sizes)
            self.plan = step
        else:
            original = self._group_sizes or list(self.plan.group_sizes)
            current = planner.group_sizes
            keep = [min(c, max(1, int(full * (1 - ratio)))) for c, full in zip(current, original)]
            step = planner.plan_from_keep(state, keep)
            self.plan = self.plan.compose(step)
        sub_state = step.extract(state)
        resize_module(pl_module, step.sub_shapes())
        pl_module.load_state_dict(sub_state)
        rank_zero_info(
            f"StructuredPruning: pruned to ratio {ratio} ({self.plan.kept_fraction():.1%} of the original tensors kept)"
        )
        return step

    def _example(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if self.example_input is not None:
            return self.example_input
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return example
        fn = getattr(pl_module, "federated_example_input", None)
        if callable(fn):
            try:
                return fn(batch)
            except ConfigError:
                pass
        x = _first_tensor(batch)
        if x is None:
            raise ConfigError(
                "StructuredPruning needs an example input: pass `example_input=` or set the module's "
                "`example_input_array`"
            )
        return x[:1]


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _reshape_to_checkpoint(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load pre-hook: reshape ``module`` to the (pruned) shapes of the state being loaded."""
    if prefix:
        return
    own = module.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)}
    if shapes:
        log.debug("reshaping %d tensors of %s to the checkpoint's shapes", len(shapes), type(module).__name__)
        resize_module(module, shapes)
