"""Framework-agnostic math and data structures: messages, aggregation, seeding, serialization."""

from lightning_fedprune.core.messages import (
    ClientFailure,
    ClientMetrics,
    ClientResult,
    ClientTask,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from lightning_fedprune.core.seeding import derive_seed, rng_for

__all__ = [
    "ClientTask",
    "ClientResult",
    "ClientMetrics",
    "ClientFailure",
    "encode_task",
    "decode_task",
    "encode_result",
    "decode_result",
    "derive_seed",
    "rng_for",
]
