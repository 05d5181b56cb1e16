"""Server-side round bookkeeping: what is accepted, dropped or rejected, and the measured times."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.core.messages import ClientMetrics, ClientResult, encode_result
from lightning_fedprune.core.rounds import RoundRules
from lightning_fedprune.fedml_adapters.envelope import Envelope
from lightning_fedprune.fedml_adapters.rounds import RoundCollector
from lightning_fedprune.strategies import FedAvg, ModelSpec


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _setup(tiny_module, *, clients=(0, 1, 2), timeout_s=10.0, **kw):
    module = tiny_module(seed=0)
    strategy = FedAvg(seed=0)
    strategy.initialize(ModelSpec(state=dict(module.federated_state()), trainable=module.trainable_names()), num_clients=3)
    tasks = strategy.configure_round(5, list(clients))
    clock = FakeClock()
    col = RoundCollector(
        5, tasks, rank_of=lambda c: c + 1, expected=strategy.expected_result, run_id="run", session="s1",
        max_message_bytes=1 << 20, timeout_s=timeout_s, clock=clock, **kw,
    )
    for t in tasks:
        col.sent(t.client_id, at=clock(), payload_bytes=100 + t.client_id, wire_bytes=150 + t.client_id)
    return strategy, tasks, col, clock


def _result_env(task, *, rank=None, rnd=5, session="s1", run="run", weights=None, client_id=None, samples=10):
    cid = task.client_id if client_id is None else client_id
    w = weights if weights is not None else {k: v + 1 for k, v in task.weights.items()}
    res = ClientResult(round=rnd, client_id=cid, weights=w, metrics=ClientMetrics(num_samples=samples, num_steps=2))
    payload = encode_result(res)
    return Envelope("result", cid + 1 if rank is None else rank, 0, run, session, rnd, body={"client_id": cid}, payload=payload)


def test_results_are_validated_timed_and_kept_in_task_order(tiny_module):
    strategy, tasks, col, clock = _setup(tiny_module)
    clock.t += 2.5
    assert col.offer(_result_env(tasks[2]), 999)
    clock.t += 1.0
    assert col.offer(_result_env(tasks[0]), 1000)
    assert not col.done
    assert col.offer(Envelope("failure", 2, 0, "run", "s1", 5, body={"client_id": 1, "reason": "RuntimeError: boom"}), 50)
    assert col.done
    out = col.close()
    assert [r.client_id for r in out.results] == [0, 2]  # the strategy's order, not arrival order
    assert [r.completion_time for r in out.results] == [pytest.approx(3.5), pytest.approx(2.5)]
    assert [(f.client_id, f.kind, f.reason) for f in out.failures] == [(1, "error", "RuntimeError: boom")]
    assert out.bytes_down == 100 + 101 + 102 and out.wire_down == 150 + 151 + 152
    assert out.bytes_up == len(_result_env(tasks[0]).payload) + len(_result_env(tasks[2]).payload)
    assert out.wire_up == 1999
    assert out.per_client["1"]["status"] == "error" and out.per_client["2"]["seconds"] == pytest.approx(2.5)
    assert out.seconds == pytest.approx(3.5)
    # the decoded tensors are what the client sent
    for k, v in tasks[0].weights.items():
        assert torch.equal(out.results[0].weights[k], v + 1)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda t: _result_env(t, rnd=4), "for round 4, the current round is 5"),
        (lambda t: _result_env(t, session="old"), "earlier server session"),
        (lambda t: _result_env(t, run="other"), "belongs to run 'other'"),
        (lambda t: _result_env(t, rank=3), "client 0 is served by rank 1, not by rank 3"),
        (lambda t: _result_env(t, client_id=9, rank=10), "client 9 was not asked"),
        (lambda t: Envelope("hello", 1, 0, "run", "s1", body={}), "not part of a round"),
    ],
)
def test_foreign_messages_are_dropped_and_the_round_goes_on(tiny_module, caplog, make, reason):
    _, tasks, col, _ = _setup(tiny_module)
    with caplog.at_level("WARNING"):
        assert not col.offer(make(tasks[0]), 10)
    assert reason in caplog.text and col.dropped == 1
    # the real client still delivers
    assert col.offer(_result_env(tasks[0]), 10)
    assert col.slots[0].result is not None


def test_a_result_that_does_not_match_its_task_is_rejected(tiny_module, caplog):
    _, tasks, col, _ = _setup(tiny_module)
    bad = {k: v for k, v in tasks[0].weights.items()}
    bad["body.weight"] = torch.zeros(3, 3)  # wrong shape for the plan it was sent
    with caplog.at_level("WARNING"):
        assert col.offer(_result_env(tasks[0], weights=bad), 10)
    assert "client 0 rejected" in caplog.text and "body.weight" in caplog.text
    assert col.slots[0].failure.kind == "rejected"
    # a second, valid result of the same client in the same round is not taken any more
    assert not col.offer(_result_env(tasks[0]), 10)
    nan = {k: v.clone() for k, v in tasks[1].weights.items()}
    nan["classifier.bias"][0] = math.nan
    assert col.offer(_result_env(tasks[1], weights=nan), 10)
    assert "NaN" in col.slots[1].failure.reason


def test_clients_that_do_not_deliver_are_dropped_at_the_deadline(tiny_module):
    _, tasks, col, clock = _setup(tiny_module, timeout_s=10.0)
    clock.t += 4.0
    col.offer(_result_env(tasks[1]), 10)
    assert col.next_deadline() == pytest.approx(110.0)
    clock.t = 109.9
    col.expire()
    assert not col.done
    clock.t = 110.0
    col.expire()
    assert col.done
    out = col.close()
    assert [r.client_id for r in out.results] == [1]
    assert [(f.client_id, f.kind) for f in out.failures] == [(0, "deadline"), (2, "deadline")]
    assert "round_timeout_s" in out.failures[0].reason


def test_fedmp_deadline_rounds_end_at_factor_times_the_quantile_arrival(tiny_module):
    # 3 selected, fraction 0.6 -> d = arrival of the 2nd result; deadline = 1.5 d
    rules = RoundRules(mode="deadline", deadline_fraction=0.6, deadline_factor=1.5)
    _, tasks, col, clock = _setup(tiny_module, timeout_s=100.0, rules=rules)
    clock.t += 2.0
    col.offer(_result_env(tasks[0]), 10)
    assert col.next_deadline() == pytest.approx(200.0)  # no soft deadline before the 2nd arrival
    clock.t += 2.0
    col.offer(_result_env(tasks[2]), 10)
    assert col.next_deadline() == pytest.approx(106.0)  # start 100 + 1.5 * 4
    clock.t = 106.0
    col.expire()
    out = col.close()
    assert [(f.client_id, f.kind) for f in out.failures] == [(1, "deadline")]
    assert out.extra == {"deadline": pytest.approx(6.0), "num_late": 1}
