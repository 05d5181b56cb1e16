"""The server process of a FedML deployment: the simulator's round, over real messages.

A round, as in :class:`~lightning_fedprune.simulation.SimulationEngine` but with real clocks and
bytes::

    available = clients of the processes that said hello (minus clients sitting out a deadline miss)
    tasks     = strategy.configure_round(round, available)
    send each task (encode_task inside an envelope) to the process serving its client
    collect results until all delivered or failed, or the round's deadline passed
    metrics   = strategy.aggregate(round, results (with measured completion_time), failures)
    evaluate the global model, report the round to listeners, checkpoint

The server holds no algorithm: it calls the same :class:`~lightning_fedprune.strategies.Strategy`
methods as the simulator and writes the same round records, so the same metric files, plots and
summary table come out. Records add what only a deployment has: ``wire_bytes_up/down`` (bytes on
the transport), per-client bytes/seconds/status (``clients``) and ``dropped_messages``.
``sim_time`` holds *measured* seconds (the sum of the rounds' real durations).
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning_fedprune.core.messages import encode_task
from lightning_fedprune.core.serialization import load_state, save_state
from lightning_fedprune.errors import AllClientsFailedError, ConfigError
from lightning_fedprune.fedml_adapters.envelope import FAILURE, FINISH, HELLO, READY, RESULT, TASK, Envelope
from lightning_fedprune.fedml_adapters.rounds import RoundCollector
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig
from lightning_fedprune.reporting import round_outcome_fields

log = logging.getLogger(__name__)

__all__ = ["FedMLServer", "CHECKPOINT_NAME", "GLOBAL_MODEL_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
GLOBAL_MODEL_NAME = "global_model.safetensors"
_CHECKPOINT_FORMAT = 1
_CHECKPOINT_KIND = "fedml_server"


class FedMLServer:
    """Runs the rounds of a deployment (FedML rank 0).

    Args:
        cfg: the deployment config.
        listeners: round listeners (progress bar, metric files, plots), as for the simulator.
        endpoint: the transport (default: :class:`~lightning_fedprune.fedml_adapters.transport.FedMLEndpoint`
            of rank 0, which imports FedML).
        resume: continue from ``<run_dir>/checkpoint.safetensors`` when it exists.

    Attributes:
        history: the round records.
        session: this server process's id (results of tasks sent by an earlier process are dropped).
    """

    def __init__(
        self,
        cfg: DeploymentConfig,
        *,
        listeners: Sequence[Any] = (),
        endpoint: Any = None,
        resume: bool = False,
    ) -> None:
        from lightning_fedprune.fedml_adapters.components import build_server_parts

        cfg.require_services()
        self.cfg = cfg
        self.listeners = list(listeners)
        self.resume = bool(resume)
        self.parts = build_server_parts(cfg)
        self.strategy = self.parts.strategy
        self.rounds = self.parts.rounds
        self.run_dir = cfg.run_dir
        self.session = uuid.uuid4().hex[:16]
        self.history: list[dict[str, Any]] = []
        self.next_round = 0
        self._clock = 0.0
        self._wall = 0.0
        self._cpu = 0.0
        self._cum = {"up": 0, "down": 0, "wire_up": 0, "wire_down": 0}
        self._benched: dict[int, int] = {}
        self._online: dict[int, str] = {}  # rank -> the client process's session
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._collector: RoundCollector | None = None
        self._endpoint = endpoint
        self._pool: ThreadPoolExecutor | None = None
        self.dropped_messages = 0

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, Any]:
        """Run the deployment's rounds (resuming if asked) and return the run summary.

        Raises:
            AllClientsFailedError: every client selected in a round failed, or none came up.
        """
        if self.resume:
            path = self.run_dir / CHECKPOINT_NAME
            if path.exists():
                self.load_state_dict(load_state(path))
                log.info("resumed from %s at round %d", path, self.next_round)
            else:
                log.info("nothing to resume at %s; starting afresh", path)
        self._emit("on_run_start", {
            "num_rounds": self.rounds,
            "start_round": self.next_round,
            "strategy": type(self.strategy).__name__,
            "num_clients": self.parts.num_clients,
            "run_dir": str(self.run_dir),
        })
        if self._endpoint is None:
            from lightning_fedprune.fedml_adapters.transport import make_endpoint

            self._endpoint = make_endpoint(self.cfg, 0)
        self._pool = ThreadPoolExecutor(max_workers=min(8, self.cfg.worker_num + 1), thread_name_prefix="lfp-send")
        stopped_early = self._reached_target()
        try:
            self._endpoint.start(self._on_message, self._on_refused)
            log.info(
                "server of run %r (session %s) up on %s; waiting for %d client process(es)",
                self.cfg.run_id, self.session, self.cfg.comm_args.backend, self.cfg.worker_num,
            )
            self._announce()
            self._wait_for_clients(all_of_them=True, timeout_s=self.cfg.train_args.startup_timeout_s)
            while self.next_round < self.rounds and not stopped_early:
                rnd = self.next_round
                record = self.run_round(rnd, last=(rnd == self.rounds - 1))
                stopped_early = self._reached_target()
                self._emit("on_round_end", record)
                if (rnd + 1) % self.cfg.recipe.checkpoint_every == 0 or rnd == self.rounds - 1 or stopped_early:
                    self.save_checkpoint()
            save_state(dict(self.strategy.global_state), self.run_dir / GLOBAL_MODEL_NAME)
        finally:
            self._finish_clients()
        summary = self.summary(stopped_early=stopped_early)
        self._emit("on_run_end", summary)
        return summary

    def run_round(self, rnd: int, *, last: bool = False) -> dict[str, Any]:
        """Run one round over the transport and return its record (appended to :attr:`history`)."""
        if rnd != self.next_round:
            raise ConfigError(f"round {rnd} requested but the next round is {self.next_round}")
        cfg = self.cfg
        wall0, cpu0 = time.perf_counter(), time.process_time()
        available = self._available(rnd)
        if not available:
            log.warning("round %d: no client process is up; waiting up to %g s", rnd, cfg.train_args.startup_timeout_s)
            self._wait_for_clients(all_of_them=False, timeout_s=cfg.train_args.startup_timeout_s)
            available = self._available(rnd)
        if not available:
            raise AllClientsFailedError(f"round {rnd}: no client process said hello within train_args.startup_timeout_s")
        tasks = self.strategy.configure_round(rnd, available)
        bad = [t.client_id for t in tasks if t.client_id not in set(available) or t.round != rnd]
        if bad:
            raise ConfigError(f"{type(self.strategy).__name__} built tasks for unavailable clients or another round: {bad}")
        e = cfg.recipe.engine
        collector = RoundCollector(
            rnd,
            tasks,
            rank_of=cfg.rank_of_client,
            expected=self.strategy.expected_result,
            run_id=cfg.run_id,
            session=self.session,
            max_message_bytes=cfg.comm_args.max_message_bytes,
            timeout_s=cfg.train_args.round_timeout_s,
            deadline_fraction=e.deadline_fraction if e.mode == "deadline" else None,
            deadline_factor=e.deadline_factor,
        )
        self._collector = collector
        try:
            self._send_tasks(rnd, tasks, collector)
            self._collect(collector)
        finally:
            self._collector = None
        out = collector.close()
        if e.mode == "deadline":
            for f in out.failures:
                if f.kind == "deadline":
                    self._benched[f.client_id] = rnd + 1 + e.deadline_backoff
        if tasks and not out.results:
            reasons = "; ".join(f"client {f.client_id}: {f.kind}: {f.reason}" for f in out.failures[:5])
            raise AllClientsFailedError(f"round {rnd}: all {len(tasks)} selected clients failed, nothing to aggregate. {reasons}")
        agg = self.strategy.aggregate(rnd, out.results, out.failures) if (out.results or out.failures) else {}
        self._clock += out.seconds
        self._cum["up"] += out.bytes_up
        self._cum["down"] += out.bytes_down
        self._cum["wire_up"] += out.wire_up
        self._cum["wire_down"] += out.wire_down
        record: dict[str, Any] = {
            "round": rnd,
            "sim_time": self._clock,
            "round_sim_time": out.seconds,
            "bytes_up": out.bytes_up,
            "bytes_down": out.bytes_down,
            "cum_bytes": self._cum["up"] + self._cum["down"],
            "wire_bytes_up": out.wire_up,
            "wire_bytes_down": out.wire_down,
            "num_selected": len(tasks),
            "num_results": len(out.results),
            "num_failures": len(out.failures),
            "selected": [t.client_id for t in tasks],
            "clients": out.per_client,
            "dropped_messages": out.dropped,
        }
        record.update(out.extra)
        record.update(self._evaluate_global(rnd, last))
        record.update(round_outcome_fields(out.results, out.failures, agg))
        self._wall += time.perf_counter() - wall0
        self._cpu += time.process_time() - cpu0
        record["wall_time"] = self._wall
        record["cpu_time"] = self._cpu
        self.history.append(record)
        self.next_round = rnd + 1
        log.info(
            "round %d done in %.2f s: %d/%d results, accuracy %s",
            rnd, out.seconds, len(out.results), len(tasks), f"{record['test_accuracy']:.4f}" if math.isfinite(record["test_accuracy"]) else "-",
        )
        return record

    # ------------------------------------------------------------------ round pieces
    def _available(self, rnd: int) -> list[int]:
        return sorted(
            c for rank in self._online for c in self.cfg.clients_of_rank(rank) if self._benched.get(c, 0) <= rnd
        )

    def _send_tasks(self, rnd: int, tasks: Sequence[Any], collector: RoundCollector) -> None:
        per_rank: dict[int, int] = {}
        for t in tasks:
            r = self.cfg.rank_of_client(t.client_id)
            per_rank[r] = per_rank.get(r, 0) + 1
        wait = min(2.0 * self.cfg.comm_args.hello_interval_s, self.cfg.comm_args.send_timeout_s)
        for task in tasks:
            rank = self.cfg.rank_of_client(task.client_id)
            payload = encode_task(task)
            env = Envelope(
                TASK, 0, rank, self.cfg.run_id, self.session, rnd,
                body={"client_id": task.client_id, "batch": per_rank[rank]}, payload=payload,
            )
            collector.sent(task.client_id, at=collector.clock(), payload_bytes=len(payload), wire_bytes=0)
            self._submit(env, wait_s=wait, on_fail=("task_failed", rnd, rank, task.client_id), on_done=("task_sent", rnd, task.client_id))
        log.info("round %d: sent %d task(s) to %d process(es)", rnd, len(tasks), len(per_rank))

    def _collect(self, collector: RoundCollector) -> None:
        while not collector.done:
            timeout = collector.next_deadline() - collector.clock()
            if timeout <= 0:
                collector.expire()
                continue
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                collector.expire()
                continue
            self._handle(event)

    def _evaluate_global(self, rnd: int, last: bool) -> dict[str, float]:
        from lightning_fedprune.evaluation import evaluate

        out = {"test_loss": math.nan, "test_accuracy": math.nan}
        if self.parts.perplexity:
            out["test_perplexity"] = math.nan
        loader = self.parts.test_loader
        if loader is None or not ((rnd + 1) % self.cfg.recipe.eval_every == 0 or last):
            return out
        self.parts.eval_module.load_federated_state(self.strategy.global_state)
        ev = evaluate(self.parts.eval_module, loader, perplexity=self.parts.perplexity)
        out["test_loss"], out["test_accuracy"] = ev["loss"], ev["accuracy"]
        if self.parts.perplexity:
            out["test_perplexity"] = ev["perplexity"]
        return out

    def _reached_target(self) -> bool:
        target = self.cfg.recipe.target_accuracy
        if target is None or not self.history:
            return False
        acc = self.history[-1].get("test_accuracy", math.nan)
        return bool(math.isfinite(acc) and acc >= target)

    # ------------------------------------------------------------------ messages
    def _on_message(self, env: Envelope, wire_bytes: int) -> None:
        # transport thread: hand over, never block
        self._events.put(("message", env, wire_bytes))

    def _on_refused(self, reason: str) -> None:
        self._events.put(("refused", reason))

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "message":
            self._handle_message(event[1], event[2])
        elif kind == "refused":
            self.dropped_messages += 1  # already logged by the transport
        elif kind == "task_sent":
            _, rnd, cid, wire = event
            if self._collector is not None and self._collector.round == rnd and cid in self._collector.slots:
                self._collector.slots[cid].wire_down = int(wire)
        elif kind == "task_failed":
            _, rnd, rank, cid, reason = event
            if self._collector is not None and self._collector.round == rnd:
                self._collector.fail(cid, "dropout", f"could not deliver its task to rank {rank}: {reason}")
            if self._online.pop(rank, None) is not None:
                log.warning("rank %d is unreachable; it is asked again once it says hello", rank)

    def _handle_message(self, env: Envelope, wire_bytes: int) -> None:
        reason = None
        if env.receiver != 0:
            reason = f"it is addressed to rank {env.receiver}"
        elif env.run_id != self.cfg.run_id:
            reason = f"it belongs to run {env.run_id!r}, this is {self.cfg.run_id!r}"
        elif not 1 <= env.sender <= self.cfg.worker_num:
            reason = f"rank {env.sender} is not a client of this deployment (ranks 1..{self.cfg.worker_num}; unknown sender)"
        if reason is None and env.type == HELLO:
            reason = self._hello(env)
            if reason is None:
                return
        elif reason is None and env.type in (RESULT, FAILURE):
            if self._collector is not None:
                if not self._collector.offer(env, wire_bytes):
                    self.dropped_messages += 1
                return
            reason = "no round is in progress"
        elif reason is None:
            reason = f"a server does not take {env.type!r} messages"
        self.dropped_messages += 1
        log.warning("dropped a %s message from rank %d: %s", env.type, env.sender, reason)

    def _hello(self, env: Envelope) -> str | None:
        rank = env.sender
        expected = self.cfg.clients_of_rank(rank)
        said = env.body.get("clients")
        if said != expected:
            return f"rank {rank} says it serves clients {said}, this deployment gives it {expected}"
        client_session = str(env.body.get("session", ""))
        previous = self._online.get(rank)
        self._online[rank] = client_session
        if previous != client_session:
            log.info("rank %d is up (clients %s)", rank, expected)
            if previous is not None and self._collector is not None:
                for cid in self._collector.pending_of_rank(rank):
                    self._collector.fail(cid, "dropout", f"the process of rank {rank} restarted and lost its task")
        reply = Envelope(READY, 0, rank, self.cfg.run_id, self.session, body={"reply": True})
        self._submit(reply, wait_s=0.0)
        return None

    def _submit(self, env: Envelope, *, wait_s: float, on_fail: tuple[Any, ...] | None = None, on_done: tuple[Any, ...] | None = None) -> Any:
        assert self._pool is not None

        def job() -> None:
            try:
                wire = self._endpoint.send(env, wait_s=wait_s)
            except Exception as err:
                if on_fail is not None:
                    self._events.put((*on_fail, str(err)))
                else:
                    log.debug("could not send %s to rank %d: %s", env.type, env.receiver, err)
                return
            if on_done is not None:
                self._events.put((*on_done, wire))

        return self._pool.submit(job)

    def _announce(self) -> None:
        """Tell every client rank this (new) server is up: live clients answer with hello."""
        for rank in range(1, self.cfg.worker_num + 1):
            self._submit(Envelope(READY, 0, rank, self.cfg.run_id, self.session, body={"announce": True}), wait_s=0.0)

    def _wait_for_clients(self, *, all_of_them: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        want = self.cfg.worker_num if all_of_them else 1
        while len(self._online) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                if all_of_them:
                    missing = sorted(set(range(1, self.cfg.worker_num + 1)) - set(self._online))
                    log.warning("ranks %s did not say hello within %g s; starting without them", missing, timeout_s)
                return
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                continue
            self._handle(event)
        log.info("%d of %d client process(es) up", len(self._online), self.cfg.worker_num)

    def _finish_clients(self) -> None:
        """Tell the clients the run is over, then release the transport (no hung RPCs)."""
        if self._endpoint is None:
            return
        jobs = []
        if self._pool is not None:
            for rank in sorted(self._online):
                jobs.append(self._submit(Envelope(FINISH, 0, rank, self.cfg.run_id, self.session), wait_s=0.0))
            for job in jobs:
                try:
                    job.result(timeout=self.cfg.comm_args.send_timeout_s)
                except Exception as err:  # a client gone already is fine
                    log.debug("finish not delivered: %s", err)
            self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._endpoint.close()
        finally:
            stats = getattr(self._endpoint, "stats", {})
            log.info("transport: %s", stats)

    # ------------------------------------------------------------------ reporting
    def summary(self, *, stopped_early: bool = False) -> dict[str, Any]:
        from lightning_fedprune.reporting import summarize

        out = summarize(self.history, target_accuracy=self.cfg.recipe.target_accuracy)
        out["stopped_early"] = bool(stopped_early)
        out["run_dir"] = str(self.run_dir)
        out["transport"] = {
            "backend": self.cfg.comm_args.backend,
            "dropped_messages": self.dropped_messages,
            "cum_wire_bytes_up": self._cum["wire_up"],
            "cum_wire_bytes_down": self._cum["wire_down"],
            **dict(getattr(self._endpoint, "stats", {}) or {}),
        }
        return out

    def _emit(self, hook: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            fn = getattr(listener, hook, None)
            if callable(fn):
                fn(payload)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted server needs to continue: strategy, counters, history."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "kind": _CHECKPOINT_KIND,
            "seed": self.cfg.recipe.seed,
            "num_clients": self.parts.num_clients,
            "next_round": self.next_round,
            "strategy": self.strategy.state_dict(),
            "clock": self._clock,
            "wall_time": self._wall,
            "cpu_time": self._cpu,
            "cum": dict(self._cum),
            "history": self.history,
            "benched": {str(c): r for c, r in self._benched.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _CHECKPOINT_FORMAT or state.get("kind") != _CHECKPOINT_KIND:
            raise ConfigError(
                f"{self.run_dir / CHECKPOINT_NAME} is not a FedML server checkpoint (format {state.get('format')!r}, "
                f"kind {state.get('kind')!r}); a simulator checkpoint cannot resume a deployment"
            )
        for key, mine in (("seed", self.cfg.recipe.seed), ("num_clients", self.parts.num_clients)):
            if state.get(key) != mine:
                raise ConfigError(f"checkpoint was made with {key}={state.get(key)!r}, this run has {key}={mine!r}")
        self.strategy.load_state_dict(state["strategy"])
        self.next_round = int(state["next_round"])
        self._clock = float(state["clock"])
        self._wall = float(state["wall_time"])
        self._cpu = float(state["cpu_time"])
        self._cum = {k: int(v) for k, v in state["cum"].items()}
        self.history = list(state["history"])
        self._benched = {int(c): int(r) for c, r in state.get("benched", {}).items()}

    def save_checkpoint(self) -> Path:
        path = self.run_dir / CHECKPOINT_NAME
        save_state(self.state_dict(), path)
        return path

