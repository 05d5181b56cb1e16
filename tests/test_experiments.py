"""Tests of lightning_fedprune.experiments: the matched-ratio oracle and per-cluster ratio medians."""

from __future__ import annotations

import statistics

import pytest

from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.core.devices import fedmp_device_specs
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.experiments import client_ratio_medians, matched_ratios


def test_client_ratio_medians_by_hand():
    history = [
        {"round": 0, "agg/ratio/0": 0.1, "agg/ratio/1": 0.5},
        {"round": 1, "agg/ratio/0": 0.3, "agg/ratio/2": 0.7},
        {"round": 2, "agg/ratio/0": 0.2},
        {"round": 3},  # a round without FedMP ratios
    ]
    rows = client_ratio_medians(history, {"A": [0], "C": [1, 2]}, window=2)
    assert rows == [{"rounds": "0-1", "A": 0.2, "C": 0.6}, {"rounds": "2-3", "A": 0.2, "C": None}]
    assert client_ratio_medians([], {"A": [0]}) == []
    with pytest.raises(ConfigError, match="`window` must be >= 1, got 0"):
        client_ratio_medians(history, {"A": [0]}, window=0)


def test_matched_ratios_follow_the_clusters():
    cfg = RecipeConfig().apply_overrides([
        "strategy.name=fedmp", "strategy.local_steps=5", "devices.scenario=high", "model.name=mlp",
    ])
    ratios = matched_ratios(cfg, step=0.05)
    assert sorted(ratios) == list(range(10))
    assert min(ratios.values()) == 0.0  # the fastest worker keeps the full model
    assert all(0.0 <= r <= 0.95 for r in ratios.values())
    by_cluster: dict[str, list[float]] = {}
    for d in fedmp_device_specs("high", seed=0):
        by_cluster.setdefault(d.cluster, []).append(ratios[d.client])
    med = {k: statistics.median(v) for k, v in by_cluster.items()}
    assert med["A"] < med["B"] < med["C"], med
    with pytest.raises(ConfigError, match="needs `strategy.local_steps`"):
        matched_ratios(cfg.apply_overrides(["strategy.local_steps=null"]))
    with pytest.raises(ConfigError, match="needs a strategy that sends sub-models"):
        matched_ratios(cfg.apply_overrides(["strategy.name=fedavg"]))
    with pytest.raises(ConfigError, match="`step` and `max_ratio`"):
        matched_ratios(cfg, step=0.0)


def test_compare_fedmp_runs_syn_fl_the_oracle_and_variants(tmp_path):
    from lightning_fedprune.experiments import compare_fedmp

    base = RecipeConfig().apply_overrides(["strategy.name=fedmp", "strategy.local_steps=2", "model.name=mlp"])
    common = ["devices.scenario=high", "rounds=2", "target_accuracy=0.99", "checkpoint_every=1"]
    cmp = compare_fedmp(base, common, {"FedMP": [], "FedMP l=0.9": ["strategy.options.discount=0.9"]}, out_dir=tmp_path)
    assert list(cmp.results) == ["Syn-FL", "Oracle", "FedMP", "FedMP l=0.9"]
    assert cmp.results["Syn-FL"].overrides[:3] == ("strategy.name=fedavg", "strategy.options={}", "engine.mode=sync")
    # the oracle trains at the matched ratios; FedMP's rounds record every client's ratio
    oracle_ratios = {c: cmp.results["Oracle"].history[0][f"agg/ratio/{c}"] for c in range(10)}
    assert oracle_ratios == pytest.approx(cmp.matched)
    assert set(cmp.learned) == {"FedMP", "FedMP l=0.9"} and cmp.learned["FedMP"][0]["rounds"] == "0-1"
    assert set(cmp.matched_by_cluster()) == {"A", "B", "C"}
    assert all(v != v for v in cmp.speedups.values())  # nobody reached 99%: NaN speed-ups
    with pytest.raises(ConfigError, match="label 'Oracle' is taken"):
        compare_fedmp(base, common, {"Oracle": []}, out_dir=tmp_path, syn=False, oracle=False)
    with pytest.raises(ConfigError, match="needs `devices.scenario`"):
        compare_fedmp(base, [], {}, out_dir=tmp_path)


def test_match_ratios_by_hand():
    from lightning_fedprune.experiments import match_ratios

    grid = [0.0, 0.25, 0.5]
    seconds = [[1.0, 0.8, 0.6], [2.0, 1.0, 0.7], [3.0, 2.0, 1.5]]  # T* = 1.0 (worker 0, full model)
    assert match_ratios(grid, seconds) == {0: 0.0, 1: 0.25, 2: 0.5}  # worker 2 cannot reach T*: the last ratio
