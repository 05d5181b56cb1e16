"""Strategies compose by wrapping; strategies, wrappers and client callbacks are registered by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_fedprune.callbacks import CLIENT_CALLBACKS, FederatedCallback, register_client_callback
from lightning_fedprune.config import RecipeConfig, build_strategy
from lightning_fedprune.core.messages import ClientMetrics, ClientResult
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import (
    STRATEGIES,
    WRAPPERS,
    FedAvg,
    FedMP,
    FedProx,
    Proximal,
    Scaffold,
    StrategyWrapper,
    register_strategy,
    register_wrapper,
    wrapper_options,
)


class Counting(StrategyWrapper):
    """Adds a task field, an extra, a client callback and a step after aggregation."""

    client_callbacks = ("counting",)

    def __init__(self, inner, *, tag: str = "x") -> None:
        super().__init__(inner)
        self.tag = tag
        self.rounds_aggregated = 0

    def wrap_task(self, task):
        return dataclasses.replace(task, config={**task.config, "tag": self.tag}, extras={**task.extras, "counting/one": torch.ones(1)})

    def after_aggregate(self, rnd, results, failures):
        self.rounds_aggregated += 1
        return {"counted": float(self.rounds_aggregated)}

    def wrapper_state(self):
        return {"rounds_aggregated": self.rounds_aggregated}

    def load_wrapper_state(self, state):
        self.rounds_aggregated = int(state.get("rounds_aggregated", 0))


def _result(task, *, samples=10, delta=1.0):
    w = {k: v + delta if v.is_floating_point() else v for k, v in task.weights.items()}
    return ClientResult(round=task.round, client_id=task.client_id, weights=w, metrics=ClientMetrics(num_samples=samples, num_steps=1))


def test_a_wrapper_adds_task_fields_callbacks_and_aggregation_steps_to_any_strategy(tiny_module):
    for inner in (FedAvg(seed=0), Scaffold(seed=0), FedMP(seed=0, fixed_ratios={0: 0.5, 1: 0.25})):
        s = Counting(inner, tag="t")
        initialize_strategy(s, tiny_module(), num_clients=2)
        assert s.client_callbacks == (*inner.client_callbacks, "counting")
        tasks = s.configure_round(0, [0, 1])
        assert all(t.config["tag"] == "t" and torch.equal(t.extras["counting/one"], torch.ones(1)) for t in tasks)
        metrics = s.aggregate(0, [_result(t) for t in tasks if not isinstance(inner, Scaffold)] or [], [])
        if not isinstance(inner, Scaffold):
            assert metrics["counted"] == 1.0 and metrics["num_results"] == 2.0
        # the inner strategy's attributes read through
        assert s.seed == 0 and s.global_state is inner.global_state


def test_proximal_wraps_fedmp_sub_models_and_their_aggregation(tiny_module, tiny_data):
    inner = FedMP(seed=1, fixed_ratios={0: 0.5, 1: 0.25, 2: 0.0})
    s = Proximal(inner, mu=0.1, client_local_steps={2: 1})
    assert s.client_callbacks == ("fedprox",) and s.requires_planner
    module = tiny_module()
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=s.client_callbacks)
    engine = SimulationEngine(strategy=s, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), seed=0)
    tasks = s.configure_round(0, [0, 1, 2])
    assert [t.config["prox_mu"] for t in tasks] == [0.1] * 3
    assert [t.config["weights_format"] for t in tasks] == ["submodel"] * 3
    assert (tasks[2].local_epochs, tasks[2].local_steps) == (None, 1)
    assert tasks[0].weights["body.weight"].shape == (8, 8)  # half of 16 hidden units
    inner._plans.clear()
    rec = engine.run_round(0)
    assert rec["num_results"] == 3 and rec["agg/ratio_max"] == 0.5
    assert s.global_state["body.weight"].shape == (16, 8)


def test_wrapped_strategies_checkpoint_the_wrapper_and_the_inner_state(tiny_module):
    s = Counting(FedAvg(seed=0))
    initialize_strategy(s, tiny_module(), num_clients=2)
    tasks = s.configure_round(0, [0, 1])
    s.aggregate(0, [_result(t) for t in tasks], [])
    state = s.state_dict()
    fresh = Counting(FedAvg(seed=0))
    fresh.load_state_dict(state)
    assert fresh.rounds_aggregated == 1
    assert all(torch.equal(fresh.global_state[k], v) for k, v in s.global_state.items())


def test_fedprox_is_fedavg_wrapped_by_proximal():
    s = FedProx(mu=0.3, fraction_fit=0.5, seed=2)
    assert isinstance(s, Proximal) and isinstance(s.innermost, FedAvg) and s.fraction_fit == 0.5
    assert STRATEGIES["fedprox"] is FedProx and WRAPPERS["fedprox"] is Proximal
    assert set(wrapper_options("fedprox")) == {"mu", "client_local_steps"}


def test_client_callbacks_are_per_instance():
    a, b = FedAvg(), FedAvg()
    a.client_callbacks = (*a.client_callbacks, "scaffold")
    assert b.client_callbacks == () and FedAvg.client_callbacks == ()


def test_registries_refuse_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="strategy 'fedavg' is already registered"):
        register_strategy("fedavg")(type("Other", (FedAvg,), {}))
    with pytest.raises(ValueError, match="wrapper 'fedprox' is already registered"):
        register_wrapper("fedprox")(type("Other", (StrategyWrapper,), {}))
    with pytest.raises(ValueError, match="client callback 'fedprox' is already registered"):
        register_client_callback("fedprox")(type("Other", (FederatedCallback,), {}))
    assert CLIENT_CALLBACKS["fedprox"].__name__ == "FedProxCallback"


# ----------------------------------------------------------------------------- recipes
def _recipe(**strategy):
    return RecipeConfig.from_dict({"data": {"num_clients": 4}, "strategy": strategy})


def test_a_recipe_wraps_its_strategy():
    cfg = _recipe(name="fedmp", options={"fixed_ratios": {0: 0.5}}, wrappers=[{"name": "fedprox", "options": {"mu": 0.05}}])
    s = build_strategy(cfg)
    assert isinstance(s, Proximal) and isinstance(s.inner, FedMP) and s.mu == 0.05 and s.fixed_ratios == {0: 0.5}
    again = RecipeConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "wrappers, match",
    [
        ([{"name": "fedprx"}], r"`strategy.wrappers\[0\].name` can be feddp, fedprox; got 'fedprx'. Did you mean `fedprox`"),
        (
            [{"name": "fedprox", "options": {"muu": 1}}],
            r"unknown key `strategy.wrappers\[0\].options.muu` for wrapper 'fedprox'; valid options: client_local_steps, mu",
        ),
        ([{"name": "fedprox", "options": {"mu": "big"}}], r"`strategy.wrappers\[0\].options.mu` must be a number"),
        ([{"name": "fedprox", "extra": 1}], r"unknown key `strategy.wrappers\[0\].extra`|unknown key `extra`"),
    ],
)
def test_wrapper_options_are_checked_like_strategy_options(wrappers, match):
    with pytest.raises(ConfigError, match=match):
        _recipe(name="fedavg", wrappers=wrappers)


def test_capability_scaled_work_goes_to_a_wrapper_that_takes_it():
    cfg = RecipeConfig.from_dict({
        "data": {"num_clients": 4}, "devices": {"compute_gflops": [1.0, 8.0]},
        "strategy": {"name": "fedavg", "local_steps": 8, "local_work_by_capability": True, "wrappers": [{"name": "fedprox"}]},
    })
    from lightning_fedprune.config import build_devices

    devices = build_devices(cfg)
    s = build_strategy(cfg, devices=devices)
    fastest = max(d.flops_per_second for d in devices)
    assert s.client_local_steps == {c: max(1, round(8 * d.flops_per_second / fastest)) for c, d in enumerate(devices)}
    with pytest.raises(ConfigError, match="local_work_by_capability"):
        _recipe(name="fedavg", local_work_by_capability=True)
