"""Batches of one client's data.

:func:`client_batches` is deliberately a plain :class:`torch.utils.data.DataLoader` over a
:class:`torch.utils.data.Subset`: exactly what a hand-written PyTorch training loop would use, so
that benchmarks comparing the library's engine with such a loop feed both the same pipeline.
:func:`steps_loader` wraps it to yield a fixed number of batches (local *steps* rather than
epochs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_fedprune.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["StepsLoader", "client_batches", "steps_loader"]


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_indices(dataset: Dataset, indices: Any) -> list[int]:
    arr = np.asarray(indices)
    if arr.size == 0:
        raise DataError("indices is empty: the client has no samples to load")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"indices must be a 1-D array of integers, got {arr.dtype} {arr.shape}")
    n = len(dataset)  # type: ignore[arg-type]
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        raise DataError(
            f"indices must lie in [0, {n}) for a dataset of {n} samples, got values in [{lo}, {hi}]"
        )
    return arr.tolist()


def client_batches(
    dataset: Dataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> DataLoader:
    """A plain DataLoader over ``Subset(dataset, indices)``.

    Args:
        dataset: The full dataset (usually a :class:`~torch.utils.data.TensorDataset`).
        indices: The client's indices into ``dataset`` (1-D integers, non-empty).
        batch_size: Samples per batch (>= 1).
        shuffle: Reshuffle the client's samples at every pass.
        generator: Generator driving the shuffle (``None``: torch's global RNG).
        drop_last: Drop the last incomplete batch.

    Returns:
        ``DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=shuffle,
        generator=generator, num_workers=0, drop_last=drop_last)``.

    Raises:
        DataError: If ``indices`` is empty, not integral or out of range, or ``batch_size`` < 1.
    """
    batch_size = _check_batch_size(batch_size)
    index_list = _check_indices(dataset, indices)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DataError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return DataLoader(
        Subset(dataset, index_list),
        batch_size=batch_size,
        shuffle=bool(shuffle),
        generator=generator,
        num_workers=0,
        drop_last=bool(drop_last),
    )


class StepsLoader:
    """Yields exactly ``num_steps`` batches by cycling over a client's data.

    Each pass over the data is one iteration of the wrapped :func:`client_batches` loader, so with
    ``shuffle=True`` every pass is reshuffled by the same ``generator``. Iterating the object
    again starts a fresh sequence of ``num_steps`` batches (continuing the generator's state).

    Attributes:
        loader: The wrapped DataLoader.
        num_steps: Batches per iteration.
    """

    def __init__(self, loader: DataLoader, num_steps: int) -> None:
        """Wrap ``loader``.

        Args:
            loader: A DataLoader yielding at least one batch per pass.
            num_steps: Batches to yield per iteration (>= 0).

        Raises:
            DataError: If ``num_steps`` is invalid or the loader yields no batch per pass.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
            raise DataError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        if len(loader) == 0:
            raise DataError(
                "the client's data yields no batch per pass (fewer samples than batch_size with "
                "drop_last=True); use drop_last=False or a smaller batch_size"
            )
        self.loader = loader
        self.num_steps = int(num_steps)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[Any]:
        produced = 0
        while produced < self.num_steps:
            for batch in self.loader:
                yield batch
                produced += 1
                if produced >= self.num_steps:
                    return


def steps_loader(
    dataset: Dataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    num_steps: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> StepsLoader:
    """Exactly ``num_steps`` batches of a client's data, cycling passes as needed.

    Args:
        dataset: The full dataset.
        indices: The client's indices into ``dataset`` (non-empty).
        batch_size: Samples per batch (>= 1).
        num_steps: Batches to yield per iteration (>= 0).
        shuffle: Reshuffle at every pass.
        generator: Generator driving the shuffles (``None``: torch's global RNG).
        drop_last: Drop each pass's last incomplete batch.

    Returns:
        An iterable with ``len() == num_steps``.

    Raises:
        DataError: On invalid arguments, or if a pass yields no batch.
    """
    loader = client_batches(
        dataset,
        indices,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
    )
    return StepsLoader(loader, num_steps)
