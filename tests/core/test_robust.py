"""Robust aggregation rules by hand, and the wrappers that apply them to any strategy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_fedprune.core.messages import ClientMetrics, ClientResult
from lightning_fedprune.core.robust import clip_update, coordinate_median, trimmed_mean, update_norm
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.rounds import cap_samples
from lightning_fedprune.runtime import initialize_strategy
from lightning_fedprune.strategies import ClipUpdates, FedAvg, FedMP, PruneFL, RobustMean, Scaffold


def test_clip_update_by_hand():
    old = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    new = {"w": torch.tensor([4.0, 5.0]), "n": torch.tensor(4)}  # update (3, 4): norm 5
    out, norm = clip_update(new, old, 2.5)
    assert norm == 5.0 and torch.allclose(out["w"], torch.tensor([2.5, 3.0]))  # 1 + (3, 4) * 0.5
    assert torch.equal(out["n"], torch.tensor(4))  # integer tensors are not clipped
    same, n2 = clip_update(new, old, 5.0)
    assert n2 == 5.0 and same["w"] is new["w"]
    assert update_norm(new, old) == 5.0
    with pytest.raises(ConfigError, match="`max_norm` must be a number > 0"):
        clip_update(new, old, 0.0)


def test_median_and_trimmed_mean_by_hand():
    states = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -4.0])}, {"w": torch.tensor([100.0, 0.0])}, {"w": torch.tensor([3.0, 1.0])}]
    # sorted per position: (1, 2, 3, 100) and (-4, 0, 1, 10)
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(states[:3])["w"], torch.tensor([2.0, 0.0]))
    assert torch.equal(trimmed_mean(states, 0.25)["w"], torch.tensor([2.5, 0.5]))  # drops 1 of each end of 4
    assert torch.equal(trimmed_mean(states, 0.0)["w"], torch.tensor([26.5, 1.75]))
    with pytest.raises(ConfigError, match="`trim` must be in"):
        trimmed_mean(states, 0.5)
    with pytest.raises(ConfigError, match="one shape per key; 'w' comes in shapes"):
        coordinate_median([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


def _results(tasks, deltas, samples=10):
    out = []
    for t, d in zip(tasks, deltas):
        w = {k: v + d if v.is_floating_point() else v for k, v in t.weights.items()}
        out.append(ClientResult(t.round, t.client_id, w, ClientMetrics(num_samples=samples, num_steps=1)))
    return out


def test_a_median_wrapper_shrugs_off_one_poisoned_client(tiny_module):
    s = RobustMean(FedAvg(seed=0), rule="median")
    initialize_strategy(s, tiny_module(), num_clients=3)
    g = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1, 2])
    s.aggregate(0, _results(tasks, (0.1, 0.2, 1000.0)), [])
    assert torch.allclose(s.global_state["body.weight"], g["body.weight"] + 0.2)
    # over SCAFFOLD too: x + mean(dy) with every dy equal to the median's
    sc = RobustMean(Scaffold(seed=0), rule="trimmed_mean", trim=0.34)
    initialize_strategy(sc, tiny_module(), num_clients=3)
    tasks = sc.configure_round(0, [0, 1, 2])
    dc = {k: torch.zeros_like(v) for k, v in sc.control.items()}
    res = [dataclasses.replace(r, extras={f"scaffold.dc/{k}": v for k, v in dc.items()}) for r in _results(tasks, (0.1, 0.2, -50.0))]
    sc.aggregate(0, res, [])
    assert torch.allclose(sc.global_state["body.weight"], g["body.weight"] + 0.1)


def test_clipping_wrapper_bounds_each_update_and_checkpoints_tasks_in_flight(tiny_module):
    s = ClipUpdates(FedAvg(seed=0), max_norm=1.0)
    initialize_strategy(s, tiny_module(), num_clients=2)
    g = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1])
    n_float = sum(v.numel() for v in g.values() if v.is_floating_point())
    metrics = s.aggregate(0, _results(tasks, (0.0, 1.0)), [])
    # client 1's update (1 everywhere) has norm sqrt(n) and is scaled to 1: each entry 1/sqrt(n); averaged with 0
    expected = g["body.weight"] + 0.5 / math.sqrt(n_float)
    assert torch.allclose(s.global_state["body.weight"], expected, atol=1e-7)
    assert metrics["clipped"] == 1.0 and metrics["update_norm_max"] == pytest.approx(math.sqrt(n_float))
    s.configure_round(1, [0])
    fresh = ClipUpdates(FedAvg(seed=0), max_norm=1.0)
    fresh.load_state_dict(s.state_dict())
    assert list(fresh._sent) == [(1, 0)]


def test_robust_wrappers_refuse_packed_or_differently_shaped_weights(tiny_module):
    p = ClipUpdates(PruneFL(seed=0, fc_rates=0.2, initial_pruning="random", initial_level=1), max_norm=1.0)
    initialize_strategy(p, tiny_module(), num_clients=2)
    with pytest.raises(ConfigError, match="weights_format 'coo'"):
        p.configure_round(0, [0, 1])
    m = RobustMean(FedMP(seed=0, fixed_ratios={0: 0.0, 1: 0.5}))
    initialize_strategy(m, tiny_module(), num_clients=2)
    tasks = m.configure_round(0, [0, 1])
    with pytest.raises(ConfigError, match="one shape per key"):
        m.aggregate(0, _results(tasks, (0.1, 0.2)), [])


def test_reported_samples_are_capped_by_what_the_server_knows():
    res = [ClientResult(0, c, {}, ClientMetrics(num_samples=n, num_steps=1)) for c, n in ((0, 10), (1, 10**6))]
    out, capped = cap_samples(res, {0: 20, 1: 30}.__getitem__)
    assert [r.metrics.num_samples for r in out] == [10, 30] and capped == [1]
