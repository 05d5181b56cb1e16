"""FedDP recipes: every YAML builds its run; the digits recipe trains gated clients end to end; the
CIFAR experiments skip cleanly without their data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_fedprune.callbacks.gates import GATE_STATE_KEY
from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.simulation import build_run
from lightning_fedprune.strategies import DynamicGates, FedDP, FedProx

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "feddp"


@pytest.mark.parametrize("name", ["digits_feddp", "cifar_vgg11", "cifar_resnet32"])
def test_recipes_parse_as_feddp(name):
    cfg = RecipeConfig.from_yaml(RECIPES / f"{name}.yaml")
    assert cfg.strategy.name == "feddp" and cfg.strategy.options["keep_ratio"] == 0.5


def test_the_digits_recipe_runs_gated_clients_and_a_wrapped_base(tmp_path):
    cfg = RecipeConfig.from_yaml(RECIPES / "digits_feddp.yaml").apply_overrides(
        ["rounds=1", "data.num_clients=3", "data.local_test_fraction=0.2", f"run_dir={tmp_path / 'a'}"]
    )
    engine, rounds = build_run(cfg, listeners=[])
    assert isinstance(engine.strategy, FedDP)
    engine.run(rounds)
    assert all(GATE_STATE_KEY in engine.store.get(c) for c in range(3))
    assert 0.0 <= engine.history[-1]["local_acc_mean"] <= 1.0
    wrapped = cfg.apply_overrides(
        ["strategy.name=fedprox", "strategy.options={mu: 0.01}", "strategy.wrappers=[{name: feddp, options: {keep_ratio: 0.25}}]",
         f"run_dir={tmp_path / 'b'}"]
    )
    engine, _ = build_run(wrapped, listeners=[])
    assert isinstance(engine.strategy, DynamicGates) and isinstance(engine.strategy.inner, FedProx)
    assert engine.strategy.keep_ratio == 0.25 and engine.strategy.client_callbacks == ("fedprox", "gates")


def test_a_recipe_gates_fedmp_sub_models(tmp_path):
    cfg = RecipeConfig.from_yaml(RECIPES / "digits_feddp.yaml").apply_overrides(
        ["rounds=1", "data.num_clients=3", "strategy.name=fedmp", "strategy.options={fixed_ratios: {0: 0.5, 1: 0.25}}",
         "strategy.wrappers=[{name: feddp, options: {keep_ratio: 0.5}}]", f"run_dir={tmp_path}"]
    )
    engine, rounds = build_run(cfg, listeners=[])
    assert isinstance(engine.strategy, DynamicGates) and engine.strategy.lasso == 1e-4
    engine.run(rounds)
    rec = engine.history[-1]
    assert rec["num_results"] == 3 and (rec["agg/ratio/0"], rec["agg/ratio/1"], rec["agg/ratio/2"]) == (0.5, 0.25, 0.0)
    # every client keeps its gates at the full width of cnn_digits (16 and 32 channels)
    for c in range(3):
        gates = engine.store.get(c)[GATE_STATE_KEY]
        assert gates["model.features.0/linear.weight"].shape == (16, 1)
        assert gates["model.features.3/linear.weight"].shape == (32, 16)


def test_the_cifar_experiments_skip_without_their_data(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("feddp_experiments", RECIPES / "experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["fig3", "--quick", "--out", str(tmp_path), "--set", f"data.root={tmp_path / 'nothing'}"]) == 0
    assert "skipped: the CIFAR-10 subset is not available" in capsys.readouterr().out
