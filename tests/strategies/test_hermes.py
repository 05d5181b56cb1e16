"""Hermes: per-client structured sub-networks, overlap-only averaging, pruning while accuracy holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_fedprune.callbacks.personal import personal_model
from lightning_fedprune.core.aggregation import overlap_average
from lightning_fedprune.core.messages import ClientMetrics, ClientResult
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import Hermes


def test_overlap_average_by_hand():
    g = {"w": torch.tensor([10.0, 10.0, 10.0, 10.0]), "n": torch.tensor([7, 7])}
    states = [{"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "n": torch.tensor([1, 2])}, {"w": torch.tensor([5.0, 6.0, 7.0, 8.0]), "n": torch.tensor([4, 4])}]
    masks = [{"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([True, False, True, False])}]  # "n": everyone
    out = overlap_average(g, states, masks, [1.0, 3.0])
    # position 0: (1*1 + 3*5) / 4 = 4; position 1: client 0 only -> 2; position 2: client 1 only -> 7; 3: nobody -> 10
    assert out["w"].tolist() == [4.0, 2.0, 7.0, 10.0]
    assert out["n"].tolist() == [3, 4]  # (1 + 3*4) / 4 = 3.25 -> 3; (2 + 12) / 4 = 3.5 -> 4


def _result(task, delta, samples, acc):
    weights = {k: v + delta if v.is_floating_point() else v for k, v in task.weights.items()}
    return ClientResult(task.round, task.client_id, weights, ClientMetrics(num_samples=samples, num_steps=1, extra={"local_test_acc": acc}))


def test_clients_overlapping_sub_networks_are_averaged_only_where_they_overlap(tiny_module):
    s = Hermes(accuracy_threshold=0.5, target_rate=0.75, seed=0)
    initialize_strategy(s, tiny_module(), num_clients=3)
    p = s.planner
    s._client_plans = {0: p.plan_from_indices([list(range(8))]), 1: p.plan_from_indices([list(range(4, 12))]), 2: p.plan_from_indices([[0, 1, 2, 3, 12, 13]])}
    s._rates = {0: 0.5, 1: 0.5, 2: 0.625}
    g = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1, 2])
    assert [t.weights["body.weight"].shape[0] for t in tasks] == [8, 8, 6]
    assert torch.equal(tasks[1].weights["body.weight"], g["body.weight"][4:12])  # each client gets its own channels
    # deltas +1, +2, +4 with 10, 20, 40 samples; only client 0 reaches the accuracy threshold
    metrics = s.aggregate(0, [_result(t, d, n, a) for t, d, n, a in zip(tasks, (1.0, 2.0, 4.0), (10, 20, 40), (0.9, 0.4, 0.1))], [])
    w, w0 = s.global_state["body.weight"], g["body.weight"]
    assert torch.allclose(w[0:4], w0[0:4] + (10 * 1 + 40 * 4) / 50)  # clients 0 and 2
    assert torch.allclose(w[4:8], w0[4:8] + (10 * 1 + 20 * 2) / 30)  # clients 0 and 1
    assert torch.allclose(w[8:12], w0[8:12] + 2.0)  # client 1 only
    assert torch.allclose(w[12:14], w0[12:14] + 4.0)  # client 2 only
    assert torch.equal(w[14:], w0[14:])  # nobody: untouched, bit for bit
    assert torch.allclose(s.global_state["classifier.bias"], g["classifier.bias"] + (10 + 40 + 160) / 70)  # everyone
    # client 0 (accuracy 0.9 >= 0.5) is pruned to 0.6: int(16 * 0.4) = 6 of its own 8 units; the others stay
    assert metrics["num_pruned"] == 1.0 and s.rate_of(0) == pytest.approx(0.6) and s.rate_of(1) == 0.5
    kept0 = set(s.client_plan(0).kept[0].tolist())
    assert len(kept0) == 6 and kept0 <= set(range(8))
    assert s.client_plan(1).kept[0].tolist() == list(range(4, 12))


def _engine(tiny_module, data, strategy, run_dir=None):
    runtime = ClientRuntime(tiny_module(), data=data, seed=3, client_callbacks=strategy.client_callbacks)
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(3, seed=1), seed=5, run_dir=run_dir)


def test_sub_networks_shrink_to_the_target_and_stay_personal(tiny_module, tiny_data):
    s = Hermes(accuracy_threshold=0.0, prune_step=0.25, target_rate=0.5, target_rates={2: 0.25}, local_steps=2, seed=0)
    eng = _engine(tiny_module, tiny_data, s)
    history = []
    for rnd in range(3):
        eng.run_round(rnd)
        history.append({c: set(s.client_plan(c).kept[0].tolist()) for c in range(3)})
    assert [len(history[r][0]) for r in range(3)] == [12, 8, 8]  # 16 -> 12 -> 8 hidden units, then the target holds
    assert [len(history[r][2]) for r in range(3)] == [12, 12, 12]  # its own target 0.25
    assert all(history[1][c] <= history[0][c] for c in range(3))  # each client's sub-networks are nested
    # the personalized models kept on the clients are the sub-networks they trained in round 2
    assert personal_model(eng.store.get(0))["weights"]["body.weight"].shape == (8, 8)
    assert personal_model(eng.store.get(2))["weights"]["body.weight"].shape == (12, 8)
    assert eng.history[-1]["local_acc_mean"] == eng.history[-1]["local_acc_mean"]  # evaluated (not NaN)


def test_resume_is_bit_identical(tiny_module, tiny_data, tmp_path):
    kw = {"accuracy_threshold": 0.0, "prune_step": 0.25, "target_rate": 0.5, "local_steps": 2, "seed": 0}
    a = _engine(tiny_module, tiny_data, Hermes(**kw), tmp_path / "a")
    a.run(3)
    _engine(tiny_module, tiny_data, Hermes(**kw), tmp_path / "b").run(2)
    b = _engine(tiny_module, tiny_data, Hermes(**kw), tmp_path / "b")
    b.run(3, resume=True)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    assert all(a.strategy.client_plan(c) == b.strategy.client_plan(c) and a.strategy.rate_of(c) == b.strategy.rate_of(c) for c in range(3))
    for c in range(3):
        pa, pb = personal_model(a.store.get(c)), personal_model(b.store.get(c))
        assert all(torch.equal(pa["weights"][k], pb["weights"][k]) for k in pa["weights"])


def test_a_result_without_local_accuracy_is_refused_and_the_global_model_stays_whole(tiny_module):
    s = Hermes(seed=0)
    initialize_strategy(s, tiny_module(), num_clients=2)
    g = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1])
    results = [_result(tasks[0], 1.0, 10, 0.9), ClientResult(0, 1, tasks[1].weights, ClientMetrics(num_samples=10, num_steps=1))]
    with pytest.raises(ConfigError, match=r"result of client 1 \(round 0\) has no finite metrics.extra\['local_test_acc'\]"):
        s.aggregate(0, results, [])
    assert all(torch.equal(s.global_state[k], v) for k, v in g.items())
    bad = dict(tasks[1].weights)
    bad["body.weight"] = torch.zeros(3, 8)
    with pytest.raises(PayloadError, match=r"result of client 1 \(round 0\) does not fit its sub-network: .*body.weight"):
        s.aggregate(0, [results[0], _result(dataclasses.replace(tasks[1], weights=bad), 0.0, 10, 0.9)], [])
    assert all(torch.equal(s.global_state[k], v) for k, v in g.items()) and s.rate_of(0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_rate": 1.0}, r"`target_rate` must be a number in \[0, 1\), got 1.0"),
        ({"target_rates": {3: -0.1}}, r"`target_rates\[3\]` must be a number in \[0, 1\), got -0.1"),
        ({"prune_step": 0.0}, r"`prune_step` must be a number in \(0, 1\), got 0.0"),
        ({"accuracy_threshold": 1.5}, r"`accuracy_threshold` must be a number in \[0, 1\], got 1.5"),
        ({"accuracy_key": ""}, r"`accuracy_key` must be a metric name"),
    ],
)
def test_bad_settings_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Hermes(**kwargs)
