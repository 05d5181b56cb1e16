"""Federate an existing Lightning project without touching its training_step.

Part 1 is an ordinary Lightning project: a LightningModule and a Trainer, trained centrally.
Part 2 federates the very same module class over 10 simulated clients with FedProx, adding only a
mixin line. Run: ``python examples/existing_lightning_project.py``
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_fedprune import FederatedModuleMixin
from lightning_fedprune.data import load_dataset, make_partition
from lightning_fedprune.data.federated import FederatedDataset
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import FedProx


# ---------------------------------------------------------------- 1. an ordinary Lightning project
class DigitsNet(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def centralized(splits) -> None:
    model = DigitsNet()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, DataLoader(splits.train, batch_size=32, shuffle=True))
    print("centralized training done")


# ---------------------------------------------------------------- 2. the same module, federated
class FederatedDigitsNet(FederatedModuleMixin, DigitsNet):
    """One line added: the mixin. `classifier` is unprunable by default; nothing stays local."""

    federated_example_input_shape = (64,)


def federated(splits) -> None:
    torch.manual_seed(0)
    partition = make_partition("dirichlet", splits.train_targets, 10, beta=0.5, seed=0, local_test_fraction=0.1)
    data = FederatedDataset.from_partition(splits, partition, batch_size=20)
    strategy = FedProx(mu=0.01, fraction_fit=0.5, seed=0)
    runtime = ClientRuntime(FederatedDigitsNet(), data=data, seed=0, client_callbacks=strategy.client_callbacks)
    engine = SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(10, seed=0), seed=0)
    summary = engine.run(10)
    final = summary["final"]
    print(
        f"federated: {summary['rounds_run']} rounds, test accuracy {final['test_accuracy']:.3f}, "
        f"simulated time {final['sim_time']:.1f} s, {final['cum_bytes'] / 1e6:.1f} MB moved"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    centralized(digits)
    federated(digits)
