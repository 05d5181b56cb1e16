"""The in-process simulation transport: rounds, simulated clock, failures, checkpoints.

The engine moves tasks and results between a :class:`~lightning_fedprune.strategies.Strategy`
and a :class:`~lightning_fedprune.runtime.ClientRuntime` exactly as a real transport would: every
task and result is encoded to bytes and decoded (with validation) on the other side, so the bytes
charged to the simulated network are the real payload bytes, and a result that would be rejected
by a real server is rejected here too.

A round::

    available  = devices that are up this round          (seeded by (seed, "avail", round))
    tasks      = strategy.configure_round(round, available)
    dropouts   = selected devices that fail this round   (seeded by (seed, "dropout", round, client))
    outcomes   = runtime.run_many(remaining tasks)       (errors -> counted failures)
    metrics    = strategy.aggregate(round, results, failures)
    clock     += max over delivered results of (download + compute + upload time)

Round modes (``mode=``):

* ``"sync"``: the round ends when the slowest participant delivers (FedAvg, FedMP's Eq. 6).
* ``"deadline"``: FedMP's fault-tolerant rounds: ``d`` is the time by which a fraction
  (``deadline_fraction``, 85%) of the selected clients delivered; the deadline is
  ``deadline_factor * d`` (1.5 d). Later results are dropped for that round (failures of kind
  ``"deadline"``) and their clients sit out ``deadline_backoff`` rounds before they are asked again.
* ``"async"``: FedMP's Algorithm 2: every idle client gets a task; a round aggregates the first
  ``async_m`` arrivals; the others keep training and arrive in later rounds, with their staleness
  (aggregation round minus the round their task was issued in) recorded.

Clients may join mid-training (``join_rounds``: client -> first round it is available).

A run can be checkpointed after any round and resumed: the resumed run ends bit-identical to an
uninterrupted one, because every random choice derives from (seed, round, client).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import (
    ClientFailure,
    ClientResult,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.core.serialization import load_state, save_state
from lightning_fedprune.errors import AllClientsFailedError, ConfigError, PayloadError
from lightning_fedprune.evaluation import evaluate
from lightning_fedprune.reporting import round_outcome_fields
from lightning_fedprune.simulation.devices import DeviceProfile, make_devices, round_time
from lightning_fedprune.strategies.base import ModelSpec, Strategy

log = logging.getLogger(__name__)

__all__ = ["SimulationEngine", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = 1
MODES = ("sync", "deadline", "async")


@dataclass
class _Flight:
    """A task on its way (async mode): issued at ``issue`` (sim seconds), arrives at ``arrival``."""

    round: int
    client_id: int
    issue: float
    arrival: float
    bytes_up: int
    blob: bytes | None  # the validated encoded result; None for a failure
    failure: ClientFailure | None = None


class SimulationEngine:
    """Runs federated rounds in one process with simulated heterogeneous devices.

    Args:
        strategy: the server strategy (initialized here from the runtime's module if it is not).
        runtime: the client runtime that trains tasks.
        data: the federated dataset (its ``test_loader()`` is the global test set).
        devices: one :class:`DeviceProfile` per client (default: :func:`make_devices` with ``seed``).
        seed: run seed (client availability, dropouts; the runtime's seed drives data order).
        eval_every: evaluate the global model every this many rounds (and after the last one).
        target_accuracy: stop early once the global test accuracy reaches it.
        run_dir: where checkpoints go (``checkpoint.safetensors``); ``None`` keeps nothing on disk.
        checkpoint_every: save a checkpoint every this many rounds (needs ``run_dir``).
        listeners: objects with optional ``on_run_start(info)``, ``on_round_end(record)``,
            ``on_run_end(summary)`` methods (progress bars, metric writers, plots).
        perplexity: report perplexity too (language models).
        max_message_bytes: reject results larger than this (default: no limit).
        mode: ``"sync"``, ``"deadline"`` or ``"async"`` (see the module docstring).
        deadline_fraction: deadline mode: the fraction of selected clients whose arrival sets ``d``.
        deadline_factor: deadline mode: the deadline is this times ``d``.
        deadline_backoff: deadline mode: rounds a late client sits out before it is asked again.
        async_m: async mode: results aggregated per round (the first ``m`` arrivals).
        join_rounds: client id -> the first round in which the client exists (joins mid-training).
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        runtime: Any,
        data: Any,
        devices: Sequence[DeviceProfile] | None = None,
        seed: int = 0,
        eval_every: int = 1,
        target_accuracy: float | None = None,
        run_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        listeners: Sequence[Any] = (),
        perplexity: bool = False,
        max_message_bytes: int | None = None,
        mode: str = "sync",
        deadline_fraction: float = 0.85,
        deadline_factor: float = 1.5,
        deadline_backoff: int = 1,
        async_m: int | None = None,
        join_rounds: Mapping[int, int] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"`mode` must be one of {MODES}, got {mode!r}")
        if not 0.0 < deadline_fraction <= 1.0:
            raise ConfigError(f"`deadline_fraction` must be in (0, 1], got {deadline_fraction}")
        if not (math.isfinite(deadline_factor) and deadline_factor >= 1.0):
            raise ConfigError(f"`deadline_factor` must be >= 1, got {deadline_factor}")
        if deadline_backoff < 0:
            raise ConfigError(f"`deadline_backoff` must be >= 0, got {deadline_backoff}")
        if mode == "async" and (async_m is None or async_m < 1):
            raise ConfigError(f"async mode needs `async_m` >= 1 (results aggregated per round), got {async_m}")
        if eval_every < 1:
            raise ConfigError(f"`eval_every` must be >= 1, got {eval_every}")
        if checkpoint_every < 1:
            raise ConfigError(f"`checkpoint_every` must be >= 1, got {checkpoint_every}")
        if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
            raise ConfigError(f"`target_accuracy` must be in (0, 1], got {target_accuracy}")
        self.strategy = strategy
        self.runtime = runtime
        self.data = data
        self.num_clients = int(data.num_clients)
        self.devices = list(devices) if devices is not None else make_devices(self.num_clients, seed=seed)
        if len(self.devices) != self.num_clients:
            raise ConfigError(f"{len(self.devices)} device profiles for {self.num_clients} clients")
        self.seed = int(seed)
        self.eval_every = int(eval_every)
        self.target_accuracy = target_accuracy
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.listeners = list(listeners)
        self.perplexity = bool(perplexity)
        self.max_message_bytes = max_message_bytes
        self.mode = mode
        self.deadline_fraction = float(deadline_fraction)
        self.deadline_factor = float(deadline_factor)
        self.deadline_backoff = int(deadline_backoff)
        self.async_m = int(async_m) if async_m is not None else None
        self.join_rounds = {int(c): int(r) for c, r in (join_rounds or {}).items()}
        bad = [c for c in self.join_rounds if not 0 <= c < self.num_clients]
        if bad:
            raise ConfigError(f"`join_rounds` names clients {bad} outside 0..{self.num_clients - 1}")
        self.store = ClientStore()
        self.eval_module = copy.deepcopy(runtime.module)
        if getattr(strategy, "_global", None) is None:
            module = runtime.module
            planner = None
            if getattr(strategy, "requires_planner", False):
                from lightning_fedprune.runtime import build_planner

                planner = build_planner(module, _example_input(module, data))
            strategy.initialize(
                ModelSpec(
                    state={k: v.clone() for k, v in module.federated_state().items()},
                    trainable=module.trainable_names(),
                    planner=planner,
                ),
                num_clients=self.num_clients,
            )
        self.history: list[dict[str, Any]] = []
        self.next_round = 0
        self._clock = 0.0
        self._wall = 0.0
        self._cpu = 0.0
        self._cum_up = 0
        self._cum_down = 0
        self._benched: dict[int, int] = {}  # deadline mode: client -> first round it is asked again
        self._inflight: dict[int, _Flight] = {}  # async mode: client -> its task in progress

    # ------------------------------------------------------------------ running
    def run(self, num_rounds: int, *, resume: bool = False) -> dict[str, Any]:
        """Run rounds until ``num_rounds`` rounds in total are done (or the target is reached).

        Args:
            num_rounds: total rounds of the run (a resumed run continues up to it).
            resume: continue from ``run_dir/checkpoint.safetensors`` when it exists.

        Returns:
            The run summary (see :func:`lightning_fedprune.reporting.summarize`).

        Raises:
            AllClientsFailedError: every client selected in a round failed.
        """
        if resume:
            path = self._checkpoint_path()
            if path is not None and path.exists():
                self.load_checkpoint(path)
                log.info("resumed from %s at round %d", path, self.next_round)
            else:
                log.info("nothing to resume at %s; starting afresh", path)
        self._emit("on_run_start", {
            "num_rounds": int(num_rounds),
            "start_round": self.next_round,
            "strategy": type(self.strategy).__name__,
            "num_clients": self.num_clients,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        })
        stopped_early = self._reached_target()
        while self.next_round < num_rounds and not stopped_early:
            rnd = self.next_round
            record = self.run_round(rnd, last=(rnd == num_rounds - 1))
            stopped_early = self._reached_target()
            # listeners first: if the process dies before the checkpoint, the resumed run redoes
            # this round and the metric writers drop what they wrote for it
            self._emit("on_round_end", record)
            if self.run_dir is not None and ((rnd + 1) % self.checkpoint_every == 0 or rnd == num_rounds - 1 or stopped_early):
                self.save_checkpoint()
        summary = self.summary(stopped_early=stopped_early)
        self._emit("on_run_end", summary)
        return summary

    def run_round(self, rnd: int, *, last: bool = False) -> dict[str, Any]:
        """Run one round and return its record (also appended to :attr:`history`)."""
        if rnd != self.next_round:
            raise ConfigError(f"round {rnd} requested but the next round is {self.next_round}")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        available = self._available(rnd)
        if self.mode == "async":
            available = [c for c in available if c not in self._inflight]
        tasks = self.strategy.configure_round(rnd, available)
        bad = [t.client_id for t in tasks if t.client_id not in set(available) or t.round != rnd]
        if bad:
            raise ConfigError(f"{type(self.strategy).__name__} built tasks for unavailable clients or another round: {bad}")

        failures, bytes_down, rejected_up, arrivals = self._execute(rnd, tasks)
        extra: dict[str, Any] = {}
        if self.mode == "async":
            results, failures, bytes_up, round_sim, extra = self._async_collect(rnd, tasks, failures, arrivals)
            bytes_up.update(rejected_up)
        else:
            results = [res for res, _, _ in arrivals]
            bytes_up = {res.client_id: b for res, b, _ in arrivals}
            bytes_up.update(rejected_up)  # a rejected upload still crossed the network
            times = {res.client_id: t for res, _, t in arrivals}
            round_sim = max(times.values()) if times else 0.0
            if self.mode == "deadline" and times:
                results, failures, round_sim, extra = self._apply_deadline(rnd, len(tasks), results, failures, times)
            results = [dataclasses.replace(r, completion_time=times[r.client_id]) for r in results]

        if tasks and not results and not (self.mode == "async" and self._inflight):
            reasons = "; ".join(f"client {f.client_id}: {f.kind}: {f.reason}" for f in failures[:5])
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise AllClientsFailedError(f"round {rnd}: all {len(tasks)} selected clients failed, nothing to aggregate. {reasons}{more}")
        if not tasks and not results:
            log.warning("round %d: no client available or selected; the global model is unchanged", rnd)

        agg = self.strategy.aggregate(rnd, results, failures) if (results or failures) else {}
        self._clock += round_sim
        up, down = sum(bytes_up.values()), sum(bytes_down.values())
        self._cum_up += up
        self._cum_down += down

        record: dict[str, Any] = {
            "round": rnd,
            "sim_time": self._clock,
            "round_sim_time": round_sim,
            "bytes_up": up,
            "bytes_down": down,
            "cum_bytes": self._cum_up + self._cum_down,
            "num_selected": len(tasks),
            "num_results": len(results),
            "num_failures": len(failures),
        }
        record.update(extra)
        record.update(self._evaluate_global(rnd, last))
        record.update(round_outcome_fields(results, failures, agg))
        self._wall += time.perf_counter() - wall0
        self._cpu += time.process_time() - cpu0
        record["wall_time"] = self._wall
        record["cpu_time"] = self._cpu
        self.history.append(record)
        self.next_round = rnd + 1
        return record

    # ------------------------------------------------------------------ round pieces
    def _available(self, rnd: int) -> list[int]:
        """Clients that exist (joined), are up (seeded draw) and are not sitting out a deadline miss."""
        up_draw = rng_for(self.seed, "avail", rnd).random(self.num_clients)
        return [
            c
            for c in range(self.num_clients)
            if up_draw[c] < self.devices[c].availability
            and self.join_rounds.get(c, 0) <= rnd
            and self._benched.get(c, 0) <= rnd
        ]

    def _execute(
        self, rnd: int, tasks: Sequence[Any]
    ) -> tuple[list[ClientFailure], dict[int, int], dict[int, int], list[tuple[ClientResult, int, float]]]:
        """Send tasks (encoded), draw dropouts, train, receive and validate results.

        Returns the failures, bytes sent per client, bytes of rejected uploads, and
        ``(result, bytes_up, seconds)`` per valid result (seconds: download + compute + upload on
        the client's device).
        """
        failures: list[ClientFailure] = []
        bytes_down: dict[int, int] = {}
        to_run = []
        sent = {}
        for task in tasks:
            blob = encode_task(task)
            bytes_down[task.client_id] = len(blob)
            dev = self.devices[task.client_id]
            if dev.failure_prob > 0 and rng_for(self.seed, "dropout", rnd, task.client_id).random() < dev.failure_prob:
                failures.append(ClientFailure(rnd, task.client_id, "dropout", f"device dropped out (simulated, p={dev.failure_prob:g})"))
                continue
            received = decode_task(blob, expect_round=rnd, expect_client=task.client_id)
            to_run.append(received)
            sent[task.client_id] = task

        outcomes = self.runtime.run_many(to_run, self.store) if to_run else []
        arrivals: list[tuple[ClientResult, int, float]] = []
        rejected_up: dict[int, int] = {}
        for task, out in zip(to_run, outcomes):
            cid = task.client_id
            if isinstance(out, ClientFailure):
                failures.append(out)
                continue
            blob = encode_result(out)
            w_spec, x_spec = self.strategy.expected_result(sent[cid])
            try:
                res = decode_result(
                    blob, expect_round=rnd, expect_client=cid, expect_weights=w_spec, expect_extras=x_spec,
                    max_bytes=self.max_message_bytes,
                )
            except PayloadError as err:
                log.warning("round %d: result of client %d rejected: %s", rnd, cid, err)
                failures.append(ClientFailure(rnd, cid, "rejected", str(err)))
                rejected_up[cid] = len(blob)
                continue
            seconds = round_time(self.devices[cid], flops=res.metrics.flops, bytes_down=bytes_down[cid], bytes_up=len(blob))
            if self.mode == "async":
                self._inflight[cid] = _Flight(rnd, cid, self._clock, self._clock + seconds, len(blob), blob)
            arrivals.append((res, len(blob), seconds))
        return failures, bytes_down, rejected_up, arrivals

    def _apply_deadline(
        self, rnd: int, num_selected: int, results: list[ClientResult], failures: list[ClientFailure], times: dict[int, float]
    ) -> tuple[list[ClientResult], list[ClientFailure], float, dict[str, Any]]:
        """FedMP's deadline: ``d`` = arrival of the ceil(85%)-th selected client, deadline = 1.5 d.

        When fewer than that fraction delivered at all, ``d`` is the last arrival.
        """
        order = sorted(times.values())
        k = max(1, math.ceil(self.deadline_fraction * num_selected - 1e-9))
        d = order[k - 1] if len(order) >= k else order[-1]
        deadline = self.deadline_factor * d
        kept, late = [], []
        for r in results:
            (late if times[r.client_id] > deadline else kept).append(r)
        failures = list(failures)
        for r in late:
            failures.append(ClientFailure(rnd, r.client_id, "deadline", f"arrived at {times[r.client_id]:.3f}s, after the deadline {deadline:.3f}s"))
            self._benched[r.client_id] = rnd + 1 + self.deadline_backoff
        round_sim = deadline if late else max(times[r.client_id] for r in kept)
        return kept, failures, round_sim, {"deadline": deadline, "num_late": len(late)}

    def _async_collect(
        self, rnd: int, tasks: Sequence[Any], failures: list[ClientFailure], arrivals: list[tuple[ClientResult, int, float]]
    ) -> tuple[list[ClientResult], list[ClientFailure], dict[int, int], float, dict[str, Any]]:
        """Take the first ``async_m`` arrivals among all tasks in flight (ties: lower client id)."""
        assert self.async_m is not None
        flights = sorted(self._inflight.values(), key=lambda f: (f.arrival, f.client_id))
        chosen = flights[: self.async_m]
        results: list[ClientResult] = []
        bytes_up: dict[int, int] = {}
        now = self._clock
        for f in chosen:
            del self._inflight[f.client_id]
            assert f.blob is not None
            res = decode_result(f.blob, expect_round=f.round, expect_client=f.client_id)
            results.append(dataclasses.replace(res, completion_time=f.arrival - f.issue))
            bytes_up[f.client_id] = f.bytes_up
            now = max(now, f.arrival)
        stale = [rnd - r.round for r in results]
        extra = {
            "staleness_mean": sum(stale) / len(stale) if stale else math.nan,
            "staleness_max": float(max(stale)) if stale else math.nan,
            "num_in_flight": len(self._inflight),
        }
        return results, failures, bytes_up, now - self._clock, extra

    def _evaluate_global(self, rnd: int, last: bool) -> dict[str, float]:
        out = {"test_loss": math.nan, "test_accuracy": math.nan}
        if self.perplexity:
            out["test_perplexity"] = math.nan
        loader = self.data.test_loader()
        if loader is None or not ((rnd + 1) % self.eval_every == 0 or last):
            return out
        self.eval_module.load_federated_state(self.strategy.global_state)
        ev = evaluate(self.eval_module, loader, perplexity=self.perplexity)
        out["test_loss"], out["test_accuracy"] = ev["loss"], ev["accuracy"]
        if self.perplexity:
            out["test_perplexity"] = ev["perplexity"]
        return out

    def _reached_target(self) -> bool:
        if self.target_accuracy is None or not self.history:
            return False
        acc = self.history[-1].get("test_accuracy", math.nan)
        return bool(math.isfinite(acc) and acc >= self.target_accuracy)

    def summary(self, *, stopped_early: bool = False) -> dict[str, Any]:
        from lightning_fedprune.reporting import summarize

        out = summarize(self.history, target_accuracy=self.target_accuracy)
        out["stopped_early"] = bool(stopped_early)
        out["run_dir"] = str(self.run_dir) if self.run_dir else None
        return out

    def _emit(self, hook: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            fn = getattr(listener, hook, None)
            if callable(fn):
                fn(payload)

    # ------------------------------------------------------------------ checkpointing
    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: strategy, client states, clock, counters, history."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "next_round": self.next_round,
            "strategy": self.strategy.state_dict(),
            "clients": self.store.state_dict(),
            "clock": self._clock,
            "wall_time": self._wall,
            "cpu_time": self._cpu,
            "cum_bytes_up": self._cum_up,
            "cum_bytes_down": self._cum_down,
            "history": self.history,
            "benched": {str(c): r for c, r in self._benched.items()},
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ConfigError(f"checkpoint format {state.get('format')!r} is not supported (expected {_CHECKPOINT_FORMAT})")
        for key, mine in (("seed", self.seed), ("num_clients", self.num_clients)):
            if state.get(key) != mine:
                raise ConfigError(f"checkpoint was made with {key}={state.get(key)!r}, this run has {key}={mine!r}")
        self.strategy.load_state_dict(state["strategy"])
        self.store.load_state_dict(state["clients"])
        self.next_round = int(state["next_round"])
        self._clock = float(state["clock"])
        self._wall = float(state["wall_time"])
        self._cpu = float(state["cpu_time"])
        self._cum_up = int(state["cum_bytes_up"])
        self._cum_down = int(state["cum_bytes_down"])
        self.history = list(state["history"])
        self._benched = {int(c): int(r) for c, r in state.get("benched", {}).items()}
        self._inflight = {
            int(c): _Flight(int(f["round"]), int(c), float(f["issue"]), float(f["arrival"]), int(f["bytes_up"]), f["blob"].numpy().tobytes())
            for c, f in state.get("inflight", {}).items()
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write the run state (safetensors + JSON, atomically); default ``run_dir/checkpoint.safetensors``."""
        target = Path(path) if path is not None else self._checkpoint_path()
        if target is None:
            raise ConfigError("save_checkpoint needs a path or an engine with a run_dir")
        save_state(self.state_dict(), target)
        return target

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path))


def _example_input(module: Any, data: Any) -> Any:
    """The module's example input, or the first sample of the first client's data."""
    try:
        return module.federated_example_input()
    except ConfigError:
        for batch in data.train_batches(0, run_seed=0, rnd=0, epoch=0):
            return module.federated_example_input(batch)
        raise
