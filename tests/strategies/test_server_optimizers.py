"""Server optimizer wrappers around FedAvg, FedMP and PruneFL: hand-checked steps, masks, resume, recipes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.config import RecipeConfig, build_strategy
from lightning_fedprune.core.masks import MaskSet
from lightning_fedprune.core.messages import ClientMetrics, ClientResult
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.core.sparse import pack_state
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import initialize_strategy
from lightning_fedprune.strategies import WRAPPERS, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMP, FedYogi, ModelSpec, PruneFL


def _result(task, *, delta=1.0, samples=10):
    w = {k: v + delta if v.is_floating_point() else v for k, v in task.weights.items()}
    return ClientResult(round=task.round, client_id=task.client_id, weights=w, metrics=ClientMetrics(num_samples=samples, num_steps=1))


def _trainable(s):
    return list(s.trainable_keys)


def test_fedavgm_two_rounds_by_hand(tiny_module):
    s = FedAvgM(FedAvg(seed=0), server_lr=2.0, momentum=0.9)
    initialize_strategy(s, tiny_module(), num_clients=2)
    x0 = {k: v.clone() for k, v in s.global_state.items()}
    keys = _trainable(s)
    assert keys, "the tiny module has trainable tensors"
    # every client returns x + 1: a = x + 1, g = -1, m = -1, x1 = x + 2
    s.aggregate(0, [_result(t) for t in s.configure_round(0, [0, 1])], [])
    for k in keys:
        assert torch.allclose(s.global_state[k], x0[k] + 2.0, atol=1e-6)
    # round 2: g = -1 again, m = 0.9 * -1 - 1 = -1.9, x2 = x1 + 3.8 = x0 + 5.8
    metrics = s.aggregate(1, [_result(t) for t in s.configure_round(1, [0, 1])], [])
    for k in keys:
        assert torch.allclose(s.global_state[k], x0[k] + 5.8, atol=1e-5)
    n = sum(x0[k].numel() for k in keys)
    assert metrics["pseudo_grad_norm"] == pytest.approx(math.sqrt(n), rel=1e-6)
    assert metrics["num_results"] == 2.0


def test_fedavgm_without_momentum_and_lr_one_is_the_inner_strategy(tiny_module):
    plain, wrapped = FedAvg(seed=0), FedAvgM(FedAvg(seed=0), server_lr=1.0, momentum=0.0)
    for s in (plain, wrapped):
        initialize_strategy(s, tiny_module(seed=3), num_clients=2)
        s.aggregate(0, [_result(t, delta=0.25 * (t.client_id + 1), samples=10 + t.client_id) for t in s.configure_round(0, [0, 1])], [])
    for k, v in plain.global_state.items():
        assert torch.allclose(wrapped.global_state[k], v, atol=1e-6)


def test_fedadam_on_fedmp_steps_only_the_trained_positions(tiny_module):
    s = FedAdam(FedMP(seed=0, fixed_ratios={0: 0.5, 1: 0.5}), server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    initialize_strategy(s, tiny_module(), num_clients=2)
    x0 = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1])
    results = [_result(t) for t in tasks]
    covered = s.trained_positions(results)
    s.aggregate(0, results, [])
    # hand step where trained: g = -1, m = -0.1, v = 0.99 * 0.01 + 0.01 = 0.0199, x = x + 0.1 * 0.1 / (sqrt(v) + 0.1)
    step = 0.1 * 0.1 / (math.sqrt(0.0199) + 0.1)
    moved = untouched = 0
    for k in _trainable(s):
        cov = covered[k]
        assert cov.any()
        new = s.global_state[k]
        assert torch.allclose(new[cov], x0[k][cov] + step, atol=1e-6)
        assert torch.equal(new[~cov], x0[k][~cov])  # R2SP keeps them, and so does the step
        assert torch.equal(s.moment("m")[k][~cov], torch.zeros(int((~cov).sum())))
        assert torch.allclose(s.moment("v")[k][~cov], torch.full((int((~cov).sum()),), 0.01))
        moved += int(cov.sum())
        untouched += int((~cov).sum())
    assert moved > 0 and untouched > 0


def _prunefl():
    gen = torch.Generator().manual_seed(0)
    state = {"w1.weight": torch.randn(20, 30, generator=gen), "w1.bias": torch.randn(20, generator=gen),
             "w2.weight": torch.randn(4, 20, generator=gen), "w2.bias": torch.randn(4, generator=gen)}
    inner = PruneFL(initial_pruning="init", initial_level=2, fc_rates=(0.3, 0.2), seed=0)
    return inner, state


def test_fedyogi_on_prunefl_keeps_pruned_weights_at_zero():
    inner, state = _prunefl()
    s = FedYogi(inner, server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    s.initialize(ModelSpec(state={k: v.clone() for k, v in state.items()}, trainable=tuple(state)), num_clients=2)
    masks: MaskSet = inner.masks
    x0 = {k: v.clone() for k, v in s.global_state.items()}
    tasks = s.configure_round(0, [0, 1])
    results = [ClientResult(round=0, client_id=t.client_id, weights=pack_state({k: v + 1.0 for k, v in x0.items()}, masks),
                            metrics=ClientMetrics(num_samples=10, num_steps=1)) for t in tasks]
    s.aggregate(0, results, [])
    # yogi: v = 0.01 + 0.01 * 1 = 0.02 where trained (v < g^2 = 1)
    step = 0.1 * 0.1 / (math.sqrt(0.02) + 0.1)
    for k, x in x0.items():
        m = masks.masks[k] if k in masks.masks else torch.ones_like(x, dtype=torch.bool)
        assert torch.all(s.global_state[k][~m] == 0)
        assert torch.allclose(s.global_state[k][m], x[m] + step, atol=1e-6)


def test_a_rewinding_prunefl_is_refused():
    inner = PruneFL(initial_pruning="init", initial_level=2, fc_rates=(0.3, 0.2), reinitialize=True, seed=0)
    _, state = _prunefl()
    with pytest.raises(ConfigError, match="reinitialize"):
        FedAvgM(inner).initialize(ModelSpec(state=state, trainable=tuple(state)), num_clients=2)


@pytest.mark.parametrize("cls", [FedAvgM, FedAdagrad, FedAdam, FedYogi])
def test_state_dict_resumes_bit_for_bit(cls, tiny_module):
    def fresh():
        s = cls(FedAvg(seed=0), server_lr=0.5)
        initialize_strategy(s, tiny_module(), num_clients=2)
        return s

    a = fresh()
    for rnd in range(2):
        a.aggregate(rnd, [_result(t, delta=0.1 * (rnd + 1)) for t in a.configure_round(rnd, [0, 1])], [])
    b = fresh()
    b.load_state_dict(loads_state(dumps_state(a.state_dict())))
    for s in (a, b):
        s.aggregate(2, [_result(t, delta=-0.3) for t in s.configure_round(2, [0, 1])], [])
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v)


def test_registered_and_built_from_a_recipe_around_any_strategy():
    assert {"fedavgm", "fedadagrad", "fedadam", "fedyogi"} <= set(WRAPPERS)
    cfg = RecipeConfig.from_dict({
        "strategy": {"name": "fedmp", "wrappers": [{"name": "fedadam", "options": {"server_lr": 0.01, "tau": 0.001}}]},
    })
    s = build_strategy(cfg)
    assert isinstance(s, FedAdam) and isinstance(s.inner, FedMP) and s.server_lr == 0.01 and s.tau == 0.001
    with pytest.raises(ConfigError, match="beta1"):
        FedAdam(FedAvg(), beta1=1.5)
    with pytest.raises(ConfigError, match="server_lr"):
        build_strategy(RecipeConfig.from_dict({"strategy": {"name": "fedavg", "wrappers": [{"name": "fedyogi", "options": {"server_lr": -1}}]}}))


def test_the_cifar10_comparison_builds_every_optimizer():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    spec = importlib.util.spec_from_file_location("server_optimizers", root / "server_optimizers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = RecipeConfig.from_yaml(root / "cifar10_subset_fedavg.yaml")
    assert base.data.name == "cifar10_subset" and base.model.name == "resnet32_cifar"
    kinds = {}
    for label, overrides in script.VARIANTS.items():
        for inner in ("fedavg", "fedmp"):
            s = build_strategy(base.apply_overrides([*overrides, f"strategy.name={inner}"]))
            kinds[(label, inner)] = type(s).__name__
    assert kinds[("FedAdam", "fedmp")] == "FedAdam" and kinds[("FedAvg", "fedavg")] == "FedAvg"
    assert {kinds[(label, "fedavg")] for label in script.VARIANTS} == {"FedAvg", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi"}


def test_fedyogi_around_fedmp_runs_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from lightning_fedprune.simulation import build_run

    cfg = RecipeConfig.from_dict({
        "rounds": 3, "run_dir": str(tmp_path / "a"),
        "data": {"name": "digits", "num_clients": 3, "batch_size": 50},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "strategy": {"name": "fedmp", "options": {"fixed_ratios": {0: 0.0, 1: 0.3, 2: 0.6}},
                     "wrappers": [{"name": "fedyogi", "options": {"server_lr": 0.01}}]},
    })
    whole, rounds = build_run(cfg, listeners=[])
    whole.run(rounds)
    split_cfg = cfg.apply_overrides([f"run_dir={tmp_path / 'b'}"])
    first, _ = build_run(split_cfg, listeners=[])
    first.run(2)
    second, _ = build_run(split_cfg, listeners=[])
    second.run(3, resume=True)
    assert [r["test_accuracy"] for r in second.history] == [r["test_accuracy"] for r in whole.history]
    assert all(r["agg/pseudo_grad_norm"] > 0 for r in whole.history)
    for k, v in whole.strategy.global_state.items():
        assert torch.equal(second.strategy.global_state[k], v)
