"""Tests of the command line (python -m lightning_fedprune ...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fedprune.cli import main
from lightning_fedprune.reporting import PLOT_FILES, read_metrics

torch.set_num_threads(1)

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "digits_fedavg.yaml")


def test_show_prints_resolved_yaml(capsys):
    assert main(["show", RECIPE, "--set", "strategy.name=fedprox", "--set", "strategy.options.mu=0.1"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "digits_fedavg"
    assert shown["run_dir"] == str(Path("runs") / "digits_fedavg")
    assert shown["strategy"]["name"] == "fedprox" and shown["strategy"]["options"] == {"mu": 0.1}
    assert shown["data"]["name"] == "digits"


def test_bad_key_exits_2_with_the_key(capsys):
    assert main(["show", RECIPE, "--set", "strategy.nme=fedprox"]) == 2
    err = capsys.readouterr().err
    assert "strategy.nme" in err and "valid keys in `strategy`" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_recipe_and_usage_errors(capsys):
    assert main(["run", "no/such/recipe.yaml"]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main([]) == 2  # argparse: a command is required
    assert main(["run"]) == 2  # argparse: the recipe is required


def test_run_writes_metrics_plots_and_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", RECIPE, "--set", "rounds=2", "--set", f"run_dir={run_dir}", "--quiet"])
    assert code == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    for name in PLOT_FILES:
        assert (run_dir / name).stat().st_size > 1000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and summary["final"]["round"] == 1
    assert (run_dir / "metrics.csv").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rounds"] == 2
    assert capsys.readouterr().out == ""  # --quiet: no progress, no table

    # resume to 3 rounds: one more line, no duplicated round
    assert main(["run", RECIPE, "--set", "rounds=3", "--set", f"run_dir={run_dir}", "--quiet", "--resume"]) == 0
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["rounds_run"] == 3


def test_run_prints_summary_table(tmp_path, capsys):
    code = main(["run", RECIPE, "--set", "rounds=1", "--set", "data.num_clients=2", "--set", f"run_dir={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Run summary" in out and "Final accuracy" in out
    acc = read_metrics(tmp_path)[-1]["test_accuracy"]
    assert f"{100 * acc:.2f}%" in out


def test_all_clients_failed_exits_1(tmp_path, capsys, monkeypatch):
    from lightning_fedprune.errors import AllClientsFailedError
    from lightning_fedprune.simulation import SimulationEngine

    def fail(self, num_rounds, *, resume=False):
        raise AllClientsFailedError("round 0: all 10 selected clients failed")

    monkeypatch.setattr(SimulationEngine, "run", fail)
    assert main(["run", RECIPE, "--set", f"run_dir={tmp_path}", "--quiet"]) == 1
    assert "all 10 selected clients failed" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert "usage" in capsys.readouterr().out


def test_list_names_strategies_with_options_wrappers_models_datasets_partitions_callbacks_and_loggers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for title in ("Strategies", "Strategy wrappers", "Models", "Datasets", "Partitions", "Client callbacks", "Loggers"):
        assert title in out
    for name in ("fedavg", "fedmp", "prunefl", "fedadam", "fedyogi", "vgg11_bn", "cifar10_subset", "dirichlet", "scaffold", "tensorboard"):
        assert name in out
    assert "beta (required)" in out  # the dirichlet partition's options
    assert main(["list", "wrappers"]) == 0
    wrappers = capsys.readouterr().out
    assert "fedavgm" in wrappers and "server_lr: float = 1.0, momentum: float = 0.9" in wrappers
    assert "Models" not in wrappers
    assert main(["list", "nothing"]) == 2


def test_list_sections_follow_the_registries():
    from lightning_fedprune.cli import list_sections
    from lightning_fedprune.strategies import STRATEGIES

    (title, rows), = list_sections("strategies")
    assert [r[0] for r in rows] == sorted(STRATEGIES)
    fedmp = dict((r[0], r[2]) for r in rows)["fedmp"]
    assert "theta: float = 0.05" in fedmp and "seed" not in fedmp  # the recipe's top-level seed seeds strategies


def test_a_model_swap_resets_the_recipes_model_arguments(capsys):
    assert main(["show", RECIPE, "--set", "model.name=lenet300_100"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["kwargs"] == {}  # the digits recipe's `hidden` is dropped
    assert main(["show", RECIPE, "--set", "model.name=lenet300_100", "--set", "model.kwargs={num_classes: 10}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["kwargs"] == {"num_classes": 10}


def test_an_accelerator_this_machine_lacks_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", RECIPE, "--set", "trainer.accelerator=gpu", "--set", f"run_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "trainer.accelerator='gpu'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_data_folder_hint_names_the_recipe_key(tmp_path, capsys):
    code = main(["run", RECIPE, "--set", "data.name=mnist", "--set", "model.name=lenet300_100", "--set", f"data.root={tmp_path}", "--quiet"])
    assert code == 2
    assert "--set data.root=<folder>" in capsys.readouterr().err
