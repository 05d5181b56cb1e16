"""A dataset split across clients: what the client runtime and the engine read data from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_fedprune.core.seeding import derive_seed
from lightning_fedprune.data.loaders import StepsLoader, client_batches
from lightning_fedprune.errors import DataError

__all__ = ["FederatedDataset"]


class FederatedDataset:
    """Client views over one dataset.

    Args:
        train: the training dataset all clients' indices refer to.
        client_train: per-client training indices.
        client_test: optional per-client local test indices (into ``train``).
        test: the global test set (server-side evaluation), optional.
        batch_size: local training batch size.
        eval_batch_size: batch size for evaluation.
        drop_last: drop the last incomplete training batch of each pass.

    Data order: a client's pass ``e`` of round ``r`` is shuffled with the seed
    ``derive_seed(seed, "data", r, client, e)``, so it does not depend on what ran before.
    """

    def __init__(
        self,
        train: Dataset,
        client_train: Sequence[np.ndarray | Sequence[int]],
        *,
        client_test: Sequence[np.ndarray | Sequence[int]] | None = None,
        test: Dataset | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if not client_train:
            raise DataError("a federated dataset needs at least one client")
        self.train = train
        self.test = test
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.drop_last = bool(drop_last)
        self._train_idx = [np.asarray(ix, dtype=np.int64) for ix in client_train]
        empty = [c for c, ix in enumerate(self._train_idx) if len(ix) == 0]
        if empty:
            raise DataError(f"clients {empty[:10]} have no training samples")
        if client_test is not None and len(client_test) != len(self._train_idx):
            raise DataError(f"client_test has {len(client_test)} entries for {len(self._train_idx)} clients")
        self._test_idx = [np.asarray(ix, dtype=np.int64) for ix in client_test] if client_test is not None else None

    @classmethod
    def from_partition(cls, splits: Any, partition: Any, **kwargs: Any) -> FederatedDataset:
        """Build from a :class:`~lightning_fedprune.data.DatasetSplits` and a ``Partition``."""
        has_local_test = any(len(c.test) for c in partition.clients)
        return cls(
            splits.train,
            [c.train for c in partition.clients],
            client_test=[c.test for c in partition.clients] if has_local_test else None,
            test=splits.test,
            **kwargs,
        )

    @property
    def num_clients(self) -> int:
        return len(self._train_idx)

    def num_train_samples(self, client_id: int) -> int:
        return len(self._train_idx[client_id])

    def train_pass(self, client_id: int, *, seed: int) -> DataLoader:
        """One shuffled pass over the client's training data (a plain DataLoader)."""
        gen = torch.Generator()
        gen.manual_seed(seed)
        return client_batches(
            self.train, self._train_idx[client_id], batch_size=self.batch_size, shuffle=True, generator=gen,
            drop_last=self.drop_last,
        )

    def train_batches(self, client_id: int, *, run_seed: int, rnd: int, epoch: int) -> DataLoader:
        """Local epoch ``epoch`` of round ``rnd``."""
        return self.train_pass(client_id, seed=derive_seed(run_seed, "data", rnd, client_id, epoch))

    def train_steps(self, client_id: int, num_steps: int, *, run_seed: int, rnd: int) -> StepsLoader:
        """Exactly ``num_steps`` batches, cycling over passes reshuffled by one seeded generator."""
        return StepsLoader(self.train_pass(client_id, seed=derive_seed(run_seed, "data", rnd, client_id, 0)), num_steps)

    def local_test_loader(self, client_id: int) -> DataLoader | None:
        if self._test_idx is None or len(self._test_idx[client_id]) == 0:
            return None
        return DataLoader(Subset(self.train, self._test_idx[client_id].tolist()), batch_size=self.eval_batch_size)

    def test_loader(self) -> DataLoader | None:
        if self.test is None:
            return None
        return DataLoader(self.test, batch_size=self.eval_batch_size)
