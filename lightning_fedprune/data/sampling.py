"""Choosing a server-side sample: a small share of every client's data, or a biased subset.

PruneFL's sample-based initial pruning trains at the server on such a sample
(:func:`lightning_fedprune.callbacks.server_pruning.run_server_pruning`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lightning_fedprune.errors import DataError

__all__ = ["shared_sample_indices", "biased_sample_indices", "sample_loader"]


def _index_lists(clients: Any) -> list[np.ndarray]:
    if hasattr(clients, "clients"):  # a Partition
        return [np.asarray(c.train, dtype=np.int64) for c in clients.clients]
    return [np.asarray(ix, dtype=np.int64) for ix in clients]


def shared_sample_indices(clients: Any, *, size: int, seed: int) -> np.ndarray:
    """The server's sample made of a small share of every client's training data.

    Each client contributes in proportion to its number of samples (largest remainder), chosen
    at random; clients keep their data (they share a copy).

    Args:
        clients: a :class:`~lightning_fedprune.data.Partition` or one index array per client.
        size: total sample size.
        seed: the draws depend only on it.

    Returns:
        Sorted dataset indices, ``size`` of them.

    Raises:
        DataError: ``size`` < 1 or larger than all clients' data together.
    """
    lists = _index_lists(clients)
    total = sum(len(ix) for ix in lists)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= total:
        raise DataError(f"`size` must be an int in [1, {total}] (all clients' samples), got {size!r}")
    exact = np.array([size * len(ix) / total for ix in lists])
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: size - int(counts.sum())]] += 1
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(7,)))
    picked = [rng.choice(ix, size=int(n), replace=False) for ix, n in zip(lists, counts) if n > 0]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def biased_sample_indices(groups: Any, *, keep: Iterable[int], size: int | None = None, seed: int = 0) -> np.ndarray:
    """A biased server sample: only samples whose group is in ``keep``.

    Args:
        groups: one group id per sample: the labels (a few classes), writer ids (a few writers,
            as PruneFL's FEMNIST sample of 2 writers) or client ids (a few clients' data).
        keep: the groups allowed.
        size: how many to draw at random among them (``None``: all of them).
        seed: the draw depends only on it.

    Returns:
        Sorted dataset indices.

    Raises:
        DataError: no sample in ``keep``, or ``size`` larger than what is there.
    """
    g = torch.as_tensor(groups).cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    wanted = sorted({int(k) for k in keep})
    pool = np.flatnonzero(np.isin(g, wanted))
    if pool.size == 0:
        raise DataError(f"no sample belongs to the groups {wanted}")
    if size is None:
        return pool.astype(np.int64)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= pool.size:
        raise DataError(f"`size` must be an int in [1, {pool.size}] (samples in groups {wanted}), got {size!r}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(8,)))
    return np.sort(rng.choice(pool, size=size, replace=False)).astype(np.int64)


def sample_loader(dataset: Any, indices: Any, *, batch_size: int = 20, seed: int = 0) -> torch.utils.data.DataLoader:
    """A shuffled DataLoader over ``dataset[indices]`` (seeded), for :func:`~lightning_fedprune.callbacks.server_pruning.sample_based_pruning`."""
    from lightning_fedprune.data.loaders import client_batches

    gen = torch.Generator().manual_seed(int(seed))
    return client_batches(dataset, np.asarray(indices, dtype=np.int64), batch_size=batch_size, shuffle=True, generator=gen)
