"""Tests of lightning_fedprune.data.loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_fedprune.data import StepsLoader, client_batches, steps_loader
from lightning_fedprune.errors import DataError

torch.set_num_threads(1)


@pytest.fixture()
def dataset() -> TensorDataset:
    """Sample i has input [i, i] and label i % 3, so batches reveal which indices they hold."""
    idx = torch.arange(50)
    return TensorDataset(torch.stack([idx, idx], dim=1).float(), idx % 3)


def ids(batch: list[torch.Tensor]) -> list[int]:
    return batch[0][:, 0].long().tolist()


def test_client_batches_is_a_plain_dataloader(dataset: TensorDataset) -> None:
    indices = np.array([3, 7, 11, 20, 21, 40, 49])
    loader = client_batches(dataset, indices, batch_size=3, shuffle=False, generator=None)
    assert type(loader) is DataLoader
    assert isinstance(loader.dataset, Subset) and loader.dataset.dataset is dataset
    assert loader.num_workers == 0 and loader.batch_size == 3
    batches = list(loader)
    assert [len(ids(b)) for b in batches] == [3, 3, 1]
    assert sum((ids(b) for b in batches), []) == indices.tolist()
    x, y = batches[0]
    assert x.shape == (3, 2) and y.tolist() == [0, 1, 2]


def test_client_batches_shuffle_and_drop_last(dataset: TensorDataset) -> None:
    indices = np.arange(0, 50, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = (
        [ids(batch) for batch in client_batches(
            dataset, indices, batch_size=4, shuffle=True, generator=g, drop_last=True
        )]
        for g in (g1, g2)
    )  # fmt: skip
    assert a == b  # same generator seed -> same order
    assert len(a) == 25 // 4 and all(len(batch) == 4 for batch in a)
    flat = sum(a, [])
    assert len(set(flat)) == len(flat) and set(flat) <= set(indices.tolist())
    assert flat != sorted(flat)


def test_steps_loader_cycles_and_reshuffles(dataset: TensorDataset) -> None:
    indices = np.arange(10, 30)  # 20 samples, batch 5 -> 4 batches per pass
    loader = steps_loader(
        dataset, indices, batch_size=5, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(loader, StepsLoader) and len(loader) == 10
    batches = [ids(b) for b in loader]
    assert len(batches) == 10
    first_pass, second_pass = sum(batches[:4], []), sum(batches[4:8], [])
    assert sorted(first_pass) == sorted(second_pass) == indices.tolist()
    assert first_pass != second_pass  # reshuffled each pass
    assert set(sum(batches[8:], [])) <= set(indices.tolist())
    # iterating again yields num_steps more batches; same seed reproduces the sequence
    assert len(list(loader)) == 10
    again = steps_loader(
        dataset, indices, batch_size=5, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert [ids(b) for b in again] == batches


def test_steps_loader_partial_last_batch(dataset: TensorDataset) -> None:
    loader = steps_loader(dataset, np.arange(7), batch_size=4, num_steps=5, shuffle=False)
    assert [len(ids(b)) for b in loader] == [4, 3, 4, 3, 4]
    assert list(steps_loader(dataset, np.arange(7), batch_size=4, num_steps=0)) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indices": np.array([], dtype=np.int64)}, "indices is empty"),
        ({"indices": np.array([1, 50])}, r"indices must lie in \[0, 50\) .* got values in \[1, 50\]"),
        ({"indices": np.array([-1, 2])}, r"indices must lie in \[0, 50\)"),
        ({"indices": np.array([0.5, 1.0])}, "1-D array of integers"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_steps": -1}, "num_steps must be an integer >= 0, got -1"),
        ({"drop_last": True, "batch_size": 8}, "no batch per pass"),
        ({"generator": 3}, "generator must be a torch.Generator or None"),
    ],
)
def test_bad_arguments(dataset: TensorDataset, kwargs: dict, match: str) -> None:
    args = {"indices": np.arange(5), "batch_size": 2, "num_steps": 3, **kwargs}
    with pytest.raises(DataError, match=match):
        steps_loader(dataset, **args)
