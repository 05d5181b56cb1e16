"""PruneFL recipes: the data-free payload recipe end to end, and the YAML recipe through build_run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lightning_fedprune.callbacks import CLIENT_CALLBACKS
from lightning_fedprune.callbacks.masking import MaskingCallback
from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.simulation import build_run
from lightning_fedprune.strategies import STRATEGIES
from lightning_fedprune.strategies.prunefl import PruneFL

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "prunefl"


def _load(name: str):
    sys.path.insert(0, str(RECIPES))
    try:
        spec = importlib.util.spec_from_file_location(f"prunefl_recipe_{name}", RECIPES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(RECIPES))


def test_payload_recipe_finds_the_papers_break_even_level(tmp_path):
    out = _load("fig2_payload_size").main(["--out", str(tmp_path)])
    # Fig. 2 / Sec. 5.1.1: with 16-bit indices the sparse file is smaller from level 4 on
    assert out["smaller_from_level"] == 4
    by_level = {r["level"]: r for r in out["levels"]}
    assert abs(by_level[0]["bytes"] - by_level[0]["dense_bytes"]) < 100  # level 0 travels dense (+ the format tag)
    assert by_level[30]["bytes"] < 0.01 * by_level[30]["dense_bytes"]
    assert (tmp_path / "results.json").exists()


def test_prunefl_and_its_client_callback_are_registered_by_their_decorators():
    assert STRATEGIES["prunefl"] is PruneFL and PruneFL.registered_name == "prunefl"
    assert CLIENT_CALLBACKS["masks"] is MaskingCallback
    assert PruneFL().client_callbacks == ("masks",)


def test_yaml_recipe_runs_through_build_run(tmp_path):
    # the MNIST recipe on the shipped digits data (LeNet's input size comes from the dataset)
    cfg = RecipeConfig.from_yaml(RECIPES / "mnist_lenet_init15.yaml").apply_overrides(
        ["data.name=digits", "rounds=4", "eval_every=1", f"run_dir={tmp_path}", "strategy.options.prune_every=2",
         "strategy.options.initial_level=1", "strategy.options.target_level=2"]
    )
    engine, rounds = build_run(cfg, listeners=[])
    summary = engine.run(rounds)
    assert summary["total_failures"] == 0
    assert [r["agg/level"] for r in engine.history] == [1, 2, 2, 2]
    s = engine.strategy
    for k, m in s.masks.masks.items():
        assert bool((s.global_state[k][~m] == 0).all()), k
    assert 0.0 < engine.history[-1]["test_accuracy"] <= 1.0


def test_yaml_recipe_rejects_bad_prunefl_options():
    from lightning_fedprune.errors import ConfigError

    base = RecipeConfig.from_yaml(RECIPES / "mnist_lenet_init15.yaml")
    with pytest.raises(ConfigError, match=r"pruning rate of layer 'fc_rates\[2\]' must be a number in \[0, 1\), got 1.5"):
        build_run(base.apply_overrides(["data.name=digits", "strategy.options.fc_rates=[0.2, 0.2, 1.5]"]), listeners=[])
    with pytest.raises(ConfigError, match=r"`initial_pruning` can be none, sample, init, random; got 'magnitude'"):
        build_run(base.apply_overrides(["data.name=digits", "strategy.options.initial_pruning=magnitude"]), listeners=[])
