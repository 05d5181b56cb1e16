"""NestFL through the engine: nested sub-models, resource-driven rates, personalization, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_fedprune.callbacks.personal import personal_model
from lightning_fedprune.core.devices import DeviceProfile
from lightning_fedprune.core.messages import ClientMetrics, ClientResult
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies.nestfl import NestFL


def _engine(tiny_module, data, strategy, **kw):
    runtime = ClientRuntime(tiny_module(), data=data, seed=3, client_callbacks=strategy.client_callbacks)
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(data.num_clients, seed=1), seed=5, **kw)


def _dev(gflops: float, mbps: float = 10.0, memory: float | None = None) -> DeviceProfile:
    bps = mbps * 1e6 / 8
    return DeviceProfile(gflops * 1e9, bps, bps, memory_bytes=memory)


def test_clients_train_nested_sub_models_and_keep_them_as_personalized_models(tiny_module, tiny_data):
    s = NestFL(fixed_rates={0: 0.0, 1: 0.25, 2: 0.5}, local_steps=3, seed=0)
    eng = _engine(tiny_module, tiny_data, s)
    rec = eng.run_round(0)
    assert rec["num_results"] == 3 and rec["agg/num_partitions"] == 3.0
    assert rec["agg/kept_fraction_min"] < rec["agg/kept_fraction_mean"] < 1.0
    assert s.global_state["body.weight"].shape == (16, 8)
    hidden = {}
    for c in range(3):
        personal = personal_model(eng.store.get(c))
        assert personal is not None and personal["round"] == 0
        hidden[c] = personal["weights"]["body.weight"].shape[0]
    assert hidden == {0: 16, 1: 12, 2: 8}  # absolute keep counts of the 16 hidden units
    assert all(rec[k] == rec[k] for k in ("local_acc_mean", "local_acc_min", "local_acc_max"))  # evaluated (not NaN)


def test_resource_driven_rates_follow_the_devices():
    # three devices 1, 10 and 100 GFLOP/s: with the median full-model time as the budget the
    # fastest trains the full model, the median one too (it fits exactly), the slowest prunes
    devices = [_dev(1.0), _dev(10.0), _dev(100.0)]
    s = NestFL(devices=devices, rate_grid=(0.0, 0.25, 0.5, 0.75), local_steps=20, batch_size=32, seed=0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    from lightning_fedprune.core.plans import Planner
    from lightning_fedprune.strategies import ModelSpec

    planner = Planner.from_module(module, torch.zeros(1, 8), unprunable=("2",))
    s.initialize(ModelSpec(state=dict(module.state_dict()), trainable=tuple(n for n, _ in module.named_parameters()), planner=planner), num_clients=3)
    rates = s.client_ratios(0, [0, 1, 2])
    assert rates[2] == 0.0 and rates[1] == 0.0 and rates[0] > 0.0
    budget = s.round_budget()
    for c, r in rates.items():  # each chosen rate fits, and the next smaller one does not
        assert s._seconds(devices[c], r, 20) <= budget
        smaller = [g for g in s.rate_grid if g < r]
        assert not smaller or s._seconds(devices[c], smaller[-1], 20) > budget
    # memory too small for anything but the smallest model; and an impossible budget
    tight = NestFL(devices=[_dev(100.0, memory=1.0)] * 3, round_budget_s=1e-9, infeasible="error", local_steps=1, seed=0)
    tight.initialize(ModelSpec(state=dict(module.state_dict()), trainable=tuple(n for n, _ in module.named_parameters()), planner=planner), num_clients=3)
    with pytest.raises(ConfigError, match=r"no rate of \[0.0, 0.25, 0.5, 0.75\] fits client 0 in round 0"):
        tight.client_ratios(0, [0])
    tight.infeasible = "smallest"
    assert tight.client_ratios(0, [1]) == {1: 0.75}


def test_resume_is_bit_identical(tiny_module, tiny_data, tmp_path):
    kw = {"fixed_rates": {0: 0.0, 1: 0.25, 2: 0.5}, "local_steps": 2, "seed": 0}
    a = _engine(tiny_module, tiny_data, NestFL(**kw), run_dir=tmp_path / "a")
    a.run(3)
    b1 = _engine(tiny_module, tiny_data, NestFL(**kw), run_dir=tmp_path / "b")
    b1.run(2)
    b2 = _engine(tiny_module, tiny_data, NestFL(**kw), run_dir=tmp_path / "b")
    b2.run(3, resume=True)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(b2.strategy.global_state[k], v), k
    assert b2.strategy._angle_count == a.strategy._angle_count and b2.strategy._angle_count[0] == 3
    for c in range(3):
        pa, pb = personal_model(a.store.get(c)), personal_model(b2.store.get(c))
        assert all(torch.equal(pa["weights"][k], pb["weights"][k]) for k in pa["weights"])


def test_angle_weighting_differs_from_sample_weighting(tiny_module, tiny_data):
    kw = {"fixed_rates": {0: 0.0, 1: 0.0, 2: 0.5}, "local_steps": 3, "seed": 0}
    by_angle = _engine(tiny_module, tiny_data, NestFL(**kw))
    by_samples = _engine(tiny_module, tiny_data, NestFL(weighting="samples", **kw))
    by_angle.run_round(0)
    by_samples.run_round(0)
    assert "agg/angle_mean" in by_angle.history[0] and "agg/angle_mean" not in by_samples.history[0]
    assert not torch.equal(by_angle.strategy.global_state["body.weight"], by_samples.strategy.global_state["body.weight"])


def test_a_result_that_does_not_fit_its_plan_leaves_the_global_model_whole(tiny_module):
    s = NestFL(fixed_rates={0: 0.25, 1: 0.5}, seed=0)
    initialize_strategy(s, tiny_module(), num_clients=2)
    before = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1])
    good = ClientResult(0, 0, {k: v + 1 for k, v in tasks[0].weights.items()}, ClientMetrics(num_samples=5, num_steps=1))
    bad_w = dict(tasks[1].weights)
    bad_w["body.weight"] = torch.zeros(3, 8)
    bad = ClientResult(0, 1, bad_w, ClientMetrics(num_samples=5, num_steps=1))
    with pytest.raises((PayloadError, ConfigError), match="body.weight"):
        s.aggregate(0, [good, bad], [])
    assert all(torch.equal(s.global_state[k], v) for k, v in before.items())
    with pytest.raises(PayloadError, match="no plan for client 0's task of round 3"):
        s.aggregate(0, [dataclasses.replace(good, round=3)], [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fixed_rates": {0: 1.0}}, r"`fixed_rates\[0\]` must be a pruning rate in \[0, 1\), got 1.0"),
        ({"fixed_rates": {}, "rate_grid": (0.0, -0.1)}, r"`rate_grid\[1\]` must be a pruning rate"),
        ({"fixed_rates": {}, "weighting": "fedadp"}, "`weighting` can be angle, samples"),
        ({}, "NestFL picks rates from the devices' resources: give `devices`"),
        ({"fixed_rates": {}, "round_budget_s": 0}, "`round_budget_s` must be null or a number of seconds > 0"),
    ],
)
def test_bad_settings_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NestFL(**kwargs)


def test_resources_are_needed_for_every_client(tiny_module):
    s = NestFL(devices=[_dev(1.0)] * 2, local_steps=1, seed=0)
    with pytest.raises(ConfigError, match="NestFL got 2 device profiles for 3 clients"):
        initialize_strategy(s, tiny_module(), num_clients=3)
