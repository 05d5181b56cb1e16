"""StructuredPruning: a real Trainer prunes mid-training, rebuilds the optimizer, keeps training,
checkpoints and resumes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedprune.callbacks.structured import StructuredPruning
from lightning_fedprune.config import FederatedClassifier
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.models.modules import ClassifierModule

MODEL = dict(in_features=8, hidden=(16, 8), num_classes=3)


def _data(seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(max_epochs: int, callbacks: list, tmp_path=None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


class _AfterPruning(pl.Callback):
    """Snapshots the weights right after the pruning callback ran (listed after it)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.optimizer_params: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self.snapshot = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("module_cls", [ClassifierModule, FederatedClassifier])
def test_prunes_at_epoch_and_keeps_training(module_cls):
    torch.manual_seed(0)
    module = module_cls("mlp", lr=0.2, **MODEL)
    dense = _n_params(module)
    pruning = StructuredPruning(0.5, epoch=1)
    probe = _AfterPruning(epoch=1)
    trainer = _trainer(3, [pruning, probe])
    trainer.fit(module, _data())

    m = module.model
    assert (m.features[0].out_features, m.features[2].in_features, m.features[2].out_features) == (8, 8, 4)
    assert (m.classifier.in_features, m.classifier.out_features) == (4, 3)
    expected = {k: v for k, v in pruning.plan.sub_shapes().items()}
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    assert _n_params(module) == 8 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3 < dense
    assert pruning.done == [1]
    # the optimizer holds the NEW parameters, and they were trained after pruning
    assert probe.optimizer_params == {id(p) for p in module.parameters()}
    assert probe.snapshot is not None
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, probe.snapshot[k])]
    assert "model.features.0.weight" in changed and "model.classifier.weight" in changed
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert pruning.plan.ratio == 0.5


def test_schedule_nests_and_is_relative_to_the_original_model():
    torch.manual_seed(0)
    module = ClassifierModule("mlp", lr=0.1, **MODEL)
    pruning = StructuredPruning({1: 0.25, 2: 0.5})
    trainer = _trainer(3, [pruning])
    trainer.fit(module, _data())
    assert pruning.done == [1, 2]
    assert pruning.plan.kept_counts == (4, 8)  # groups: features.2 (8 -> 4), features.0 (16 -> 8)
    assert module.model.features[0].out_features == 8 and module.model.features[2].out_features == 4
    assert pruning.plan.sub_shapes()["model.features.0.weight"] == (8, 8)


def test_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule("mlp", lr=0.1, **MODEL)
    pruning = StructuredPruning(0.5, epoch=1)
    trainer = _trainer(2, [pruning], tmp_path)
    trainer.fit(module, _data())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    saved = {k: v.clone() for k, v in module.state_dict().items()}

    torch.manual_seed(1)
    fresh = ClassifierModule("mlp", lr=0.1, **MODEL)  # full size
    resumed = StructuredPruning(0.5, epoch=1)
    probe = _AfterPruning(epoch=2)
    trainer = _trainer(3, [resumed, probe], tmp_path)
    trainer.fit(fresh, _data(), ckpt_path=path)
    assert resumed.done == [1] and resumed.plan == pruning.plan
    assert probe.snapshot is not None
    assert all(torch.equal(probe.snapshot[k], saved[k]) for k in saved)  # restored, not re-pruned
    assert fresh.model.features[0].out_features == 8
    assert not torch.equal(fresh.model.features[0].weight, saved["model.features.0.weight"])


def test_invalid_arguments():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="ratio"):
            StructuredPruning(bad)
    with pytest.raises(ConfigError, match="must not decrease"):
        StructuredPruning({1: 0.5, 2: 0.25})
    with pytest.raises(ConfigError, match="epochs must be integers"):
        StructuredPruning({-1: 0.5})
    with pytest.raises(ConfigError, match="not both"):
        StructuredPruning({1: 0.5}, epoch=2)
    assert StructuredPruning(0.5).state_key != StructuredPruning(0.25).state_key
