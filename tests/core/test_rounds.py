"""The round-mode rules on hand-made arrival times (one implementation, both transports)."""

from __future__ import annotations

import math

import pytest

from lightning_fedprune.core.rounds import RoundRules, deadline_time, first_arrivals, split_late
from lightning_fedprune.errors import ConfigError


# ----------------------------------------------------------------------------- deadline
def test_deadline_is_factor_times_the_arrival_of_the_85_percent_client():
    # 10 selected: k = ceil(0.85 * 10) = 9 -> d = 9th arrival = 9.0; deadline = 1.5 * 9 = 13.5
    arrivals = [3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 20.0]
    assert deadline_time(arrivals, 10, fraction=0.85, factor=1.5, complete=True) == 13.5
    # 4 selected: k = ceil(3.4) = 4 -> the last of 4
    assert deadline_time([1.0, 2.0, 3.0, 10.0], 4, fraction=0.85, factor=1.5, complete=True) == 15.0
    # fraction 0.6 of 3 selected: k = ceil(1.8) = 2
    assert deadline_time([2.0, 4.0], 3, fraction=0.6, factor=1.5, complete=False) == 6.0


def test_deadline_is_unknown_until_enough_arrived_unless_no_more_can_come():
    assert deadline_time([], 5, fraction=0.85, factor=1.5, complete=True) is None
    # 5 selected, k = 5; only 2 arrived so far: a live round keeps waiting
    assert deadline_time([1.0, 2.0], 5, fraction=0.85, factor=1.5, complete=False) is None
    # ... but when the others failed, d is the last arrival (nobody who delivered is late)
    assert deadline_time([1.0, 2.0], 5, fraction=0.85, factor=1.5, complete=True) == 3.0


def test_exact_fraction_products_do_not_round_up_a_client():
    # 0.85 * 20 = 17.000000000000004 in floats: still the 17th arrival
    arrivals = [float(i) for i in range(1, 21)]
    assert deadline_time(arrivals, 20, fraction=0.85, factor=1.0, complete=True) == 17.0


def test_split_late_keeps_the_given_order():
    times = {4: 9.0, 1: 2.0, 7: 14.0, 2: 13.5}
    assert split_late(times, 13.5) == ([4, 1, 2], [7])
    assert split_late(times, None) == ([4, 1, 7, 2], [])


def test_close_of_a_deadline_round():
    rules = RoundRules(mode="deadline", deadline_fraction=0.75, deadline_factor=1.5)
    # 4 selected, k = 3 -> d = 4.0, deadline 6.0: client 3 (7.0) is late; the round lasts 6.0
    on_time, late, seconds, deadline = rules.close({0: 1.0, 1: 4.0, 2: 2.5, 3: 7.0}, 4)
    assert (on_time, late, seconds, deadline) == ([0, 1, 2], [3], 6.0, 6.0)
    # nobody late: the round lasts until the last arrival
    assert rules.close({0: 1.0, 1: 4.0, 2: 2.5, 3: 5.0}, 4) == ([0, 1, 2, 3], [], 5.0, 6.0)


def test_close_of_a_sync_round_waits_for_the_slowest():
    rules = RoundRules()
    assert rules.close({0: 1.0, 1: 40.0}, 2) == ([0, 1], [], 40.0, None)
    assert rules.close({}, 3) == ([], [], 0.0, None)
    assert rules.deadline([1.0, 2.0], 2, complete=True) is None


# ----------------------------------------------------------------------------- async
def test_first_arrivals_break_ties_by_client_id():
    flights = [(5.0, 3), (2.0, 9), (5.0, 1), (7.0, 0), (2.0, 4)]
    assert first_arrivals(flights, 3) == [(2.0, 4), (2.0, 9), (5.0, 1)]
    assert first_arrivals(flights, 0) == []
    assert len(first_arrivals(flights, 10)) == 5


def test_async_round_is_ready_with_m_results_or_all_that_can_come():
    rules = RoundRules(mode="async", async_m=3)
    assert not rules.async_ready(2, 5)
    assert rules.async_ready(3, 5)
    assert rules.async_ready(2, 2)  # only two tasks are still alive


# ----------------------------------------------------------------------------- who takes part
def test_eligible_applies_joins_benching_and_busy_clients():
    rules = RoundRules(mode="async", async_m=1, join_rounds={5: 3})
    benched = {2: 4}  # late in round 2 with backoff 1: asked again from round 4
    assert rules.eligible([0, 1, 2, 5], 3, benched=benched, busy={1}) == [0, 5]
    assert rules.eligible([5, 2, 0], 2, benched=benched, busy=()) == [0]
    assert rules.eligible([0, 1, 2, 5], 4, benched=benched, busy=set()) == [0, 1, 2, 5]
    # busy clients only matter in async mode
    assert RoundRules().eligible([0, 1], 0, benched={}, busy={1}) == [0, 1]


def test_bench_until_counts_the_backoff():
    assert RoundRules(mode="deadline", deadline_backoff=1).bench_until(2) == 4
    assert RoundRules(mode="deadline", deadline_backoff=0).bench_until(2) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "fast"}, "`mode` must be one of"),
        ({"deadline_fraction": 0.0}, "`deadline_fraction` must be in"),
        ({"deadline_factor": 0.5}, "`deadline_factor` must be >= 1"),
        ({"deadline_factor": math.inf}, "`deadline_factor` must be >= 1"),
        ({"deadline_backoff": -1}, "`deadline_backoff` must be >= 0"),
        ({"mode": "async"}, "async mode needs `async_m` >= 1"),
        ({"join_rounds": {-1: 2}}, "`join_rounds` must map client ids >= 0"),
    ],
)
def test_invalid_rules_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RoundRules(**kwargs)


def test_join_rounds_outside_the_run_are_refused():
    with pytest.raises(ConfigError, match=r"`join_rounds` names clients \[7\] outside 0..2"):
        RoundRules(join_rounds={7: 1}).check_clients(3)
