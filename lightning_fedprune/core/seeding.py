"""Deterministic seeds derived from (run seed, round, client, purpose).

Every random choice of a run (client sampling, device availability, dropout draws, data order,
dropout masks, ratio draws) takes its seed from :func:`derive_seed`, so a run resumed at round
``k`` or replayed on another transport makes exactly the same choices.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "rng_for"]


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (stable across processes)."""
    text = ":".join([str(int(seed)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def rng_for(seed: int, *parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(seed, *parts))
