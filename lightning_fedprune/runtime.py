"""The client runtime: the only place that calls ``Trainer.fit``.

:class:`ClientRuntime` turns :class:`~lightning_fedprune.core.ClientTask` s into
:class:`~lightning_fedprune.core.ClientResult` s by training the user's LightningModule with a
Lightning ``Trainer``. Both transports use it: the simulation engine (many clients in one
process) and a FedML client process (one client).

Amortizing Lightning's fixed cost
---------------------------------
A ``Trainer.fit`` costs ~10-15 ms of set-up and tear-down whatever the work, which dominates small
models trained by many clients. :meth:`ClientRuntime.run_many` therefore trains *all* the tasks it
is given inside ONE ``fit``: every local epoch of every client is one Lightning epoch. An internal
controller callback switches clients at epoch boundaries: it loads the next client's weights into
the module in place, rebuilds the optimizers from ``configure_optimizers`` (fresh state per
client), reseeds torch and points the data loader at that client's data; after the client's last
epoch it reads the trained weights. The user's ``training_step``, ``configure_optimizers`` and
callbacks run unchanged; ordinary callbacks see one Lightning epoch per local epoch. A local
learning-rate schedule (``lr_schedule``, :mod:`lightning_fedprune.core.schedules`) is applied by the
same controller: at the start of every local epoch it sets each param group's learning rate to the
rate ``configure_optimizers`` gave times the schedule's factor, restarting with every client.
:class:`~lightning_fedprune.callbacks.FederatedCallback` s also get ``on_client_start`` /
``on_client_end``. A client whose code raises is reported as a
:class:`~lightning_fedprune.core.ClientFailure` and the remaining clients run in a new ``fit``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_fedprune.callbacks import ClientContext, FederatedCallback, make_client_callbacks
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.contract import KEPT, PROBE_LOSS, decode_kept_groups, weights_format_of
from lightning_fedprune.core.messages import ClientFailure, ClientMetrics, ClientResult, ClientTask
from lightning_fedprune.core.schedules import check_lr_schedule, lr_factor
from lightning_fedprune.core.seeding import derive_seed
from lightning_fedprune.errors import ConfigError, FedPruneError, PayloadError
from lightning_fedprune.evaluation import evaluate
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.strategies.base import ModelSpec
from lightning_fedprune.trainer_utils import quiet_lightning, trainer_defaults

log = logging.getLogger(__name__)

__all__ = [
    "ClientRuntime",
    "ClientError",
    "count_flops_per_example",
    "build_planner",
    "example_input",
    "initialize_strategy",
    "LOCAL_STATE_KEY",
    "RESERVED_TRAINER_KWARGS",
]

#: client-state key of the module's local (never communicated) tensors
LOCAL_STATE_KEY = "module.local"
#: ``Trainer`` arguments the runtime sets itself (local work comes from each task)
RESERVED_TRAINER_KWARGS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "callbacks", "max_time")


#: ``on_outcome(task, outcome)`` of :meth:`ClientRuntime.run_many`
OutcomeCallback = Callable[[ClientTask, "ClientResult | ClientFailure"], None]
#: ``more()`` of :meth:`ClientRuntime.run_many`: the next task to train, ``None`` when there is none
MoreTasks = Callable[[], "ClientTask | None"]


class _MoreFailed(Exception):
    """``more()`` raised (its error is the cause): not a client's failure."""


class ClientError(FedPruneError, RuntimeError):
    """A client's local training failed (raised by :meth:`ClientRuntime.run`)."""


def count_flops_per_example(module: torch.nn.Module, example: Any) -> float:
    """Forward FLOPs of ONE example (2 x multiply-accumulates) of the module at its current shape.

    Counted by :func:`lightning_fedprune.core.flops.forward_flops` (torch-pruning's per-layer rules,
    LSTMs analytically). Modules may provide ``federated_forward_flops(example)`` to override it.
    """
    custom = getattr(module, "federated_forward_flops", None)
    if callable(custom):
        return float(custom(example))
    from lightning_fedprune.core.flops import forward_flops

    return forward_flops(module, example, per_example=True)


