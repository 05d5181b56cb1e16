"""The server process of a FedML deployment: the round driver over real messages.

:class:`FedMLTransport` is the transport of a deployment's server (FedML rank 0): it knows which
client processes said hello, sends each task (``encode_task`` inside an envelope) to the process
serving its client, and collects results with a
:class:`~lightning_fedprune.fedml_adapters.rounds.RoundCollector` until the round rules end the
round (the same :class:`~lightning_fedprune.core.rounds.RoundRules` the simulation applies to
simulated arrival times: sync, deadline, async m-of-N, joins). :class:`FedMLServer` is the
:class:`~lightning_fedprune.driver.RoundDriver` over it: the loop, evaluation, checkpoints,
early stop, listeners and summary are the simulation's, so the same metric files, plots and
summary table come out.

Records add what only a deployment has: ``wire_bytes_up/down`` (bytes on the transport), the
clients asked (``selected``), per-client bytes/seconds/status (``clients``) and
``dropped_messages``. ``sim_time`` holds *measured* seconds (the sum of the rounds' real
durations). In async mode, tasks still in flight when the server restarts are lost (their
results answer an earlier server session and are dropped); their clients are asked again.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning_fedprune.core.messages import ClientTask, encode_task
from lightning_fedprune.core.rounds import RoundRules
from lightning_fedprune.core.serialization import save_state
from lightning_fedprune.driver import CHECKPOINT_NAME, RoundDriver, RoundOutcome
from lightning_fedprune.errors import AllClientsFailedError
from lightning_fedprune.fedml_adapters.envelope import FAILURE, FINISH, HELLO, READY, RESULT, TASK, Envelope
from lightning_fedprune.fedml_adapters.rounds import RoundCollector, cap_samples
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, derived_message_limit

log = logging.getLogger(__name__)

__all__ = ["FedMLServer", "FedMLTransport", "CHECKPOINT_NAME", "GLOBAL_MODEL_NAME"]

GLOBAL_MODEL_NAME = "global_model.safetensors"


class RankSenders:
    """One sender thread per rank: a slow or unreachable rank delays only its own messages.

    Messages to a rank go out in the order they were submitted. Once a send that waited for the
    rank failed, the messages to it submitted before that failure are not tried (they fail at once
    with the same reason): an unreachable rank costs one connection wait, not one per message. A
    send that did not wait (``wait_s == 0``: best-effort notices) says nothing about the rank, so its
    failure does not count.

    Args:
        send: ``send(envelope, wait_s)`` -> wire bytes; raises when it could not be delivered.
    """

    def __init__(self, send: Callable[[Envelope, float], int]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._threads: dict[int, ThreadPoolExecutor] = {}
        self._failed: dict[int, tuple[float, str]] = {}  # rank -> (when its last send failed, why)
        self._closed = False

    def submit(self, env: Envelope, *, wait_s: float) -> Future:
        """Queue ``env`` for its receiver; the future gives the wire bytes or raises."""
        rank, queued_at = int(env.receiver), time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("the senders are shut down")
            pool = self._threads.get(rank)
            if pool is None:
                pool = self._threads[rank] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lfp-send-{rank}")

        def job() -> int:
            with self._lock:
                failed = self._failed.get(rank)
            if failed is not None and failed[0] >= queued_at:
                raise ConnectionError(f"not tried: an earlier send to rank {rank} failed ({failed[1]})")
            try:
                return self._send(env, wait_s)
            except Exception as err:
                if wait_s > 0:
                    with self._lock:
                        self._failed[rank] = (time.monotonic(), str(err))
                raise

        return pool.submit(job)

    def shutdown(self) -> None:
        """Stop taking messages; queued ones are dropped, the ones being sent finish on their own."""
        with self._lock:
            self._closed = True
            pools, self._threads = list(self._threads.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)


class FedMLTransport:
    """Dispatches tasks to client processes and collects their results (rank 0).

    Args:
        cfg: the deployment config.
        expected: ``strategy.expected_result`` (task -> what a valid result holds).
        endpoint: the transport endpoint (default: FedML's, made at :meth:`start`).
        known_samples: client id -> the samples the server knows it holds; reported
            ``num_samples`` above it are capped (``None``: trusted as reported).

    Attributes:
        session: this server process's id (results of tasks sent by an earlier process are dropped).
        dropped_messages: messages refused (logged with their reason).
    """

    name = "fedml"

    def __init__(self, cfg: DeploymentConfig, *, expected: Any, endpoint: Any = None, known_samples: Any = None) -> None:
        self.cfg = cfg
        self.expected = expected
        self.known_samples = known_samples
        self.session = uuid.uuid4().hex[:16]
        self.dropped_messages = 0
        self._endpoint = endpoint
        self._online: dict[int, str] = {}  # rank -> the client process's session
        self._said_hello: set[int] = set()  # every rank that said hello in this run
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._collector: RoundCollector | None = None
        self._carried: list[Any] = []  # async mode: tasks in flight from earlier rounds
        self._senders: RankSenders | None = None
        self._cum_wire = {"up": 0, "down": 0}
        self._stopped = False

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bring the endpoint up, announce this server and wait for the client processes."""
        if self._endpoint is None:
            from lightning_fedprune.fedml_adapters.transport import make_endpoint

            self._endpoint = make_endpoint(self.cfg, 0)
        endpoint = self._endpoint
        self._senders = RankSenders(lambda env, wait_s: endpoint.send(env, wait_s=wait_s))
        self._endpoint.start(self._on_message, self._on_refused)
        log.info(
            "server of run %r up on %s; waiting for %d client process(es)",  # session ids stay out of logs
            self.cfg.run_id, self.cfg.comm_args.backend, self.cfg.worker_num,
        )
        self._announce(range(1, self.cfg.worker_num + 1))
        self._wait_for_clients(all_of_them=True, timeout_s=self.cfg.train_args.startup_timeout_s)

    def stop(self) -> None:
        """Tell the clients the run is over, then release the transport (no hung RPCs).

        Async runs end with tasks still in flight: their results are awaited (each up to
        ``train_args.round_timeout_s`` after it was sent) and discarded first, so no client is
        left sending to a server that is gone.
        """
        if self._endpoint is None or self._stopped:
            return
        self._stopped = True
        if self._carried and self._senders is not None:
            self._drain()
        jobs = []
        if self._senders is not None:
            # every rank that said hello in this run, also one that later missed a message
            for rank in sorted(self._said_hello):
                jobs.append(self._submit(Envelope(FINISH, 0, rank, self.cfg.run_id, self.session), wait_s=self._peer_wait))
            for job in jobs:
                try:
                    job.result(timeout=self.cfg.comm_args.send_timeout_s)
                except Exception as err:  # a client gone already is fine
                    log.debug("finish not delivered: %s", err)
            self._senders.shutdown()
        try:
            self._endpoint.close()
        finally:
            log.info("transport: %s", self.stats)

    @property
    def _peer_wait(self) -> float:
        """How long a send to a client that should be up waits for its connection (a client
        repeats its hello every ``hello_interval_s``)."""
        return min(2.0 * self.cfg.comm_args.hello_interval_s, self.cfg.comm_args.send_timeout_s)

    @property
    def stats(self) -> dict[str, Any]:
        return dict(getattr(self._endpoint, "stats", {}) or {})

    # -------------------------------------------------------------- the driver's interface
    def candidates(self, rnd: int) -> list[int]:
        """Clients of the processes that said hello (waiting for one when none is up).

        Ranks not online are told again that this server is up: a live one answers with hello and
        is asked again from the next round on.
        """
        self._announce(sorted(set(range(1, self.cfg.worker_num + 1)) - set(self._online)))
        if not self._online:
            log.warning("round %d: no client process is up; waiting up to %g s", rnd, self.cfg.train_args.startup_timeout_s)
            self._wait_for_clients(all_of_them=False, timeout_s=self.cfg.train_args.startup_timeout_s)
        if not self._online:
            raise AllClientsFailedError(f"round {rnd}: no client process said hello within train_args.startup_timeout_s")
        return sorted(c for rank in self._online for c in self.cfg.clients_of_rank(rank))

    def in_flight(self) -> set[int]:
        return {s.task.client_id for s in self._carried}

    def execute(self, rnd: int, tasks: Sequence[ClientTask], rules: RoundRules) -> RoundOutcome:
        collector = RoundCollector(
            rnd,
            tasks,
            rank_of=self.cfg.rank_of_client,
            expected=self.expected,
            run_id=self.cfg.run_id,
            session=self.session,
            max_message_bytes=self.cfg.comm_args.message_limit,
            timeout_s=self.cfg.train_args.round_timeout_s,
            rules=rules,
            carried=self._carried,
        )
        self._collector = collector
        try:
            self._send_tasks(rnd, tasks, collector)
            self._collect(collector)
        finally:
            self._collector = None
        out = collector.close()
        self._bench_silent(collector)
        self._carried = collector.carry() if rules.mode == "async" else []
        capped: list[int] = []
        if self.known_samples is not None:
            out.results, capped = cap_samples(out.results, self.known_samples)
        self._cum_wire["up"] += out.wire_up
        self._cum_wire["down"] += out.wire_down
        late = [f.client_id for f in out.failures if f.kind == "deadline"] if rules.mode == "deadline" else []
        extra: dict[str, Any] = {
            "wire_bytes_up": out.wire_up,
            "wire_bytes_down": out.wire_down,
            "selected": [t.client_id for t in tasks],
            "clients": out.per_client,
            "dropped_messages": out.dropped,
            **out.extra,
        }
        if capped:
            extra["samples_capped"] = capped
        log.info("round %d done in %.2f s: %d/%d results", rnd, out.seconds, len(out.results), len(tasks))
        return RoundOutcome(out.results, out.failures, out.seconds, out.bytes_up, out.bytes_down, late=late, extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {"cum_wire_bytes_up": self._cum_wire["up"], "cum_wire_bytes_down": self._cum_wire["down"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._cum_wire = {"up": int(state.get("cum_wire_bytes_up", 0)), "down": int(state.get("cum_wire_bytes_down", 0))}

    def _bench_silent(self, collector: RoundCollector) -> None:
        """Ranks that sent nothing for a whole ``round_timeout_s`` are not asked again until they say hello."""
        for rank in sorted({collector.slots[c].rank for c in collector.timed_out}):
            if self._online.pop(rank, None) is not None:
                log.warning("rank %d sent nothing for train_args.round_timeout_s; it is asked again once it says hello", rank)

    def _drain(self) -> None:
        """Wait for the tasks still in flight (async mode) and drop their results."""
        log.info("waiting for %d task(s) still in flight before finishing", len(self._carried))
        rnd = max(s.task.round for s in self._carried)
        collector = RoundCollector(
            rnd, [], rank_of=self.cfg.rank_of_client, expected=self.expected, run_id=self.cfg.run_id, session=self.session,
            max_message_bytes=self.cfg.comm_args.message_limit, timeout_s=self.cfg.train_args.round_timeout_s,
            carried=self._carried,
        )
        self._collector = collector
        try:
            self._collect(collector)
        finally:
            self._collector = None
            self._carried = []

    # -------------------------------------------------------------- round pieces
    def _send_tasks(self, rnd: int, tasks: Sequence[ClientTask], collector: RoundCollector) -> None:
        per_rank: dict[int, int] = {}
        for t in tasks:
            r = self.cfg.rank_of_client(t.client_id)
            per_rank[r] = per_rank.get(r, 0) + 1
        wait = self._peer_wait
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

    # -------------------------------------------------------------- messages
    def _on_message(self, env: Envelope, wire_bytes: int) -> None:
        # transport thread: hand over (with the time it came in), never block
        self._events.put(("message", env, wire_bytes, time.monotonic()))

    def _on_refused(self, reason: str) -> None:
        self._events.put(("refused", reason))

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "message":
            self._handle_message(event[1], event[2], event[3])
        elif kind == "refused":
            self.dropped_messages += 1  # already logged by the transport
        elif kind == "task_sent":
            _, rnd, cid, wire = event
            col = self._collector
            if col is not None and cid in col.slots and col.slots[cid].task.round == rnd:
                col.slots[cid].wire_down = int(wire)
        elif kind == "task_failed":
            _, rnd, rank, cid, reason = event
            col = self._collector
            if col is not None and cid in col.slots and col.slots[cid].task.round == rnd:
                col.fail(cid, "dropout", f"sending its task to rank {rank} failed: {reason}")
            if self._online.pop(rank, None) is not None:
                log.warning("rank %d is unreachable; it is asked again once it says hello", rank)

    def _handle_message(self, env: Envelope, wire_bytes: int, received_at: float) -> None:
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
                if not self._collector.offer(env, wire_bytes, at=received_at):
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
        self._said_hello.add(rank)
        if previous != client_session:
            log.info("rank %d is up (clients %s)", rank, expected)
            if previous is not None:
                if self._collector is not None:
                    for cid in self._collector.pending_of_rank(rank):
                        self._collector.fail(cid, "dropout", f"the process of rank {rank} restarted and lost its task")
                self._carried = [s for s in self._carried if s.rank != rank]
        reply = Envelope(READY, 0, rank, self.cfg.run_id, self.session, body={"reply": True})
        self._submit(reply, wait_s=self._peer_wait)  # it just spoke: wait out a reconnect backoff
        return None

    def _submit(self, env: Envelope, *, wait_s: float, on_fail: tuple[Any, ...] | None = None, on_done: tuple[Any, ...] | None = None) -> Any:
        assert self._senders is not None
        job = self._senders.submit(env, wait_s=wait_s)

        def done(fut: Future) -> None:
            if fut.cancelled():
                return
            err = fut.exception()
            if err is not None:
                if on_fail is not None:
                    self._events.put((*on_fail, str(err)))
                else:
                    log.debug("could not send %s to rank %d: %s", env.type, env.receiver, err)
            elif on_done is not None:
                self._events.put((*on_done, fut.result()))

        job.add_done_callback(done)
        return job

    def _announce(self, ranks: Any) -> None:
        """Tell client ranks this (new) server is up: live clients answer with hello."""
        for rank in ranks:
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


class FedMLServer(RoundDriver):
    """Runs the rounds of a deployment (FedML rank 0): the round driver over :class:`FedMLTransport`.

    Args:
        cfg: the deployment config.
        listeners: round listeners (progress bar, metric files, plots), as for the simulator.
        endpoint: the transport endpoint (default: FedML's endpoint of rank 0, which imports FedML).
        resume: continue from ``<run_dir>/checkpoint.safetensors`` when it exists.

    Attributes:
        history: the round records.
        session: this server process's id.
        parts: what the server was built from (:class:`~lightning_fedprune.config.RunParts`).
    """

    def __init__(
        self,
        cfg: DeploymentConfig,
        *,
        listeners: Sequence[Any] = (),
        endpoint: Any = None,
        resume: bool = False,
    ) -> None:
        from lightning_fedprune.fedml_adapters.components import build_server_parts, round_rules

        cfg.require_services()
        self.resume = bool(resume)
        self.parts = build_server_parts(cfg)
        if cfg.comm_args.max_message_bytes is None:
            limit = derived_message_limit(self.parts.strategy.global_state)
            cfg = cfg.replace(comm_args=dataclasses.replace(cfg.comm_args, max_message_bytes=limit))
            log.info("comm_args.max_message_bytes is not set: the server accepts messages up to %d bytes (4x its model + 1 MiB)", limit)
        self.cfg = cfg
        self.rounds = int(cfg.recipe.rounds)
        r = cfg.recipe
        super().__init__(
            strategy=self.parts.strategy,
            transport=FedMLTransport(
                cfg, expected=self.parts.strategy.expected_result, endpoint=endpoint,
                known_samples=self.parts.data.num_train_samples if self.parts.data is not None else None,
            ),
            rules=round_rules(r),
            num_clients=self.parts.num_clients,
            seed=r.seed,
            evaluator=self.parts.evaluator,
            eval_every=r.eval_every,
            target_accuracy=r.target_accuracy,
            run_dir=cfg.run_dir,
            checkpoint_every=r.checkpoint_every,
            listeners=listeners,
        )

    @property
    def session(self) -> str:
        return self.transport.session

    @property
    def dropped_messages(self) -> int:
        return self.transport.dropped_messages

    def run(self, num_rounds: int | None = None, *, resume: bool | None = None) -> dict[str, Any]:  # type: ignore[override]
        """Run the deployment's rounds (resuming if asked) and return the run summary.

        Raises:
            AllClientsFailedError: every client selected in a round failed, or none came up.
        """
        try:
            self.transport.start()
            return super().run(self.rounds if num_rounds is None else num_rounds, resume=self.resume if resume is None else resume)
        finally:
            self.transport.stop()  # a no-op when the run ended normally

    def rounds_done(self) -> None:
        """Write the final global model, then finish the clients (the summary reports the closed transport)."""
        save_state(dict(self.strategy.global_state), Path(self.cfg.run_dir) / GLOBAL_MODEL_NAME)
        self.transport.stop()

    def summary(self, *, stopped_early: bool = False) -> dict[str, Any]:
        out = super().summary(stopped_early=stopped_early)
        t = self.transport.state_dict()
        out["transport"] = {
            "backend": self.cfg.comm_args.backend,
            "dropped_messages": self.transport.dropped_messages,
            "cum_wire_bytes_up": t["cum_wire_bytes_up"],
            "cum_wire_bytes_down": t["cum_wire_bytes_down"],
            **self.transport.stats,
        }
        return out
