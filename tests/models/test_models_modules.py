"""Tests of the plain LightningModules in lightning_fedprune.models.modules."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedprune.errors import ModelError
from lightning_fedprune.models import ClassifierModule, LanguageModelModule, create_model


class LossRecorder(L.Callback):
    """Collects the training loss returned by every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def make_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        yield


def classification_loader(n: int = 24, in_features: int = 8, num_classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def lm_loader(n: int = 12, seq_len: int = 6, vocab: int = 50) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_classifier_module_trains_and_evaluates():
    torch.manual_seed(0)
    module = ClassifierModule("mlp", lr=0.5, in_features=8, hidden=(16,), num_classes=3)
    assert isinstance(module.model, nn.Module) and module.num_classes == 3
    assert module.hparams["model"] == "mlp" and module.hparams["lr"] == 0.5
    loader = classification_loader()
    recorder = LossRecorder()
    trainer = make_trainer(max_steps=3, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=loader)
    assert len(recorder.losses) == 3
    assert recorder.losses[0] != recorder.losses[-1]
    assert "train_loss" in trainer.callback_metrics  # one epoch-level log
    (metrics,) = make_trainer().validate(module, dataloaders=loader, verbose=False)
    assert set(metrics) == {"val_loss", "val_acc"} and 0.0 <= metrics["val_acc"] <= 1.0
    (metrics,) = make_trainer().test(module, dataloaders=loader, verbose=False)
    assert set(metrics) == {"test_loss", "test_acc"}


def test_classifier_module_accepts_a_module_and_adam():
    model = create_model("mlp", in_features=8, hidden=(), num_classes=3)
    module = ClassifierModule(model, optimizer="ADAM", lr=1e-2, weight_decay=1e-4)
    assert module.model is model and "model" not in module.hparams
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)
    sgd = ClassifierModule(model, momentum=0.9).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    x = torch.randn(2, 8)
    assert module(x).shape == (2, 3)


def test_classifier_module_with_timm_model():
    module = ClassifierModule("timm:resnet18", num_classes=4)
    assert module.num_classes == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": -1.0}, "momentum"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_classifier_module_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ModelError, match=match):
        ClassifierModule("mlp", **kwargs)


def test_classifier_module_rejects_bad_model_arguments():
    with pytest.raises(ModelError, match="Registered models"):
        ClassifierModule("not_a_model")
    with pytest.raises(ModelError, match="only used when the model is given by name"):
        ClassifierModule(nn.Linear(2, 2), num_classes=2)
    with pytest.raises(ModelError, match="nn.Module or a registered model name"):
        ClassifierModule(42)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="classifier"):
        ClassifierModule(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_language_model_module_trains_and_reports_perplexity():
    torch.manual_seed(0)
    module = LanguageModelModule(
        "lstm_lm", lr=1.0, vocab_size=50, embed_dim=16, hidden_size=16, num_layers=1
    )
    loader = lm_loader()
    recorder = LossRecorder()
    trainer = make_trainer(max_steps=3, gradient_clip_val=0.25, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=loader)
    assert len(recorder.losses) == 3
    assert recorder.losses[0] != recorder.losses[-1]
    assert abs(recorder.losses[0] - math.log(50)) < 0.5  # starts near uniform
    (metrics,) = make_trainer().validate(module, dataloaders=loader, verbose=False)
    assert set(metrics) == {"val_loss", "val_ppl"}
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    (metrics,) = make_trainer().test(module, dataloaders=loader, verbose=False)
    assert set(metrics) == {"test_loss", "test_ppl"}
