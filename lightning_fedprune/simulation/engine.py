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

A run can be checkpointed after any round and resumed: the resumed run ends bit-identical to an
uninterrupted one, because every random choice derives from (seed, round, client).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from lightning_fedprune.simulation.devices import DeviceProfile, make_devices, round_time
from lightning_fedprune.strategies.base import ModelSpec, Strategy

log = logging.getLogger(__name__)

__all__ = ["SimulationEngine", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = 1


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
    ) -> None:
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
        self.store = ClientStore()
        self.eval_module = copy.deepcopy(runtime.module)
        if getattr(strategy, "_global", None) is None:
            module = runtime.module
            strategy.initialize(
                ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names()),
                num_clients=self.num_clients,
            )
        self.history: list[dict[str, Any]] = []
        self.next_round = 0
        self._clock = 0.0
        self._wall = 0.0
        self._cpu = 0.0
        self._cum_up = 0
        self._cum_down = 0

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
        up_draw = rng_for(self.seed, "avail", rnd).random(self.num_clients)
        available = [c for c in range(self.num_clients) if up_draw[c] < self.devices[c].availability]
        tasks = self.strategy.configure_round(rnd, available)
        bad = [t.client_id for t in tasks if t.client_id not in set(available) or t.round != rnd]
        if bad:
            raise ConfigError(f"{type(self.strategy).__name__} built tasks for unavailable clients or another round: {bad}")

        failures: list[ClientFailure] = []
        bytes_down: dict[int, int] = {}
        bytes_up: dict[int, int] = {}
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
        results: list[ClientResult] = []
        client_time: dict[int, float] = {}
        for task, out in zip(to_run, outcomes):
            cid = task.client_id
            if isinstance(out, ClientFailure):
                failures.append(out)
                continue
            blob = encode_result(out)
            bytes_up[cid] = len(blob)
            w_spec, x_spec = self.strategy.expected_result(sent[cid])
            try:
                res = decode_result(
                    blob, expect_round=rnd, expect_client=cid, expect_weights=w_spec, expect_extras=x_spec,
                    max_bytes=self.max_message_bytes,
                )
            except PayloadError as err:
                log.warning("round %d: result of client %d rejected: %s", rnd, cid, err)
                failures.append(ClientFailure(rnd, cid, "rejected", str(err)))
                continue
            results.append(res)
            client_time[cid] = round_time(self.devices[cid], flops=res.metrics.flops, bytes_down=bytes_down[cid], bytes_up=bytes_up[cid])

        if tasks and not results:
            reasons = "; ".join(f"client {f.client_id}: {f.kind}: {f.reason}" for f in failures[:5])
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise AllClientsFailedError(f"round {rnd}: all {len(tasks)} selected clients failed, nothing to aggregate. {reasons}{more}")
        if not tasks:
            log.warning("round %d: no client available or selected; the global model is unchanged", rnd)

        agg = self.strategy.aggregate(rnd, results, failures) if results else {}
        round_sim = max(client_time.values()) if client_time else 0.0
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
            "failures": [{"client_id": f.client_id, "kind": f.kind, "reason": f.reason} for f in failures],
        }
        record.update(self._evaluate_global(rnd, last))
        local = [r.metrics.extra["local_test_acc"] for r in results if "local_test_acc" in r.metrics.extra]
        local = [v for v in local if math.isfinite(v)]
        record["local_acc_mean"] = sum(local) / len(local) if local else math.nan
        record["local_acc_min"] = min(local) if local else math.nan
        record["local_acc_max"] = max(local) if local else math.nan
        for k, v in agg.items():
            record[f"agg/{k}"] = float(v)
        self._wall += time.perf_counter() - wall0
        self._cpu += time.process_time() - cpu0
        record["wall_time"] = self._wall
        record["cpu_time"] = self._cpu
        self.history.append(record)
        self.next_round = rnd + 1
        return record

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

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write the run state (safetensors + JSON, atomically); default ``run_dir/checkpoint.safetensors``."""
        target = Path(path) if path is not None else self._checkpoint_path()
        if target is None:
            raise ConfigError("save_checkpoint needs a path or an engine with a run_dir")
        save_state(self.state_dict(), target)
        return target

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path))