def build_planner(module: Any, example: Any = None) -> Any:
    """A :class:`~lightning_fedprune.core.plans.Planner` for a federated module.

    The graph is traced once on ``module`` with ``example`` (default: the module's
    :meth:`~lightning_fedprune.module.FederatedModuleMixin.federated_example_input`); the layers in
    ``module.federated_unprunable`` are never pruned. Keys are the module's ``state_dict`` keys,
    the same names the round messages carry.
    """
    from lightning_fedprune.core.plans import Planner

    if example is None:
        example = module.federated_example_input()
    return Planner.from_module(module, example, unprunable=tuple(getattr(module, "federated_unprunable", ())))


def example_input(module: Any, data: Any = None) -> Any:
    """The module's example input, or the first sample of the first client's data.

    Raises:
        ConfigError: the module declares none and there is no data to take one from.
    """
    try:
        return module.federated_example_input()
    except ConfigError:
        if data is None:
            raise
        first = data.client_ids[0] if hasattr(data, "client_ids") else 0
        for batch in data.train_batches(first, run_seed=0, rnd=0, epoch=0):
            return module.federated_example_input(batch)
        raise


def initialize_strategy(strategy: Any, module: Any, *, num_clients: int, data: Any = None, example: Any = None) -> None:
    """Give ``strategy`` its initial global model: the communicated tensors of ``module``.

    Strategies that send structured sub-models (``strategy.requires_planner``) also get a pruning
    planner traced once on ``module`` (:func:`build_planner`) with ``example`` (default: the
    module's example input, or the first sample of ``data``). Call it once before the first round;
    the simulation engine calls it for a strategy that is not initialized yet.

    Raises:
        ConfigError: ``num_clients`` < 1, or no example input for a planner.
    """
    planner = None
    if strategy.requires_planner:
        planner = build_planner(module, example if example is not None else example_input(module, data))
    strategy.initialize(
        ModelSpec(
            state={k: v.clone() for k, v in module.federated_state().items()},
            trainable=module.trainable_names(),
            planner=planner,
        ),
        num_clients=num_clients,
    )


@dataclass
class _Segment:
    task_index: int
    epoch: int  # local epoch index within the client
    first: bool
    last: bool


@dataclass
class _Running:
    task: ClientTask
    ctx: ClientContext
    cpu_start: float
    losses: list[float] = field(default_factory=list)
    epoch_of_loss: list[int] = field(default_factory=list)
    examples: int = 0
    probe: Any = None  # the client's first batch, evaluated with the received and the trained weights
    probe_before: float = math.nan
    base_lrs: list[list[float]] = field(default_factory=list)  # per optimizer, per param group


class _ScheduledBatches:
    """The iterable handed to ``Trainer.fit``: each ``iter()`` yields the current segment's batches."""

    def __init__(self) -> None:
        self.current: Any = None

    def __iter__(self) -> Iterator[Any]:
        # lazy: Lightning calls iter() once just to check the object is iterable; creating the
        # DataLoader iterator there would draw from its shuffling generator and change the order
        if self.current is not None:
            yield from self.current


