"""Tests of lightning_fedprune.config: typed recipe loading, overrides and building a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_fedprune.config import (
    DataConfig,
    FederatedClassifier,
    FederatedLanguageModel,
    RecipeConfig,
    strategy_options,
)
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.simulation import build_run
from lightning_fedprune.strategies import STRATEGIES

torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def test_defaults_and_name_from_file(tmp_path):
    cfg = RecipeConfig.from_yaml(_write(tmp_path, {"rounds": 3}, "my_exp.yaml"))
    assert cfg.name == "my_exp" and cfg.rounds == 3
    assert cfg.data == DataConfig()
    assert cfg.resolved_run_dir() == Path("runs/my_exp")
    assert cfg.apply_overrides(["run_dir=out/x"]).resolved_run_dir() == Path("out/x")


def test_yaml_round_trip(tmp_path):
    cfg = RecipeConfig.from_yaml(RECIPES / "digits_fednova.yaml")
    again = RecipeConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert cfg.strategy.options["local_epochs_range"] == [1, 3]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    cfg = RecipeConfig.from_yaml(path)
    assert cfg.name == path.stem
    assert cfg.run_dir is None  # default runs/<name>


def test_int_coerced_to_float_and_span_lists():
    cfg = RecipeConfig.from_dict({"model": {"lr": 1}, "devices": {"compute_gflops": 5, "uplink_mbps": [1, 2]}})
    assert cfg.model.lr == 1.0 and isinstance(cfg.model.lr, float)
    assert cfg.devices.compute_gflops == 5.0 and cfg.devices.uplink_mbps == [1.0, 2.0]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"roundz": 3}, r"unknown key `roundz`.*Did you mean `rounds`"),
        ({"data": {"batchsize": 3}}, r"unknown key `data\.batchsize`; valid keys in `data`: .*batch_size"),
        ({"strategy": {"options": {"mu": 0.1}}}, r"`strategy\.options\.mu` for strategy 'fedavg'; valid options: local_epochs_range, weighted"),
        ({"strategy": {"name": "fedprox", "options": {"fraction_fit": 0.5}}}, r"`strategy\.options\.fraction_fit`: set it as `strategy\.fraction_fit`"),
        ({"trainer": {"max_epochs": 2}}, r"`trainer\.max_epochs` cannot be set"),
        ({"trainer": {"gradient_clip": 2}}, r"unknown key `trainer\.gradient_clip`.*gradient_clip_val"),
        ({"data": []}, r"`data` must be a mapping"),
    ],
)
def test_unknown_keys(data, match):
    with pytest.raises(ConfigError, match=match):
        RecipeConfig.from_dict(data)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"data": {"batch_size": 3.5}}, r"`data\.batch_size` must be an integer, got 3\.5 \(float\)"),
        ({"rounds": "ten"}, r"`rounds` must be an integer, got 'ten' \(str\)"),
        ({"rounds": True}, r"`rounds` must be an integer, got True \(bool\)"),
        ({"model": {"lr": "fast"}}, r"`model\.lr` must be a number, got 'fast'"),
        ({"target_accuracy": "high"}, r"`target_accuracy` must be a number or null"),
        ({"data": {"options": [1]}}, r"`data\.options` must be a mapping"),
        ({"devices": {"uplink_mbps": ["a", 2]}}, r"`devices\.uplink_mbps` must be a number or a list of numbers"),
        ({"strategy": {"name": "fedprox", "options": {"mu": "x"}}}, r"`strategy\.options\.mu` must be a number"),
    ],
)
def test_wrong_types(data, match):
    with pytest.raises(ConfigError, match=match):
        RecipeConfig.from_dict(data)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"strategy": {"name": "fedsgd"}}, r"`strategy\.name` can be " + ", ".join(sorted(STRATEGIES)) + "; got 'fedsgd'. Did you mean"),
        ({"data": {"name": "imagenet"}}, r"`data\.name` can be .*digits.*got 'imagenet'"),
        ({"model": {"name": "mpl"}}, r"`model\.name` can be .*Did you mean `mlp`.*timm"),
        ({"model": {"optimizer": "rmsprop"}}, r"`model\.optimizer` can be sgd, adam"),
        ({"data": {"partition": "dirichlett"}}, r"`data\.partition` can be .*Did you mean `dirichlet`"),
        ({"rounds": 0}, r"`rounds` must be an integer >= 1"),
        ({"target_accuracy": 95}, r"`target_accuracy` must be null or a number in \(0, 1\]"),
        ({"devices": {"compute_gflops": [10, 1]}}, r"`devices\.compute_gflops` must be a number > 0 or \[lo, hi\]"),
        ({"model": {"momentum": 0.9}, "strategy": {"name": "fednova", "options": {"momentum": 0.5}}}, r"`strategy\.options\.momentum`.*`model\.momentum`"),
        ({"model": {"lr_schedule": "cosin"}}, r"`model\.lr_schedule` can be constant, cosine; got 'cosin'\. Did you mean `cosine`"),
        ({"model": {"lr_schedule": "cosine"}, "strategy": {"local_steps": 10}}, r"`model\.lr_schedule: cosine`.* `strategy\.local_steps` \(10\)"),
    ],
)
def test_invalid_choices(data, match):
    with pytest.raises(ConfigError, match=match):
        RecipeConfig.from_dict(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        RecipeConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RecipeConfig.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        RecipeConfig.from_yaml(bad)


def test_strategy_options_follow_kwargs_chain():
    assert {"mu", "fraction_fit", "local_epochs_range", "seed"} <= set(strategy_options("fedprox"))
    assert {"momentum", "server_lr"} <= set(strategy_options("fednova"))
    assert "mu" not in strategy_options("fedavg")


# ------------------------------------------------------------------------------------------
# overrides
# ------------------------------------------------------------------------------------------


def test_override_parsing_types():
    base = RecipeConfig()
    cfg = base.apply_overrides(
        [
            "rounds=5",
            "model.lr=1",  # int -> float
            "strategy.name=fedprox",
            "strategy.options.mu=0.1",
            "strategy.options.local_epochs_range=[1, 3]",
            "strategy.local_steps=null",
            "data.partition=dirichlet",
            "data.partition_options.beta=0.5",
            "run_dir=2024",  # a number given for a text key stays text
            "target_accuracy=0.9",
            "trainer.gradient_clip_val=0.25",
            "devices.compute_gflops=[2, 4]",
        ]
    )
    assert cfg.rounds == 5
    assert cfg.model.lr == 1.0 and isinstance(cfg.model.lr, float)
    assert cfg.strategy.name == "fedprox"
    assert cfg.strategy.options == {"mu": 0.1, "local_epochs_range": [1, 3]}
    assert cfg.strategy.local_steps is None
    assert cfg.data.partition_options == {"beta": 0.5}
    assert cfg.run_dir == "2024"
    assert cfg.target_accuracy == 0.9
    assert cfg.trainer == {"gradient_clip_val": 0.25}
    assert cfg.devices.compute_gflops == [2.0, 4.0]
    assert base.rounds == 30  # the original is untouched


@pytest.mark.parametrize(
    "override, match",
    [
        ("strategy.nme=fedprox", r"unknown key `strategy\.nme`.*valid keys in `strategy`: name, fraction_fit"),
        ("modle.lr=0.1", r"unknown key `modle`.*Did you mean `model`"),
        ("rounds", r"must look like key=value"),
        ("=3", r"must look like key=value"),
        ("rounds=[1,", r"cannot parse the value of `rounds`"),
        ("rounds=1.5", r"`rounds` must be an integer, got 1\.5"),
        ("rounds.x=1", r"`rounds` is an integer, it has no key `x`"),
        ("strategy.name=fedsgd", r"`strategy\.name` can be fedavg"),
        ("strategy.options.mu=0.1", r"`strategy\.options\.mu` for strategy 'fedavg'"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        RecipeConfig().apply_overrides([override])


# ------------------------------------------------------------------------------------------
# build_run
# ------------------------------------------------------------------------------------------


def test_build_run_composes_objects(tmp_path):
    cfg = RecipeConfig.from_yaml(RECIPES / "digits_fednova.yaml").apply_overrides(
        [f"run_dir={tmp_path}", "data.num_clients=4", "rounds=2", "eval_every=2"]
    )
    engine, rounds = build_run(cfg, listeners=[])
    assert rounds == 2
    assert engine.num_clients == 4 and len(engine.devices) == 4
    assert engine.run_dir == tmp_path and engine.eval_every == 2
    assert engine.target_accuracy == 0.9 and engine.perplexity is False
    strategy = engine.strategy
    assert type(strategy).__name__ == "FedNova"
    assert strategy.momentum == cfg.model.momentum == 0.9  # filled in from model.momentum
    assert strategy.local_epochs_range == (1, 3) and strategy.seed == cfg.seed
    module = engine.runtime.module
    assert isinstance(module, FederatedClassifier)
    assert module.federated_example_input_shape == (64,)
    assert module.model.features[0].in_features == 64  # in_features from the dataset
    assert module.model.classifier.out_features == 10
    assert module.lr == 0.05
    assert torch.get_num_threads() == 1
    assert engine.runtime.lr_schedule == "constant"
    cosine, _ = build_run(cfg.apply_overrides(["model.lr_schedule=cosine"]), listeners=[])
    assert cosine.runtime.lr_schedule == "cosine"
    from lightning_fedprune.config import build_parts

    assert build_parts(cfg.apply_overrides(["model.lr_schedule=cosine"]), role="client").runtime.lr_schedule == "cosine"


def test_build_run_same_seed_same_initial_model(tmp_path):
    cfg = RecipeConfig().apply_overrides([f"run_dir={tmp_path}", "data.num_clients=2"])
    a, _ = build_run(cfg, listeners=[])
    b, _ = build_run(cfg, listeners=[])
    for k, v in a.strategy.global_state.items():
        assert torch.equal(v, b.strategy.global_state[k])


def test_build_run_bad_strategy_value_names_strategy(tmp_path):
    cfg = RecipeConfig().apply_overrides([f"run_dir={tmp_path}", "strategy.name=fedprox", "strategy.options.mu=-1"])
    with pytest.raises(ConfigError, match=r"invalid `strategy` settings for 'fedprox'.*`mu`"):
        build_run(cfg, listeners=[])


def test_language_model_flops_are_analytic():
    # 1-layer LSTM(4 -> 3) + Linear(3 -> 5) on sequences of 7 tokens:
    # per token 2*4*3*(4+3) = 168 (LSTM) + 2*3*5 = 30 (Linear) -> 198 * 7 = 1386 per sequence,
    # plus torch-pruning's count for the embedding table (5 rows: 2 * 5)
    from lightning_fedprune.models import create_model
    from lightning_fedprune.runtime import count_flops_per_example

    net = create_model("lstm_lm", vocab_size=5, embed_dim=4, hidden_size=3, num_layers=1, dropout=0.0)
    module = FederatedLanguageModel(net)
    assert count_flops_per_example(module, torch.zeros((1, 7), dtype=torch.long)) == 1386.0 + 10.0


def test_fedmp_eucb_options_are_recipe_keys():
    from lightning_fedprune.config import build_strategy

    assert {"theta", "discount", "exploration", "reward", "gap_floor", "late_reward"} <= set(strategy_options("fedmp"))
    shipped = RecipeConfig.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "fedmp" / "cnn_mnist.yaml")
    assert shipped.engine.mode == "deadline" and shipped.model.name == "cnn_mnist"
    cfg = RecipeConfig().apply_overrides([
        "strategy.name=fedmp", "strategy.options.theta=0.01", "strategy.options.discount=0.99", "strategy.options.exploration=0.5",
        "strategy.options.reward=printed", "strategy.options.gap_floor=0.1", "strategy.options.late_reward=-1",
    ])
    strategy = build_strategy(cfg)
    b = strategy.bandit
    assert (b.theta, b.discount, b.exploration, b.reward, b.gap_floor, strategy.late_reward) == (0.01, 0.99, 0.5, "printed", 0.1, -1.0)
    with pytest.raises(ConfigError, match=r"unknown key `strategy\.options\.lambda` for strategy 'fedmp'"):
        RecipeConfig().apply_overrides(["strategy.name=fedmp", "strategy.options.lambda=0.9"])
    with pytest.raises(ConfigError, match=r"invalid `strategy` settings for 'fedmp'.*`reward` can be bounded, printed"):
        build_strategy(RecipeConfig().apply_overrides(["strategy.name=fedmp", "strategy.options.reward=eq8"]))
    with pytest.raises(ConfigError, match=r"invalid `strategy` settings for 'fedmp'.*`discount`"):
        build_strategy(RecipeConfig().apply_overrides(["strategy.name=fedmp", "strategy.options.discount=1.5"]))
