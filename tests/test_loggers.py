"""Round metrics go to Lightning loggers (step = round), from a recipe's `loggers` or the Python API."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from lightning.pytorch.loggers import Logger

from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine, build_run, make_devices
from lightning_fedprune.strategies import FedAvg


def _recipe(tmp_path, **extra):
    return RecipeConfig.from_dict({
        "name": "logged", "rounds": 2, "run_dir": str(tmp_path / "run"),
        "data": {"name": "digits", "num_clients": 3, "batch_size": 50},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "strategy": {"name": "fedmp", "options": {"fixed_ratios": {0: 0.0, 1: 0.3, 2: 0.6}}},
        **extra,
    })


def test_a_recipes_csv_logger_gets_every_round_with_step_round_and_client_ids(tmp_path):
    cfg = _recipe(tmp_path, loggers=[{"name": "csv", "options": {"name": "lg"}}])
    engine, rounds = build_run(cfg, listeners=[])
    engine.run(rounds)
    path = tmp_path / "run" / "lg" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(path.open()))
    per_round = [r for r in rows if r["test_accuracy"]]
    assert [int(r["step"]) for r in per_round] == [0, 1]
    for r, rec in zip(per_round, engine.history):
        assert float(r["test_accuracy"]) == pytest.approx(rec["test_accuracy"])
        assert float(r["sim_time"]) == pytest.approx(rec["sim_time"])
        assert float(r["cum_bytes"]) == rec["cum_bytes"]
        assert float(r["agg/ratio_mean"]) == pytest.approx(rec["agg/ratio_mean"])  # a strategy's own metric
        for c in range(3):
            assert float(r[f"client_{c}/loss_after"]) == pytest.approx(rec["client_metrics"][str(c)]["loss_after"])
    assert any(r.get("summary/best_accuracy") for r in rows)
    hparams = (path.parent / "hparams.yaml").read_text()
    assert "fedmp" in hparams and "logged" in hparams  # the recipe


class Recording(Logger):
    def __init__(self):
        super().__init__()
        self.metrics, self.hparams, self.status = [], None, None

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams = params

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def finalize(self, status):
        self.status = status


def test_any_lightning_logger_among_the_listeners_gets_the_rounds(tiny_module, tiny_data):
    logger = Recording()
    strategy = FedAvg(seed=0)
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0)
    engine = SimulationEngine(strategy=strategy, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), listeners=[logger])
    engine.run(3)
    steps = [s for s, m in logger.metrics if "test_accuracy" in m]
    assert steps == [0, 1, 2]
    assert logger.hparams["strategy"] == "FedAvg" and logger.status == "success"
    assert "client_2/num_samples" in logger.metrics[0][1] and logger.metrics[0][1]["client_2/num_samples"] == 40.0


def test_logger_settings_are_checked_by_key(tmp_path):
    with pytest.raises(ConfigError, match=r"`loggers\[0\]\.name` can be csv, tensorboard, mlflow, wandb"):
        _recipe(tmp_path, loggers=[{"name": "tensorbord"}])
    with pytest.raises(ConfigError, match=r"unknown key `loggers\[0\]\.options\.sav_dir` for the csv logger.*save_dir"):
        _recipe(tmp_path, loggers=[{"name": "csv", "options": {"sav_dir": "x"}}])
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        cfg = _recipe(tmp_path, loggers=[{"name": "tensorboard"}])
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            build_run(cfg, listeners=[])


def test_a_trainer_logger_gets_each_local_epoch_tagged_with_its_client(tmp_path):
    cfg = _recipe(
        tmp_path, rounds=1, trainer={"logger": True, "default_root_dir": str(tmp_path / "tl")},
        strategy={"name": "fedavg", "local_epochs": 2},
    )
    engine, rounds = build_run(cfg, listeners=[])
    engine.run(rounds)
    (path,) = (tmp_path / "tl").rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    tagged = [(int(float(r["client_id"])), int(float(r["local_epoch"])), int(float(r["round"]))) for r in rows if r.get("train_loss")]
    assert tagged == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)]