class _RoundController(pl.Callback):
    """Switches clients at epoch boundaries inside one ``fit`` (see module docstring)."""

    def __init__(
        self, runtime: ClientRuntime, tasks: Sequence[ClientTask], store: ClientStore, on_outcome: OutcomeCallback | None = None,
        more: MoreTasks | None = None,
    ) -> None:
        self.runtime = runtime
        self.tasks: list[ClientTask] = []
        self.store = store
        self.on_outcome = on_outcome
        self.more = more
        self.schedule: list[_Segment] = []
        for task in tasks:
            self._add(task)
        self.loader = _ScheduledBatches()
        self.results: dict[int, ClientResult] = {}
        self.running: _Running | None = None
        self._pending_end = False
        self._need_flops = False
        self._epoch = 0
        if self.schedule:
            self._point_loader(0)

    def _add(self, task: ClientTask) -> None:
        i = len(self.tasks)
        self.tasks.append(task)
        n = task.local_epochs if task.local_epochs is not None else 1
        for e in range(n):
            self.schedule.append(_Segment(i, e, e == 0, e == n - 1))

    @property
    def current_task(self) -> ClientTask | None:
        return self.running.task if self.running is not None else None

    # -------------------------------------------------------------- Lightning hooks
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_end:
            self._end_client(trainer, pl_module)
        seg = self.schedule[self._epoch]
        task = self.tasks[seg.task_index]
        if seg.first:
            self._begin_client(trainer, pl_module, task)
        if self.runtime.lr_schedule != "constant":
            self._schedule_lr(trainer, seg, task)
        if self._epoch > 0:
            # Lightning calls iter() on the loader after this hook, except for the very first
            # epoch, whose iterator is made (and one batch prefetched) before fit's loop starts
            self._point_loader(self._epoch)

    def _schedule_lr(self, trainer: pl.Trainer, seg: _Segment, task: ClientTask) -> None:
        run = self.running
        assert run is not None
        factor = lr_factor(self.runtime.lr_schedule, seg.epoch, task.local_epochs if task.local_epochs is not None else 1)
        for opt, base in zip(trainer.optimizers, run.base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor

    def _point_loader(self, epoch: int) -> None:
        seg = self.schedule[epoch]
        task = self.tasks[seg.task_index]
        data = self.runtime.data
        if task.local_steps is not None:
            self.loader.current = data.train_steps(task.client_id, task.local_steps, run_seed=self.runtime.seed, rnd=task.round)
        else:
            self.loader.current = data.train_batches(task.client_id, run_seed=self.runtime.seed, rnd=task.round, epoch=seg.epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._need_flops:
            self.runtime._measure_flops(pl_module, batch)
            self._need_flops = False
        run = self.running
        if run is not None and run.probe is None and (self.runtime.probe_loss or run.task.config.get(PROBE_LOSS)):
            run.probe = batch
            run.probe_before = _probe_loss(pl_module, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        run = self.running
        assert run is not None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            run.losses.append(float(loss))
            run.epoch_of_loss.append(self.schedule[self._epoch].epoch)
        run.ctx.num_steps += 1
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        run.examples += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seg = self.schedule[self._epoch]
        if trainer.loggers and self.running is not None:
            # a user's `trainer.logger`: tag each epoch's metrics (e.g. the module's train_loss) with its client
            task = self.running.task
            tags = {"client_id": float(task.client_id), "round": float(task.round), "local_epoch": float(seg.epoch)}
            pl_module.log_dict(tags, on_step=False, on_epoch=True, batch_size=1)
        self._epoch += 1
        # finish at the next epoch start (or at train end) so the module's own epoch-end hooks ran
        self._pending_end = seg.last
        if seg.last and self._epoch == len(self.schedule) and self.more is not None:
            # the last scheduled client is trained: take the next one into this fit, if any
            try:
                task = self.more()
            except Exception as err:  # not the client's failure
                raise _MoreFailed() from err
            if task is not None:
                self._add(task)
                trainer.fit_loop.max_epochs = len(self.schedule)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_end:
            self._end_client(trainer, pl_module)

    # -------------------------------------------------------------- client boundaries
    def _begin_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: ClientTask) -> None:
        rt = self.runtime
        # the CPU generator only: torch.manual_seed also seeds every accelerator backend (~2 ms)
        torch.random.default_generator.manual_seed(derive_seed(rt.seed, "torch", task.round, task.client_id))
        state = self.store.get(task.client_id)
        rt.load_task(pl_module, task, state)
        pl_module.train()
        test_loader = rt.data.local_test_loader(task.client_id) if rt.evaluate_local else None
        ctx = ClientContext(task=task, state=state, plan=rt._task_plan(task), local_test_loader=test_loader)
        callbacks = rt._federated_callbacks(trainer)
        for cb in callbacks:
            # before the optimizer is built: modules inserted here (e.g. gates) are trained
            cb.transform_module(trainer, pl_module, ctx)
        trainer.strategy.setup_optimizers(trainer)
        if rt.lr_schedule != "constant" and trainer.lr_scheduler_configs:
            raise ConfigError(
                f"`lr_schedule` {rt.lr_schedule!r} sets the local learning rate, but {type(pl_module).__name__}."
                "configure_optimizers returns a learning-rate scheduler too: use one of them"
            )
        self._need_flops = rt._shape_key(pl_module) not in rt._flops_cache
        base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        self.running = _Running(task=task, ctx=ctx, cpu_start=time.process_time(), base_lrs=base_lrs)
        for cb in callbacks:
            cb.on_client_start(trainer, pl_module, ctx)

    def _end_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending_end = False
        run = self.running
        assert run is not None
        rt = self.runtime
        for cb in rt._federated_callbacks(trainer):
            cb.on_client_end(trainer, pl_module, run.ctx)
        compute = time.process_time() - run.cpu_start
        task = run.task
        if run.ctx.result_weights is not None:
            weights = dict(run.ctx.result_weights)
        else:
            weights = {k: v.clone() for k, v in pl_module.federated_state().items()}
        local = pl_module.local_state()
        if local:
            run.ctx.state[LOCAL_STATE_KEY] = local
        self.store.put(task.client_id, run.ctx.state)
        extra: dict[str, float] = dict(run.ctx.metrics_extra)
        test_loader = run.ctx.local_test_loader
        if test_loader is not None and "local_test_acc" not in extra:
            ev = evaluate(pl_module, test_loader)
            extra["local_test_acc"] = ev["accuracy"]
            extra["local_test_loss"] = ev["loss"]
        if run.probe is not None:
            # the same batch before and after local training: a paired, low-noise loss decrease
            extra["probe_loss_before"] = run.probe_before
            extra["probe_loss_after"] = _probe_loss(pl_module, run.probe)
        before, after = _loss_before_after(run.losses, run.epoch_of_loss)
        metrics = ClientMetrics(
            num_samples=rt.data.num_train_samples(task.client_id),
            num_steps=run.ctx.num_steps,
            num_examples=run.examples,
            loss_before=before,
            loss_after=after,
            compute_seconds=compute,
            flops=3.0 * max(0.0, rt._flops_per_example(pl_module) - run.ctx.flops_saved_per_example) * (run.examples + run.ctx.extra_examples),
            extra=extra,
        )
        self.results[task.client_id] = ClientResult(
            round=task.round,
            client_id=task.client_id,
            weights=weights,
            metrics=metrics,
            extras=dict(run.ctx.result_extras),
            config=dict(run.ctx.result_config),
        )
        self.running = None
        if self.on_outcome is not None:
            self.on_outcome(task, self.results[task.client_id])


def _probe_loss(module: Any, batch: Any) -> float:
    """Mean evaluation loss of ``batch`` (eval mode, no gradients, no RNG draws)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            loss_sum, _, targets = module.federated_evaluate_batch(batch)
    finally:
        module.train(was_training)
    if targets is not None:
        n = targets.numel()
    else:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
    value = float(loss_sum) / max(1, n)
    return value if math.isfinite(value) else math.nan


def _loss_before_after(losses: list[float], epochs: list[int]) -> tuple[float, float]:
    """First local epoch vs last local epoch; first half vs second half for a single epoch."""
    if not losses:
        return math.nan, math.nan
    first_epoch, last_epoch = epochs[0], epochs[-1]
    if first_epoch != last_epoch:
        a = [v for v, e in zip(losses, epochs) if e == first_epoch]
        b = [v for v, e in zip(losses, epochs) if e == last_epoch]
    else:
        half = max(1, len(losses) // 2)
        a, b = losses[:half], losses[-half:]
    return sum(a) / len(a), sum(b) / len(b)


class ClientRuntime:
    """Trains clients' tasks with a Lightning Trainer.

    Args:
        module: the LightningModule to train; it must use :class:`FederatedModuleMixin`.
        data: where clients' data comes from (a :class:`~lightning_fedprune.data.FederatedDataset`
            or anything with ``num_train_samples``, ``train_batches``, ``train_steps`` and
            ``local_test_loader``).
        seed: run seed; data order and torch RNG of client ``c`` in round ``r`` derive from it.
        client_callbacks: names of strategy-requested client callbacks (``strategy.client_callbacks``).
        callbacks: further Lightning callbacks added to every local training.
        trainer_kwargs: further ``Trainer`` arguments (e.g. ``gradient_clip_val``, ``precision``).
            Epoch / step limits and callbacks are set by the runtime and may not be given here.
        evaluate_local: evaluate each trained client model on the client's local test split.
        probe_loss: evaluate the client's first batch with the received and with the trained
            weights (``metrics.extra["probe_loss_before"/"probe_loss_after"]``): a paired loss
            decrease, far less noisy than the running training losses. Also done for tasks
            whose config sets ``probe_loss`` (FedMP's reward asks for it).
        lr_schedule: the learning-rate schedule of each client's local epochs
            (:data:`~lightning_fedprune.core.schedules.LR_SCHEDULES`): ``"constant"`` (default) or
            ``"cosine"`` (the rate of ``configure_optimizers`` times ``(1 + cos(pi * e / E))/2``
            in local epoch ``e`` of ``E``, restarting every round; a task of ``local_steps`` is
            one local epoch). The module's ``configure_optimizers`` must then return no scheduler.

    Raises:
        ConfigError: a module without :class:`FederatedModuleMixin`, reserved ``trainer_kwargs``
            or an unknown ``lr_schedule``.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        *,
        data: Any,
        seed: int = 0,
        client_callbacks: Sequence[str] = (),
        callbacks: Sequence[pl.Callback] = (),
        trainer_kwargs: dict[str, Any] | None = None,
        evaluate_local: bool = True,
        probe_loss: bool = False,
        lr_schedule: str = "constant",
    ) -> None:
        if not isinstance(module, FederatedModuleMixin):
            raise ConfigError(
                f"{type(module).__name__} is not federatable: add FederatedModuleMixin to its bases, e.g. "
                f"`class {type(module).__name__}(FederatedModuleMixin, LightningModule)`"
            )
        trainer_kwargs = dict(trainer_kwargs or {})
        bad = [k for k in RESERVED_TRAINER_KWARGS if k in trainer_kwargs]
        if bad:
            raise ConfigError(f"trainer_kwargs may not set {bad}: the runtime sets local work from each task")
        self.module = module
        self.data = data
        self.seed = int(seed)
        self.callbacks = [*make_client_callbacks(tuple(client_callbacks)), *callbacks]
        self.trainer_kwargs = trainer_kwargs
        self.evaluate_local = bool(evaluate_local)
        self.probe_loss = bool(probe_loss)
        self.lr_schedule = check_lr_schedule(lr_schedule)
        self._initial_local = module.local_state()
        self._full_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        self._layout: Any = None
        self._flops_cache: dict[tuple, float] = {}

    # -------------------------------------------------------------- public API
    def run(self, task: ClientTask, store: ClientStore | None = None) -> ClientResult:
        """Run one task; raise :class:`ClientError` if the client's training fails."""
        out = self.run_many([task], store if store is not None else ClientStore())[0]
        if isinstance(out, ClientFailure):
            raise ClientError(out.reason)
        return out

    def run_many(
        self, tasks: Sequence[ClientTask], store: ClientStore, *, on_outcome: OutcomeCallback | None = None,
        more: MoreTasks | None = None,
    ) -> list[ClientResult | ClientFailure]:
        """Run several tasks in as few ``Trainer.fit`` calls as possible (one if none fails).

        Returns one outcome per task, in order: a result, or a failure whose reason holds the
        exception's type, message and the innermost frame.

        ``on_outcome(task, outcome)`` is called once per task as soon as its outcome is final (a
        result right after its client's training, with the client's state already in ``store``,
        while the next clients still train), in the order the clients finish. ``more()``: once
        the given tasks are trained, further tasks to train in the same fit, one per call, until
        it returns ``None`` (their states must be in ``store``; their outcomes follow the given
        tasks' in the returned list). An exception either raises is not a client's failure: it
        stops the call.
        """
        ids = [t.client_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"one task per client and round: duplicate client ids in {ids}")
        outcomes: dict[int, ClientResult | ClientFailure] = {}
        every = list(tasks)
        pending = list(tasks)
        while True:
            if not pending and more is not None:
                nxt = more()
                if nxt is not None:
                    pending = [nxt]
                    every.append(nxt)
            if not pending:
                break
            ctrl = _RoundController(self, pending, store, on_outcome, more)
            try:
                trainer = self._make_trainer(ctrl)
                with quiet_lightning(), self._extra_loss_terms(trainer):
                    trainer.fit(self.module, train_dataloaders=ctrl.loader)
            except _MoreFailed as err:
                raise err.__cause__ from None  # type: ignore[misc]
            except Exception as err:  # a client's code failed: count it, go on with the others
                failed = ctrl.current_task
                if failed is None:
                    raise
                tb = traceback.extract_tb(err.__traceback__)
                where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
                reason = f"{type(err).__name__}: {err}{where}"
                log.warning("client %d failed in round %d: %s", failed.client_id, failed.round, reason)
                outcomes[failed.client_id] = ClientFailure(failed.round, failed.client_id, "error", reason)
                if on_outcome is not None:
                    on_outcome(failed, outcomes[failed.client_id])
            outcomes.update(ctrl.results)
            every.extend(ctrl.tasks[len(pending):])  # the tasks more() gave during the fit
            pending = [t for t in ctrl.tasks if t.client_id not in outcomes]
        return [outcomes[t.client_id] for t in every]

    def use_device(self, device: str) -> None:
        """Train on ``device`` from now on: ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"`` (the ``Trainer``'s
        ``accelerator`` and ``devices``; Lightning moves the module and batches there for each ``fit``).

        Raises:
            ConfigError: another device string.
        """
        kind, _, index = str(device).partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ConfigError(f"`device` can be cpu, cuda or cuda:<index>, got {device!r}")
        self.trainer_kwargs["accelerator"] = kind
        self.trainer_kwargs["devices"] = [int(index)] if index else 1

    # -------------------------------------------------------------- internals
    def _make_trainer(self, ctrl: _RoundController) -> pl.Trainer:
        kwargs = trainer_defaults(
            {"log_every_n_steps": 1_000_000, **self.trainer_kwargs}, max_epochs=len(ctrl.schedule), callbacks=[ctrl, *self.callbacks]
        )
        with quiet_lightning():
            return pl.Trainer(**kwargs)

    @contextlib.contextmanager
    def _extra_loss_terms(self, trainer: pl.Trainer) -> Iterator[None]:
        """While training, add the module's and the callbacks' extra loss terms to the loss.

        Contributors: ``module.federated_extra_loss()`` (a mixin method) and
        ``FederatedCallback.extra_loss(trainer, module, ctx)``; each returns a scalar tensor (or
        ``None``) that is added to what ``training_step`` returns, so its gradient flows through
        autograd with the task loss. Nothing is wrapped when nobody contributes.
        """
        module = self.module
        callbacks = [cb for cb in self._federated_callbacks(trainer) if type(cb).extra_loss is not FederatedCallback.extra_loss]
        own = type(module).federated_extra_loss is not FederatedModuleMixin.federated_extra_loss
        if not callbacks and not own:
            yield
            return
        if not module.automatic_optimization:
            raise ConfigError(
                f"extra loss terms need automatic optimization; {type(module).__name__} sets "
                "`automatic_optimization = False`: add the terms to your own loss instead"
            )
        step = module.training_step
        ctrl = next(cb for cb in trainer.callbacks if isinstance(cb, _RoundController))

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            terms = [module.federated_extra_loss()] if own else []
            run = ctrl.running
            if run is not None:
                terms += [cb.extra_loss(trainer, module, run.ctx) for cb in callbacks]
            terms = [t for t in terms if t is not None]
            if not terms or out is None:
                return out
            extra = torch.stack([t.reshape(()) for t in terms]).sum()
            if isinstance(out, Mapping):
                return {**out, "loss": out["loss"] + extra}
            return out + extra

        object.__setattr__(module, "training_step", training_step)
        try:
            yield
        finally:
            object.__delattr__(module, "training_step")

    def _federated_callbacks(self, trainer: pl.Trainer) -> list[FederatedCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, FederatedCallback)]

    def load_task(self, module: Any, task: ClientTask, state: dict[str, Any]) -> None:
        """Load ``task``'s weights into ``module`` as a client does before training: decode the
        weight format, reshape a sub-model's layers, then load the client's local tensors from
        its persistent ``state`` (or the module's initial ones)."""
        weights = self._task_weights(module, task)
        own = module.state_dict(keep_vars=True)
        changed = {k: tuple(v.shape) for k, v in weights.items() if k in own and own[k].shape != v.shape}
        if changed:
            if not weights_format_of(task.config).reshapes:
                bad = next(iter(changed))
                raise ClientError(
                    f"task of client {task.client_id}: tensor {bad!r} has shape {changed[bad]}, the module has "
                    f"{tuple(own[bad].shape)} (only weights_format='submodel' tasks may change shapes)"
                )
            from lightning_fedprune.core.plans import resize_module

            # a structured sub-model: reshape the network to the received tensors (new Parameters;
            # the optimizer is rebuilt right after this by the caller)
            resize_module(module, changed)
        module.load_federated_state(weights)
        local = state.get(LOCAL_STATE_KEY) or self._initial_local
        if local:
            module.load_federated_state(local, strict=False)

    def _task_weights(self, module: Any, task: ClientTask) -> Mapping[str, torch.Tensor]:
        """The task's weights as tensors for ``module``, decoded by the codec its
        ``config["weights_format"]`` names (:data:`~lightning_fedprune.core.contract.WEIGHTS_FORMATS`:
        ``"dense"``, ``"submodel"``, PruneFL's ``"coo"``, or any registered format)."""
        try:
            fmt = weights_format_of(task.config)
        except PayloadError as err:
            raise ClientError(f"task of client {task.client_id}: {err}") from None
        return fmt.decode(task.weights, {k: tuple(v.shape) for k, v in module.federated_state().items()})

    def layout(self) -> Any:
        """The :class:`~lightning_fedprune.core.plans.Layout` of the module at its FULL shape.

        Built once (a copy of the module restored to its initial shapes is traced), so a client can
        read a task's kept channels (``config["kept"]``) in full-model coordinates.
        """
        if self._layout is None:
            from lightning_fedprune.core.plans import resize_module

            full = copy.deepcopy(self.module).cpu()  # traced on the CPU, also while a GPU fit runs
            resize_module(full, self._full_shapes)
            self._layout = build_planner(full).layout
        return self._layout

    def _task_plan(self, task: ClientTask) -> Any:
        """The task's kept channels as a :class:`~lightning_fedprune.core.plans.Plan` (``None``
        when the task carries none)."""
        data = task.config.get(KEPT)
        if data is None:
            return None
        try:
            return decode_kept_groups(data, self.layout())
        except PayloadError as err:
            raise ClientError(f"task of client {task.client_id}: `{KEPT}`: {err}") from None

    def _shape_key(self, module: torch.nn.Module) -> tuple:
        return tuple(tuple(p.shape) for p in module.parameters())

    def _measure_flops(self, module: Any, batch: Any) -> None:
        key = self._shape_key(module)
        if key not in self._flops_cache:
            try:
                example = module.federated_example_input(batch)
                self._flops_cache[key] = count_flops_per_example(module, example)
            except Exception as err:  # FLOPs are an estimate for the clock; never fail training on them
                log.warning("could not count FLOPs of %s (%s); charging 2 x parameters per example", type(module).__name__, err)
                self._flops_cache[key] = 2.0 * sum(p.numel() for p in module.parameters())

    def _flops_per_example(self, module: Any) -> float:
        key = self._shape_key(module)
        if key not in self._flops_cache:
            example = module.federated_example_input()
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            if device.type != "cpu":  # a module training on a GPU
                example = move_data_to_device(example, device)
            self._flops_cache[key] = count_flops_per_example(module, example)
        return self._flops_cache[key]
