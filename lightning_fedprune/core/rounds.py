"""When a round ends and who takes part: the round-mode rules, as pure functions of arrival times.

Both transports use these rules and nothing else: the simulation feeds them simulated arrival
times (all known once its clients trained), a FedML server feeds them real ones as results come in
(and so waits only as long as the rule says). Times are seconds since the round's tasks were sent.

Modes (:data:`MODES`):

* ``"sync"``: the round ends when every selected client delivered or failed (FedAvg, FedMP Eq. 6).
* ``"deadline"``: FedMP's fault-tolerant rounds. ``d`` is the arrival time of the
  ``ceil(deadline_fraction * selected)``-th result (85% by default); the deadline is
  ``deadline_factor * d`` (1.5 d). Results after it are late: dropped for the round (failures of
  kind ``"deadline"``), and their clients sit out ``deadline_backoff`` rounds
  (:meth:`RoundRules.bench_until`). When fewer results than that ever arrive (failures), ``d`` is
  the last arrival, so nobody who delivered is late.
* ``"async"``: FedMP's Algorithm 2. Every idle client gets a task; a round aggregates the first
  ``async_m`` arrivals among all tasks in flight (ties: lower client id); the others keep
  training and are aggregated in later rounds with their staleness.

Clients may join mid-training (``join_rounds``: client -> first round it exists).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lightning_fedprune.errors import ConfigError

__all__ = ["MODES", "RoundRules", "deadline_time", "split_late", "first_arrivals"]

#: the round modes
MODES = ("sync", "deadline", "async")


def deadline_time(arrivals: Sequence[float], num_selected: int, *, fraction: float, factor: float, complete: bool) -> float | None:
    """FedMP's round deadline from the arrival times seen so far.

    Args:
        arrivals: arrival times of the results delivered so far (any order).
        num_selected: clients asked to work in the round.
        fraction: the fraction of ``num_selected`` whose arrival sets ``d``.
        factor: the deadline is ``factor * d``.
        complete: no further result can arrive (every other client failed or the simulation knows
            all arrivals); then fewer than ``ceil(fraction * num_selected)`` arrivals set ``d`` to
            the last one.

    Returns:
        The deadline, or ``None`` while it is not known yet (or nothing arrived).
    """
    if not arrivals:
        return None
    k = max(1, math.ceil(fraction * num_selected - 1e-9))
    order = sorted(float(t) for t in arrivals)
    if len(order) >= k:
        return factor * order[k - 1]
    return factor * order[-1] if complete else None


def split_late(times: Mapping[int, float], deadline: float | None) -> tuple[list[int], list[int]]:
    """``(on_time, late)`` client ids (in ``times``' order); nobody is late without a deadline."""
    if deadline is None:
        return list(times), []
    on_time = [c for c, t in times.items() if t <= deadline]
    late = [c for c, t in times.items() if t > deadline]
    return on_time, late


def first_arrivals(flights: Iterable[tuple[float, int]], m: int) -> list[tuple[float, int]]:
    """The first ``m`` of ``(arrival time, client id)`` pairs, ties broken by the lower client id."""
    return sorted(((float(t), int(c)) for t, c in flights))[: max(0, int(m))]


@dataclass(frozen=True)
class RoundRules:
    """How rounds end and which clients may take part (see the module docstring).

    Args:
        mode: ``"sync"``, ``"deadline"`` or ``"async"``.
        deadline_fraction: deadline mode: the fraction of selected clients whose arrival sets ``d``.
        deadline_factor: deadline mode: the deadline is this times ``d``.
        deadline_backoff: deadline mode: rounds a late client sits out before it is asked again.
        async_m: async mode: results aggregated per round.
        join_rounds: client id -> the first round in which the client exists.

    Raises:
        ConfigError: a value out of range (naming the argument).
    """

    mode: str = "sync"
    deadline_fraction: float = 0.85
    deadline_factor: float = 1.5
    deadline_backoff: int = 1
    async_m: int | None = None
    join_rounds: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"`mode` must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.deadline_fraction <= 1.0:
            raise ConfigError(f"`deadline_fraction` must be in (0, 1], got {self.deadline_fraction}")
        if not (math.isfinite(self.deadline_factor) and self.deadline_factor >= 1.0):
            raise ConfigError(f"`deadline_factor` must be >= 1, got {self.deadline_factor}")
        if self.deadline_backoff < 0:
            raise ConfigError(f"`deadline_backoff` must be >= 0, got {self.deadline_backoff}")
        if self.mode == "async" and (self.async_m is None or self.async_m < 1):
            raise ConfigError(f"async mode needs `async_m` >= 1 (results aggregated per round), got {self.async_m}")
        bad = {c: r for c, r in self.join_rounds.items() if int(c) < 0 or int(r) < 0}
        if bad:
            raise ConfigError(f"`join_rounds` must map client ids >= 0 to rounds >= 0, got {bad}")
        object.__setattr__(self, "join_rounds", {int(c): int(r) for c, r in self.join_rounds.items()})

    # -------------------------------------------------------------- who takes part
    def eligible(self, clients: Iterable[int], rnd: int, *, benched: Mapping[int, int], busy: Collection[int] = ()) -> list[int]:
        """Clients among ``clients`` that may get a task in round ``rnd``, ascending.

        A client must have joined (``join_rounds``), not sit out a deadline miss (``benched``:
        client -> first round it is asked again) and, in async mode, not be ``busy`` with a task
        still in flight.
        """
        busy = set(busy) if self.mode == "async" else set()
        return sorted(
            int(c) for c in clients
            if self.join_rounds.get(int(c), 0) <= rnd and benched.get(int(c), 0) <= rnd and int(c) not in busy
        )

    def check_clients(self, num_clients: int) -> None:
        """Raise :class:`ConfigError` when ``join_rounds`` names a client outside ``0..num_clients-1``."""
        bad = [c for c in self.join_rounds if not 0 <= c < num_clients]
        if bad:
            raise ConfigError(f"`join_rounds` names clients {bad} outside 0..{num_clients - 1}")

    def bench_until(self, rnd: int) -> int:
        """The first round a client late in round ``rnd`` is asked again."""
        return int(rnd) + 1 + self.deadline_backoff

    # -------------------------------------------------------------- when the round ends
    def deadline(self, arrivals: Sequence[float], num_selected: int, *, complete: bool) -> float | None:
        """The round's deadline (deadline mode only; ``None`` otherwise or while unknown)."""
        if self.mode != "deadline":
            return None
        return deadline_time(arrivals, num_selected, fraction=self.deadline_fraction, factor=self.deadline_factor, complete=complete)

    def close(self, times: Mapping[int, float], num_selected: int) -> tuple[list[int], list[int], float, float | None]:
        """End a sync or deadline round whose arrival ``times`` (client -> seconds) are all known.

        Returns:
            ``(on_time, late, round_seconds, deadline)``: the round lasts until the deadline when
            somebody was late, else until the last on-time arrival (0 with no arrival).
        """
        deadline = self.deadline(list(times.values()), num_selected, complete=True)
        on_time, late = split_late(times, deadline)
        if late:
            assert deadline is not None
            seconds = deadline
        else:
            seconds = max((times[c] for c in on_time), default=0.0)
        return on_time, late, seconds, deadline

    def async_ready(self, num_arrived: int, num_in_flight: int) -> bool:
        """Async mode: the round can be aggregated (``async_m`` results, or all that are in flight)."""
        assert self.async_m is not None
        return num_arrived >= min(self.async_m, num_in_flight)
