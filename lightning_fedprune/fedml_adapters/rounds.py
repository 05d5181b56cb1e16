"""Server-side bookkeeping of one real round: who was asked, what came back, when (no FedML).

:class:`RoundCollector` receives the envelopes of one round and turns them into what the strategy
aggregates -- validated :class:`~lightning_fedprune.core.ClientResult` s (with their measured
``completion_time``) and :class:`~lightning_fedprune.core.ClientFailure` s -- plus the bytes and
times the round record reports. When the round ends is decided by the round rules
(:class:`~lightning_fedprune.core.rounds.RoundRules`), the same pure functions the simulation
applies to simulated arrival times:

* ``sync``: every asked client delivered or failed;
* ``deadline``: once enough results arrived, the rules give the deadline; clients still pending
  then fail with kind ``"deadline"`` (the driver benches them);
* ``async``: tasks of earlier rounds still in flight are carried into the round
  (:meth:`RoundCollector.carry`); the round ends once ``async_m`` results (or all that can still
  come) arrived, aggregates the first ``async_m`` by arrival time and carries the rest on.

Every refusal is logged with its reason and the round goes on:

* a message of another run or server session, for another task than the one in flight, from a
  rank that does not serve the client it names, or for a client not asked (or already answered)
  is *dropped*;
* a result that fails validation against what its task implies (tensor names, shapes, dtypes,
  finiteness, size) ends that client's task as a ``"rejected"`` failure, as in the simulator.

Clocks are ``time.monotonic`` seconds; completion time = result arrival - task send start
(download + compute + upload as seen by the server).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, decode_result
from lightning_fedprune.core.rounds import RoundRules, first_arrivals
from lightning_fedprune.errors import PayloadError
from lightning_fedprune.fedml_adapters.envelope import FAILURE, RESULT, Envelope

log = logging.getLogger(__name__)

__all__ = ["RoundCollector", "Outcome", "cap_samples"]


def cap_samples(results: Sequence[ClientResult], known: Callable[[int], int]) -> tuple[list[ClientResult], list[int]]:
    """Results whose ``num_samples`` is at most what the server knows each client holds.

    A client that reports more samples than its partition has (to weigh more in the average) is
    capped at the known count, and named in the second list.
    """
    out, capped = [], []
    for r in results:
        limit = int(known(r.client_id))
        if r.metrics.num_samples > limit:
            log.warning("client %d reported %d samples, it holds %d: capped", r.client_id, r.metrics.num_samples, limit)
            r = dataclasses.replace(r, metrics=dataclasses.replace(r.metrics, num_samples=limit))
            capped.append(r.client_id)
        out.append(r)
    return out, capped


@dataclass
class _Slot:
    task: ClientTask
    rank: int
    sent_at: float | None = None
    bytes_down: int = 0
    wire_down: int = 0
    result: ClientResult | None = None
    failure: ClientFailure | None = None
    bytes_up: int = 0
    wire_up: int = 0
    seconds: float = math.nan
    arrived_at: float = math.nan
    fresh: bool = True  # sent in this round (not carried from an earlier one)

    @property
    def resolved(self) -> bool:
        return self.result is not None or self.failure is not None


@dataclass
class Outcome:
    """What a finished round produced (results in task order)."""

    results: list[ClientResult]
    failures: list[ClientFailure]
    bytes_down: int
    bytes_up: int
    wire_down: int
    wire_up: int
    seconds: float
    per_client: dict[str, dict[str, Any]]
    dropped: int
    extra: dict[str, Any]


class RoundCollector:
    """Collects one round's results.

    Args:
        rnd: the round.
        tasks: the tasks of the round, in the order the strategy built them.
        rank_of: client id -> rank of the process serving it.
        expected: ``strategy.expected_result`` (task -> (weights spec, extras spec)).
        run_id / session: this run and this server process; other messages are dropped.
        max_message_bytes: results larger than this are rejected.
        timeout_s: a client not delivered this long after its task was sent is dropped.
        rules: the round rules (default: synchronous rounds).
        carried: async mode: the tasks of earlier rounds still in flight
            (:meth:`carry` of the previous round's collector).
        clock: the time source (``time.monotonic``).
    """

    def __init__(
        self,
        rnd: int,
        tasks: Sequence[ClientTask],
        *,
        rank_of: Callable[[int], int],
        expected: Callable[[ClientTask], tuple[Any, Any]],
        run_id: str,
        session: str,
        max_message_bytes: int,
        timeout_s: float,
        rules: RoundRules | None = None,
        carried: Sequence[_Slot] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.round = int(rnd)
        self.run_id = run_id
        self.session = session
        self.max_message_bytes = int(max_message_bytes)
        self.timeout_s = float(timeout_s)
        self.rules = rules if rules is not None else RoundRules()
        self.expected = expected
        self.clock = clock
        self.start = clock()
        self.slots: dict[int, _Slot] = {}
        for s in carried:
            s.fresh = False
            self.slots[s.task.client_id] = s
        for t in tasks:
            self.slots[t.client_id] = _Slot(t, rank_of(t.client_id))
        self.order = [t.client_id for t in tasks]
        self.num_new = len(tasks)
        self.dropped = 0
        #: clients that sent nothing within ``timeout_s`` of their task (their process may be gone)
        self.timed_out: list[int] = []
        self._soft_deadline: float | None = None

    # -------------------------------------------------------------- sending side
    def sent(self, client_id: int, *, at: float, payload_bytes: int, wire_bytes: int) -> None:
        s = self.slots[client_id]
        s.sent_at, s.bytes_down, s.wire_down = at, int(payload_bytes), int(wire_bytes)

    def fail(self, client_id: int, kind: str, reason: str) -> None:
        """Record a failure of a pending client (no-op once it delivered or failed)."""
        s = self.slots.get(client_id)
        if s is None or s.resolved:
            return
        log.warning("round %d: client %d %s: %s", self.round, client_id, kind, reason)
        s.failure = ClientFailure(s.task.round, client_id, kind, reason)

    def pending_of_rank(self, rank: int) -> list[int]:
        return [c for c, s in self.slots.items() if s.rank == rank and not s.resolved]

    # -------------------------------------------------------------- receiving side
    def offer(self, env: Envelope, wire_bytes: int, *, at: float | None = None) -> bool:
        """Take a result or failure envelope; False (and a logged reason) when it is dropped.

        ``at``: when the message was received (default: now); a result that came in while the
        server was between rounds keeps its true arrival time.
        """
        reason = self._check(env)
        if reason is not None:
            self.dropped += 1
            log.warning("round %d: dropped a %s from rank %d: %s", self.round, env.type, env.sender, reason)
            return False
        cid = int(env.body["client_id"])
        s = self.slots[cid]
        now = self.clock() if at is None else float(at)
        if env.type == FAILURE:
            self.fail(cid, "error", str(env.body.get("reason", "the client reported a failure"))[:2000])
            return True
        s.bytes_up, s.wire_up = len(env.payload), int(wire_bytes)
        w_spec, x_spec = self.expected(s.task)
        try:
            res = decode_result(
                env.payload, expect_round=s.task.round, expect_client=cid, expect_weights=w_spec, expect_extras=x_spec,
                max_bytes=self.max_message_bytes,
            )
        except PayloadError as err:
            self.fail(cid, "rejected", str(err))
            return True
        sent_at = s.sent_at if s.sent_at is not None else self.start
        s.seconds = now - sent_at
        s.arrived_at = now
        s.result = dataclasses.replace(res, completion_time=s.seconds)
        self._update_soft_deadline()
        return True

    def _check(self, env: Envelope) -> str | None:
        if env.type not in (RESULT, FAILURE):
            return f"a {env.type!r} message is not part of a round"
        if env.run_id != self.run_id:
            return f"it belongs to run {env.run_id!r}, this is {self.run_id!r}"
        if env.session != self.session:
            return "it answers a task of an earlier server session (the server restarted)"
        cid = env.body.get("client_id")
        if not isinstance(cid, int) or isinstance(cid, bool):
            return f"its client_id {cid!r} is not an integer"
        s = self.slots.get(cid)
        if s is None:
            if env.round != self.round:
                return f"it is for round {env.round}, the current round is {self.round}"
            return f"client {cid} was not asked to work in round {self.round}"
        if env.round != s.task.round:
            if s.task.round == self.round:
                return f"it is for round {env.round}, the current round is {self.round}"
            return f"it is for round {env.round}, client {cid}'s task in flight is of round {s.task.round}"
        if s.rank != env.sender:
            return f"client {cid} is served by rank {s.rank}, not by rank {env.sender} (unknown sender)"
        if s.resolved:
            return f"client {cid} already {'delivered' if s.result is not None else 'failed'} in this round"
        return None

    # -------------------------------------------------------------- timing
    def _arrivals(self) -> list[float]:
        """Arrival times (seconds since the round started) of this round's fresh results."""
        return [s.arrived_at - self.start for s in self.slots.values() if s.fresh and s.result is not None]

    def _update_soft_deadline(self) -> None:
        if self._soft_deadline is not None:
            return
        deadline = self.rules.deadline(self._arrivals(), self.num_new, complete=False)
        if deadline is not None:
            self._soft_deadline = self.start + deadline

    @property
    def done(self) -> bool:
        """The round can end: every client delivered or failed, or (async) enough results arrived."""
        if self.rules.mode == "async":
            arrived = sum(1 for s in self.slots.values() if s.result is not None)
            live = sum(1 for s in self.slots.values() if s.failure is None)
            return live == 0 or self.rules.async_ready(arrived, live)
        return all(s.resolved for s in self.slots.values())

    def next_deadline(self) -> float:
        """The clock time at which :meth:`expire` has something to do."""
        times = [
            (s.sent_at if s.sent_at is not None else self.start) + self.timeout_s
            for s in self.slots.values()
            if not s.resolved
        ]
        if self._soft_deadline is not None:
            times.append(self._soft_deadline)
        return min(times) if times else self.clock()

    def expire(self) -> None:
        """Fail every pending client whose time is up."""
        now = self.clock()
        for cid, s in self.slots.items():
            if s.resolved:
                continue
            sent_at = s.sent_at if s.sent_at is not None else self.start
            if now >= sent_at + self.timeout_s:
                self.fail(cid, "deadline", f"no result {self.timeout_s:g} s after its task was sent (train_args.round_timeout_s)")
                self.timed_out.append(cid)
            elif self._soft_deadline is not None and now >= self._soft_deadline:
                self.fail(cid, "deadline", f"not delivered by the round's deadline ({self._soft_deadline - self.start:.3f} s)")

    # -------------------------------------------------------------- the end
    def close(self) -> Outcome:
        """End the round now and return its outcome.

        Sync and deadline rounds fail whatever is still pending. Async rounds take the first
        ``async_m`` arrivals; the other tasks stay in flight (:meth:`carry`).
        """
        taken: set[int]
        if self.rules.mode == "async":
            assert self.rules.async_m is not None
            arrived = [(s.arrived_at, c) for c, s in self.slots.items() if s.result is not None]
            taken = {c for _, c in first_arrivals(arrived, self.rules.async_m)}
        else:
            for cid in list(self.slots):
                self.fail(cid, "deadline", "the round ended before its result arrived")
            taken = {c for c, s in self.slots.items() if s.result is not None}
        end = self.clock()
        order = [c for c in self.slots if c not in set(self.order)] + self.order  # carried tasks first
        results = [self.slots[c].result for c in order if c in taken]
        failures = [self.slots[c].failure for c in order if self.slots[c].failure is not None]
        reported = [c for c in order if self.slots[c].fresh or c in taken or self.slots[c].failure is not None]
        per_client: dict[str, dict[str, Any]] = {}
        for c in reported:
            s = self.slots[c]
            status = "ok" if c in taken else (s.failure.kind if s.failure is not None else "in_flight")
            per_client[str(c)] = {
                "rank": s.rank,
                "round": s.task.round,
                "bytes_down": s.bytes_down if s.fresh else 0,
                "bytes_up": s.bytes_up if (c in taken or s.failure is not None) else 0,
                "wire_down": s.wire_down if s.fresh else 0,
                "wire_up": s.wire_up if (c in taken or s.failure is not None) else 0,
                "seconds": s.seconds if math.isfinite(s.seconds) and c in taken else None,
                "status": status,
            }
        self._left = [s for c, s in self.slots.items() if c not in taken and s.failure is None]
        extra: dict[str, Any] = {}
        if self.rules.mode == "deadline":
            extra["deadline"] = (self._soft_deadline - self.start) if self._soft_deadline is not None else math.nan
            extra["num_late"] = sum(1 for f in failures if f is not None and f.kind == "deadline")
        if self.rules.mode == "async":
            stale = [self.round - self.slots[c].task.round for c in taken]
            extra["staleness_mean"] = sum(stale) / len(stale) if stale else math.nan
            extra["staleness_max"] = float(max(stale)) if stale else math.nan
            extra["num_in_flight"] = len(self._left)
        received = [s for c, s in self.slots.items() if c in taken or s.failure is not None]
        fresh = [s for s in self.slots.values() if s.fresh]
        return Outcome(
            results=[r for r in results if r is not None],
            failures=[f for f in failures if f is not None],
            bytes_down=sum(s.bytes_down for s in fresh),
            bytes_up=sum(s.bytes_up for s in received),
            wire_down=sum(s.wire_down for s in fresh),
            wire_up=sum(s.wire_up for s in received),
            seconds=end - self.start,
            per_client=per_client,
            dropped=self.dropped,
            extra=extra,
        )

    def carry(self) -> list[_Slot]:
        """Async mode: the tasks still in flight after :meth:`close` (arrived but not taken, or pending)."""
        return list(getattr(self, "_left", []))
