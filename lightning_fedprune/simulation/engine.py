"""The in-process simulation transport: simulated devices, a simulated clock, real payloads.

:class:`SimulationTransport` moves tasks and results between the round driver and a
:class:`~lightning_fedprune.runtime.ClientRuntime` exactly as a real transport would: every task
and result is encoded to bytes and decoded (with validation) on the other side, so the bytes
charged to the simulated network are the real payload bytes, and a result that would be rejected
by a real server is rejected here too. Arrival times come from each client's device profile
(:func:`~lightning_fedprune.core.devices.round_time`: download + compute + upload); the round
ends as the round rules say (:class:`~lightning_fedprune.core.rounds.RoundRules`, the same rules a
FedML server applies to real arrival times)::

    candidates = devices that are up this round              (seeded by (seed, "avail", round))
    dropouts   = selected devices that fail this round       (seeded by (seed, "dropout", round, client))
    outcomes   = runtime.run_many(remaining tasks)           (errors -> counted failures)
    arrival    = download + compute + upload time on the client's device
    sync / deadline: rules.close(arrivals) -> on time, late, round time
    async: tasks stay in flight; the round takes the first async_m arrivals

:class:`SimulationEngine` is the :class:`~lightning_fedprune.driver.RoundDriver` with this transport:
the loop, evaluation, checkpoints, early stop and listeners are the driver's. A run can be
checkpointed after any round and resumed: the resumed run ends bit-identical to an uninterrupted
one, because every random choice derives from (seed, round, client).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.devices import DeviceProfile, make_devices, round_time
from lightning_fedprune.core.messages import (
    ClientFailure,
    ClientResult,
    ClientTask,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from lightning_fedprune.core.rounds import MODES, RoundRules, first_arrivals
from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.driver import CHECKPOINT_NAME, RoundDriver, RoundOutcome
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.evaluation import GlobalEvaluator
from lightning_fedprune.runtime import initialize_strategy
from lightning_fedprune.simulation.parallel import ParallelClients, resolve_devices

log = logging.getLogger(__name__)

__all__ = ["SimulationEngine", "SimulationTransport", "build_engine", "build_run", "CHECKPOINT_NAME", "MODES"]


@dataclass
class _Flight:
    """A task on its way (async mode): issued at ``issue`` (sim seconds), arrives at ``arrival``."""

    round: int
    client_id: int
    issue: float
    arrival: float
    bytes_up: int
    blob: bytes


@dataclass
class _Started:
    """A round whose tasks are sent (:meth:`SimulationTransport.start`); ``replies`` is ``None``
    while the workers train them."""

    round: int
    tasks: list[ClientTask]
    rules: RoundRules
    failures: list[ClientFailure]
    to_run: list[ClientTask]
    bytes_down: dict[int, int]
    replies: dict[int, bytes | ClientFailure] | None


class SimulationTransport:
    """Runs a round's tasks in this process on simulated devices (see the module docstring).

    Args:
        runtime: the client runtime that trains tasks.
        devices: one :class:`~lightning_fedprune.core.devices.DeviceProfile` per client.
        expected: ``strategy.expected_result`` (task -> what a valid result holds).
        seed: run seed (availability and dropout draws).
        max_message_bytes: reject results larger than this (default: no limit).
        client_memory_budget: bytes of client states kept in memory (see
            :class:`~lightning_fedprune.core.client_store.ClientStore`).
        workers: train a round's clients in this many worker processes
            (:class:`~lightning_fedprune.simulation.parallel.ParallelClients`; bit-identical
            results), or ``"auto"`` (the usable cores; on CUDA ``workers_per_gpu`` x the GPUs);
            1 trains them here, one after another.
        accelerator: where clients train: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when a GPU
            is visible); see :func:`~lightning_fedprune.simulation.parallel.resolve_devices`.
        workers_per_gpu: on CUDA, worker processes that share each GPU.

    Attributes:
        store: the clients' persistent states (checkpointed with the run).
    """

    name = "simulation"

    def __init__(
        self,
        *,
        runtime: Any,
        devices: Sequence[DeviceProfile],
        expected: Callable[[ClientTask], tuple[Any, Any]],
        seed: int = 0,
        max_message_bytes: int | None = None,
        workers: int | str = 1,
        client_memory_budget: int | None = None,
        accelerator: str = "cpu",
        workers_per_gpu: int = 1,
    ) -> None:
        self.runtime = runtime
        #: the device each worker trains on ("cpu", "cuda:<i>")
        self.worker_devices = resolve_devices(accelerator, workers, workers_per_gpu=workers_per_gpu)
        self.workers = len(self.worker_devices)
        self.executor: Any = runtime
        if self.workers > 1:
            self.executor = ParallelClients(runtime, devices=self.worker_devices, max_message_bytes=max_message_bytes)
        elif self.worker_devices[0] != "cpu":
            runtime.use_device(self.worker_devices[0])
        self.devices = list(devices)
        self.expected = expected
        self.seed = int(seed)
        self.max_message_bytes = max_message_bytes
        self.store = ClientStore(memory_budget=client_memory_budget)
        self._now = 0.0  # simulated seconds since the run started
        self._inflight: dict[int, _Flight] = {}  # async mode: client -> its task in progress

    # -------------------------------------------------------------- the driver's interface
    def candidates(self, rnd: int) -> list[int]:
        """Clients whose device is up this round (seeded draw against ``availability``)."""
        up_draw = rng_for(self.seed, "avail", rnd).random(len(self.devices))
        return [c for c, dev in enumerate(self.devices) if up_draw[c] < dev.availability]

    def in_flight(self) -> set[int]:
        return set(self._inflight)

    def execute(self, rnd: int, tasks: Sequence[ClientTask], rules: RoundRules) -> RoundOutcome:
        return self.finish(self.start(rnd, tasks, rules))

    # -------------------------------------------------------------- overlapped rounds
    def can_overlap(self, rules: RoundRules) -> bool:
        """Rounds can be started ahead (see :class:`~lightning_fedprune.driver.OverlappingTransport`)
        with worker processes in sync and deadline mode; async rounds and clients trained in this
        process run one after the other."""
        return rules.mode != "async" and isinstance(self.executor, ParallelClients)

    def start(self, rnd: int, tasks: Sequence[ClientTask], rules: RoundRules) -> _Started:
        """Send the round's tasks: draw dropouts, hand the others to the workers (or, in this
        process, train them now), encode every task to charge its bytes.

        Nothing here changes :meth:`state_dict` (the clients' states change in :meth:`finish`).
        """
        failures: list[ClientFailure] = []
        to_run = []
        for task in tasks:
            dev = self.devices[task.client_id]
            if dev.failure_prob > 0 and rng_for(self.seed, "dropout", rnd, task.client_id).random() < dev.failure_prob:
                failures.append(ClientFailure(rnd, task.client_id, "dropout", f"device dropped out (simulated, p={dev.failure_prob:g})"))
                continue
            to_run.append(task)
        parallel = isinstance(self.executor, ParallelClients)
        if parallel and to_run:
            # the workers receive and decode the tasks themselves (a round's shared global model
            # once per worker); while they train, the tasks are encoded here to charge their bytes
            self.executor.submit(to_run, self.store)
        sent = {task.client_id for task in to_run}
        bytes_down: dict[int, int] = {}
        received = []  # in this process: the tasks as a client decodes them
        for task in tasks:
            blob = encode_task(task)
            bytes_down[task.client_id] = len(blob)
            if not parallel and task.client_id in sent:
                received.append(decode_task(blob, expect_round=rnd, expect_client=task.client_id))
        replies: dict[int, bytes | ClientFailure] | None = None
        if not parallel:
            replies = {}
            if received:
                for task, out in zip(received, self.executor.run_many(received, self.store)):
                    replies[task.client_id] = out if isinstance(out, ClientFailure) else encode_result(out)
        elif not to_run:
            replies = {}
        return _Started(rnd, list(tasks), rules, failures, to_run, bytes_down, replies)

    def finish(self, started: _Started) -> RoundOutcome:
        """Collect a round from :meth:`start`: validate the results, end the round by the rules."""
        rnd, rules, tasks = started.round, started.rules, started.tasks
        decoded: dict[int, tuple[bytes, ClientResult | PayloadError]] = {}
        if started.replies is not None:
            replies = started.replies
        else:
            # each result is decoded as it comes, while the workers train the other clients
            by_client = {t.client_id: t for t in started.to_run}

            def decode_early(cid: int, blob: bytes) -> None:
                task = by_client.get(cid)
                if task is None:
                    return
                try:
                    decoded[cid] = (blob, self._decode(rnd, task, blob))
                except Exception:  # decoded again (and raised) where a late decode would be
                    pass

            replies = self.executor.collect(self.store, on_result=decode_early)
        failures, bytes_down = started.failures, started.bytes_down
        rejected_up, arrivals = self._receive(
            rnd, started.to_run, replies, bytes_down, failures, keep_in_flight=rules.mode == "async", decoded=decoded,
        )
        if rules.mode == "async":
            out = self._async_collect(rnd, rules, failures)
        else:
            times = {res.client_id: t for res, _, t in arrivals}
            on_time, late, seconds, deadline = rules.close(times, len(tasks))
            late_set = set(late)
            results = [dataclasses.replace(res, completion_time=times[res.client_id]) for res, _, _ in arrivals if res.client_id not in late_set]
            for c in late:
                failures.append(ClientFailure(rnd, c, "deadline", f"arrived at {times[c]:.3f}s, after the deadline {deadline:.3f}s"))
            extra: dict[str, Any] = {}
            if rules.mode == "deadline" and times:
                extra = {"deadline": deadline, "num_late": len(late)}
            up = {res.client_id: b for res, b, _ in arrivals}
            out = RoundOutcome(results, failures, seconds, sum(up.values()), 0, late=late, extra=extra)
        out.bytes_up += sum(rejected_up.values())  # a rejected upload still crossed the network
        out.bytes_down = sum(bytes_down.values())
        self._now += out.seconds
        return out

    def discard(self, started: _Started, *, wait: bool = True) -> None:
        """Drop a round from :meth:`start`: keep nothing of it (the clients' states stay as they
        were); ``wait``: let its workers finish, else stop them at once."""
        if started.replies is None:
            self.executor.discard(wait=wait)

    # -------------------------------------------------------------- round pieces
    def _receive(
        self, rnd: int, to_run: Sequence[ClientTask], replies: Mapping[int, bytes | ClientFailure], bytes_down: Mapping[int, int],
        failures: list[ClientFailure], *, keep_in_flight: bool,
        decoded: Mapping[int, tuple[bytes, ClientResult | PayloadError]] | None = None,
    ) -> tuple[dict[int, int], list[tuple[ClientResult, int, float]]]:
        """Receive and validate the results (each decoded once, whoever trained it), in task order.

        Failures go to ``failures``. ``decoded``: results already decoded as they came (client ->
        the bytes and what :meth:`_decode` gave for them). Returns the bytes of rejected uploads and
        ``(result, bytes_up, seconds)`` per valid result (seconds: download + compute + upload on
        the client's device).
        """
        arrivals: list[tuple[ClientResult, int, float]] = []
        rejected_up: dict[int, int] = {}
        for task in to_run:
            cid = task.client_id
            blob = replies[cid]
            if isinstance(blob, ClientFailure):
                failures.append(blob)
                continue
            early = decoded.get(cid) if decoded else None
            res = early[1] if early is not None and early[0] is blob else self._decode(rnd, task, blob)
            if isinstance(res, PayloadError):
                err = res
                log.warning("round %d: result of client %d rejected: %s", rnd, cid, err)
                failures.append(ClientFailure(rnd, cid, "rejected", str(err)))
                rejected_up[cid] = len(blob)
                continue
            seconds = round_time(self.devices[cid], flops=res.metrics.flops, bytes_down=bytes_down[cid], bytes_up=len(blob))
            if keep_in_flight:
                self._inflight[cid] = _Flight(rnd, cid, self._now, self._now + seconds, len(blob), blob)
            arrivals.append((res, len(blob), seconds))
        return rejected_up, arrivals

    def _decode(self, rnd: int, task: ClientTask, blob: bytes) -> ClientResult | PayloadError:
        """A result validated against its task (what the strategy expects back), or why it is refused."""
        w_spec, x_spec = self.expected(task)
        try:
            return decode_result(
                blob, expect_round=rnd, expect_client=task.client_id, expect_weights=w_spec, expect_extras=x_spec,
                max_bytes=self.max_message_bytes,
            )
        except PayloadError as err:
            return err

    def _async_collect(self, rnd: int, rules: RoundRules, failures: list[ClientFailure]) -> RoundOutcome:
        """The first ``async_m`` arrivals among all tasks in flight."""
        assert rules.async_m is not None
        chosen = first_arrivals(((f.arrival, f.client_id) for f in self._inflight.values()), rules.async_m)
        results: list[ClientResult] = []
        bytes_up = 0
        end = self._now
        for _, cid in chosen:
            f = self._inflight.pop(cid)
            res = decode_result(f.blob, expect_round=f.round, expect_client=f.client_id)
            results.append(dataclasses.replace(res, completion_time=f.arrival - f.issue))
            bytes_up += f.bytes_up
            end = max(end, f.arrival)
        stale = [rnd - r.round for r in results]
        extra = {
            "staleness_mean": sum(stale) / len(stale) if stale else math.nan,
            "staleness_max": float(max(stale)) if stale else math.nan,
            "num_in_flight": len(self._inflight),
        }
        return RoundOutcome(results, failures, end - self._now, bytes_up, 0, extra=extra)

    def close(self) -> None:
        """Stop the worker processes, if any (they start again when needed)."""
        if self.executor is not self.runtime:
            self.executor.close()

    # -------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "clients": self.store.state_dict(),
            "now": self._now,
            "inflight": {
                str(f.client_id): {
                    "round": f.round,
                    "issue": f.issue,
                    "arrival": f.arrival,
                    "bytes_up": f.bytes_up,
                    "blob": torch.frombuffer(bytearray(f.blob), dtype=torch.uint8) if f.blob else torch.zeros(0, dtype=torch.uint8),
                }
                for f in self._inflight.values()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.store.load_state_dict(state["clients"])
        self._now = float(state.get("now", 0.0))
        self._inflight = {
            int(c): _Flight(int(f["round"]), int(c), float(f["issue"]), float(f["arrival"]), int(f["bytes_up"]), f["blob"].numpy().tobytes())
            for c, f in state.get("inflight", {}).items()
        }


class SimulationEngine(RoundDriver):
    """Runs federated rounds in one process with simulated heterogeneous devices.

    The :class:`~lightning_fedprune.driver.RoundDriver` over a :class:`SimulationTransport`.

    Args:
        strategy: the server strategy (initialized here with
            :func:`~lightning_fedprune.runtime.initialize_strategy` from the runtime's module if
            it is not yet).
        runtime: the client runtime that trains tasks.
        data: the federated dataset (its ``test_loader()`` is the global test set).
        devices: one :class:`DeviceProfile` per client (default: :func:`make_devices` with ``seed``).
        seed: run seed (client availability, dropouts; the runtime's seed drives data order).
        eval_every: evaluate the global model every this many rounds (and after the last one).
        target_accuracy: stop early once the global test accuracy reaches it.
        run_dir: where checkpoints go (``checkpoint.safetensors``); ``None`` keeps nothing on disk.
        checkpoint_every: save a checkpoint every this many rounds (needs ``run_dir``).
        listeners: objects with optional ``on_run_start(info)``, ``on_round_end(record)``,
            ``on_run_end(summary)`` methods (progress bars, metric writers, plots) and Lightning
            loggers; ``None``: the CLI's rich progress bar and table on a terminal or in a
            notebook (see :class:`~lightning_fedprune.driver.RoundDriver`), else nothing.
        perplexity: report perplexity too (language models).
        max_message_bytes: reject results larger than this (default: no limit).
        mode, deadline_fraction, deadline_factor, deadline_backoff, async_m, join_rounds: the
            round rules (:class:`~lightning_fedprune.core.rounds.RoundRules`).
        workers: worker processes that train a round's clients side by side (bit-identical
            results; see :class:`SimulationTransport`); ``"auto"``: the usable cores.
        accelerator, workers_per_gpu: where clients train (see :class:`SimulationTransport`).
        client_memory_budget: bytes of clients' persistent states kept in memory; the least
            recently used beyond it are spilled to a temporary folder (``None``: no limit).
        overlap_eval: with worker processes in sync and deadline mode, :meth:`run` sends each
            round's tasks to the workers before evaluating and checkpointing the previous round,
            which this process then does while they train (same records, checkpoints and
            results; see :mod:`lightning_fedprune.driver`). ``False``: one round after the other.
    """

    def __init__(
        self,
        *,
        strategy: Any,
        runtime: Any,
        data: Any,
        devices: Sequence[DeviceProfile] | None = None,
        seed: int = 0,
        eval_every: int = 1,
        target_accuracy: float | None = None,
        run_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        listeners: Sequence[Any] | None = None,
        perplexity: bool = False,
        max_message_bytes: int | None = None,
        mode: str = "sync",
        deadline_fraction: float = 0.85,
        deadline_factor: float = 1.5,
        deadline_backoff: int = 1,
        async_m: int | None = None,
        join_rounds: Mapping[int, int] | None = None,
        workers: int | str = 1,
        client_memory_budget: int | None = None,
        accelerator: str = "cpu",
        workers_per_gpu: int = 1,
        overlap_eval: bool = True,
    ) -> None:
        rules = RoundRules(
            mode=mode, deadline_fraction=deadline_fraction, deadline_factor=deadline_factor,
            deadline_backoff=deadline_backoff, async_m=async_m, join_rounds=dict(join_rounds or {}),
        )
        num_clients = int(data.num_clients)
        devices = list(devices) if devices is not None else make_devices(num_clients, seed=seed)
        if len(devices) != num_clients:
            raise ConfigError(f"{len(devices)} device profiles for {num_clients} clients")
        rules.check_clients(num_clients)
        evaluator = GlobalEvaluator(copy.deepcopy(runtime.module), data.test_loader(), perplexity=perplexity)
        if not strategy.initialized:
            initialize_strategy(strategy, runtime.module, num_clients=num_clients, data=data)
        transport = SimulationTransport(
            runtime=runtime, devices=devices, expected=strategy.expected_result, seed=seed, max_message_bytes=max_message_bytes,
            workers=workers, client_memory_budget=client_memory_budget, accelerator=accelerator, workers_per_gpu=workers_per_gpu,
        )
        super().__init__(
            strategy=strategy, transport=transport, rules=rules, num_clients=num_clients, seed=seed, evaluator=evaluator,
            eval_every=eval_every, target_accuracy=target_accuracy, run_dir=run_dir, checkpoint_every=checkpoint_every,
            listeners=listeners, overlap_eval=overlap_eval,
        )
        self.data = data
        self.perplexity = bool(perplexity)

    def rounds_done(self) -> None:
        """Stop the worker processes at the end of :meth:`run`."""
        self.transport.close()

    def close(self) -> None:
        """Stop the worker processes, if any."""
        self.transport.close()

    # the parts, for inspection
    @property
    def runtime(self) -> Any:
        return self.transport.runtime

    @property
    def devices(self) -> list[DeviceProfile]:
        return self.transport.devices

    @property
    def store(self) -> ClientStore:
        return self.transport.store

    @store.setter
    def store(self, store: ClientStore) -> None:
        self.transport.store = store

    @property
    def eval_module(self) -> Any:
        return self.evaluator.module

    @property
    def mode(self) -> str:
        return self.rules.mode

    @property
    def async_m(self) -> int | None:
        return self.rules.async_m


def build_engine(cfg: Any, listeners: Sequence[Any] | None = None) -> SimulationEngine:
    """A :class:`SimulationEngine` for a recipe (a :class:`~lightning_fedprune.config.RecipeConfig`).

    The parts come from :func:`lightning_fedprune.config.build_parts` (role ``"simulation"``);
    ``listeners`` default to :func:`~lightning_fedprune.config.default_listeners` of the run folder;
    the recipe's ``loggers`` are added (:func:`~lightning_fedprune.config.recipe_listeners`).
    Run it with ``engine.run(cfg.rounds, resume=...)``.
    """
    from lightning_fedprune.config.build import build_parts, default_listeners, recipe_listeners

    parts = build_parts(cfg, role="simulation")
    run_dir = cfg.resolved_run_dir()
    e = cfg.engine
    engine = SimulationEngine(
        strategy=parts.strategy,
        runtime=parts.runtime,
        data=parts.data,
        devices=parts.devices,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        target_accuracy=cfg.target_accuracy,
        run_dir=run_dir,
        checkpoint_every=cfg.checkpoint_every,
        listeners=[*(listeners if listeners is not None else default_listeners(run_dir)), *recipe_listeners(cfg)],
        perplexity=parts.perplexity,
        mode=e.mode,
        async_m=e.async_m,
        deadline_fraction=e.deadline_fraction,
        deadline_factor=e.deadline_factor,
        deadline_backoff=e.deadline_backoff,
        join_rounds=dict(e.join_rounds),
        workers=e.workers,
        accelerator=e.accelerator,
        workers_per_gpu=e.workers_per_gpu,
        overlap_eval=e.overlap_eval,
        client_memory_budget=None if e.client_memory_mb is None else int(e.client_memory_mb * 2**20),
    )
    return engine


def build_run(cfg: Any, listeners: Sequence[Any] | None = None) -> tuple[SimulationEngine, int]:
    """``(build_engine(cfg, listeners), cfg.rounds)``: run it with ``engine.run(rounds, resume=...)``."""
    return build_engine(cfg, listeners=listeners), cfg.rounds
