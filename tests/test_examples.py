"""The examples run as a user would run them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_existing_lightning_project_federates_unchanged_training_step(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load("existing_lightning_project")
    # the federated class only adds the mixin: training_step is the original one
    assert example.FederatedDigitsNet.training_step is example.DigitsNet.training_step
    from lightning_fedprune.data import load_dataset

    torch.manual_seed(0)
    example.federated(load_dataset("digits"))
    out = capsys.readouterr().out
    assert "federated: 10 rounds" in out
    accuracy = float(out.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.3  # 10 classes: clearly better than chance after 10 rounds
