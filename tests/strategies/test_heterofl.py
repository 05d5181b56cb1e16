"""HeteroFL: first-channel nested sub-models, count-weighted overlap averaging, scaler, static BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedprune.callbacks import HeteroFLScaler, StaticBatchNorm
from lightning_fedprune.callbacks.base import ClientContext
from lightning_fedprune.core.messages import ClientMetrics, ClientResult, ClientTask
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import HeteroFL


def test_sub_models_take_the_first_channels_and_overlaps_are_count_averaged(tiny_module):
    s = HeteroFL(rates={0: 0.0, 1: 0.5, 2: 0.75}, seed=0)
    initialize_strategy(s, tiny_module(), num_clients=3)
    g = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1, 2])
    assert [t.weights["body.weight"].shape[0] for t in tasks] == [16, 8, 4]
    assert torch.equal(tasks[2].weights["body.weight"], g["body.weight"][:4])  # the FIRST 4 hidden units
    # clients send their sub-model + 1, + 2, + 4; samples 10, 20, 40 (ignored: each client counts once)
    results = [
        ClientResult(0, t.client_id, {k: v + d if v.is_floating_point() else v for k, v in t.weights.items()}, ClientMetrics(num_samples=n, num_steps=1))
        for t, d, n in zip(tasks, (1.0, 2.0, 4.0), (10, 20, 40))
    ]
    s.aggregate(0, results, [])
    w = s.global_state["body.weight"]
    assert torch.allclose(w[:4], g["body.weight"][:4] + (1 + 2 + 4) / 3)  # units 0-3: all three
    assert torch.allclose(w[4:8], g["body.weight"][4:8] + (1 + 2) / 2)  # units 4-7: clients 0, 1
    assert torch.allclose(w[8:], g["body.weight"][8:] + 1)  # units 8-15: client 0 only
    assert torch.allclose(s.global_state["classifier.bias"], g["classifier.bias"] + 7 / 3)


def test_fix_assignment_by_proportion_and_dynamic_assignment():
    s = HeteroFL(levels=(0.0, 0.5), level_proportions=(1, 3), seed=0)
    s.num_clients = 8
    assert s.client_ratios(0, list(range(8))) == {0: 0.0, 1: 0.0, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.5}
    d = HeteroFL(assignment="dynamic", levels=(0.0, 0.5), seed=0)
    draws = [d.client_ratios(r, [0])[0] for r in range(40)]
    assert set(draws) == {0.0, 0.5} and draws == [HeteroFL(assignment="dynamic", levels=(0.0, 0.5), seed=0).client_ratios(r, [0])[0] for r in range(40)]


def test_the_scaler_divides_hidden_outputs_by_the_kept_fraction_while_training(tiny_module):
    module = tiny_module()
    x = torch.randn(5, 8)
    plain_hidden = module.body(x)
    cb = HeteroFLScaler()
    ctx = ClientContext(task=ClientTask(0, 0, {}, config={"pruning_ratio": 0.75}), state={})
    cb.transform_module(None, module, ctx)
    module.train()
    assert torch.allclose(module.body(x), plain_hidden * 4.0)  # q = 0.25
    assert torch.equal(module.classifier(plain_hidden), module.classifier(plain_hidden))  # classifier untouched
    module.eval()
    assert torch.allclose(module.body(x), plain_hidden)  # evaluation: no scaling
    cb.on_client_end(None, module, ctx)
    module.train()
    assert torch.allclose(module.body(x), plain_hidden)


def test_static_bn_keeps_running_statistics_while_training():
    bn = nn.BatchNorm1d(3)
    holder = nn.Sequential(bn)
    cb = StaticBatchNorm()
    cb.transform_module(None, holder, None)
    holder.train()
    out = holder(torch.randn(16, 3) * 5 + 2)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-5)  # normalized with the batch's statistics
    cb.on_client_end(None, holder, None)
    assert bn.momentum == 0.1


def test_heterofl_runs_through_the_engine(tiny_module, tiny_data):
    s = HeteroFL(rates={0: 0.0, 1: 0.5, 2: 0.75}, local_steps=2, seed=0)
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0, client_callbacks=s.client_callbacks)
    eng = SimulationEngine(strategy=s, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0))
    recs = [eng.run_round(r) for r in range(2)]
    assert all(r["num_results"] == 3 and r["agg/num_partitions"] == 3.0 for r in recs)
    assert s.client_callbacks == ("heterofl_scaler", "heterofl_static_bn")


def test_bad_settings():
    with pytest.raises(ConfigError, match="`assignment` can be fix, dynamic"):
        HeteroFL(assignment="random")
    with pytest.raises(ConfigError, match=r"`levels\[1\]` must be a pruning rate"):
        HeteroFL(levels=(0.0, 1.0))
    with pytest.raises(ConfigError, match="`level_proportions` must be 2 numbers"):
        HeteroFL(levels=(0.0, 0.5), level_proportions=(1.0,))
