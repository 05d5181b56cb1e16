"""Shared fixtures: single-threaded torch (the CI machine is shared), a tiny federatable module
and a tiny federated dataset of random vectors labelled by a fixed linear teacher."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fedprune.callbacks import ClientContext, FederatedCallback
from lightning_fedprune.data.federated import FederatedDataset
from lightning_fedprune.module import FederatedModuleMixin

torch.set_num_threads(1)

IN_DIM, HIDDEN, NUM_CLASSES = 8, 16, 4


class TinyNet(FederatedModuleMixin, pl.LightningModule):
    """Linear 8 -> 16 -> 4 with an int64 step-counter buffer (optional dropout and SGD momentum).

    ``fail_clients``: ids of clients whose ``training_step`` raises. The client being trained is
    written into ``current_client`` by :class:`tests.conftest.ClientIdProbe` (a FederatedCallback),
    so the module never needs to know about the runtime.
    """

    federated_example_input_shape = (IN_DIM,)

    def __init__(self, *, lr: float = 0.1, momentum: float = 0.0, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(IN_DIM, HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(HIDDEN, NUM_CLASSES)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))
        self.lr = lr
        self.momentum = momentum
        self.fail_clients: frozenset[int] = frozenset()
        self.current_client: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(torch.relu(self.body(x))))

    def training_step(self, batch, batch_idx):
        if self.current_client in self.fail_clients:
            raise RuntimeError(f"injected failure for client {self.current_client}")
        x, y = batch
        self.steps_seen += 1
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ClientIdProbe(FederatedCallback):
    """Tells the module which client it trains (``pl_module.current_client``) and records the order."""

    def __init__(self) -> None:
        self.started: list[int] = []

    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        pl_module.current_client = ctx.task.client_id
        self.started.append(ctx.task.client_id)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        pl_module.current_client = None


def make_tiny_data(
    *, sizes: tuple[int, ...] = (20, 30, 40), num_test: int = 64, batch_size: int = 10, seed: int = 0, local_test: bool = True
) -> FederatedDataset:
    """Clients with ``sizes`` training samples each (plus 6 local test samples) and a global test set."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_DIM, NUM_CLASSES, generator=gen)
    local = 6 if local_test else 0
    n_train = sum(sizes) + local * len(sizes)
    x = torch.randn(n_train + num_test, IN_DIM, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:], y[n_train:])
    client_train, client_test, start = [], [], 0
    for n in sizes:
        client_train.append(list(range(start, start + n)))
        client_test.append(list(range(start + n, start + n + local)))
        start += n + local
    return FederatedDataset(
        train, client_train, client_test=client_test if local_test else None, test=test, batch_size=batch_size
    )


@pytest.fixture
def tiny_module() -> Callable[..., TinyNet]:
    """Factory of fresh :class:`TinyNet` s (same ``seed`` -> same initial weights)."""
    return TinyNet


@pytest.fixture
def client_probe() -> ClientIdProbe:
    """A fresh :class:`ClientIdProbe` (pass it in ``ClientRuntime(callbacks=[...])``)."""
    return ClientIdProbe()


@pytest.fixture
def tiny_data_factory() -> Callable[..., FederatedDataset]:
    """:func:`make_tiny_data` (for tests needing other client sizes)."""
    return make_tiny_data


@pytest.fixture
def tiny_data() -> FederatedDataset:
    """3 clients with 20 / 30 / 40 training samples, 6 local test samples each, 64 test samples."""
    return make_tiny_data()
