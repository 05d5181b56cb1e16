"""Framework-agnostic math and data structures: messages, aggregation, seeding, serialization,
pruning plans, the E-UCB bandit, upload compression."""

from lightning_fedprune.core.bandit import EUCB, EUCBAgent, LeafStats, eucb_reward
from lightning_fedprune.core.compression import (
    TOPK_PREFIX,
    compress_upload,
    decode_topk_result,
    index_dtype,
    keep_ratio_for_bandwidth,
    topk_compress,
    topk_count,
    topk_decompress,
)
from lightning_fedprune.core.flops import forward_flops
from lightning_fedprune.core.masks import (
    MaskSet,
    init_prune,
    layer_rates,
    magnitude_prune,
    masked_weighted_average,
    random_prune,
)
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
from lightning_fedprune.core.pruning import Plan, resize_module
from lightning_fedprune.core.seeding import derive_seed, rng_for
from lightning_fedprune.core.sparse import pack_state, unpack_state

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
    "EUCB",
    "EUCBAgent",
    "LeafStats",
    "eucb_reward",
    "TOPK_PREFIX",
    "compress_upload",
    "decode_topk_result",
    "index_dtype",
    "keep_ratio_for_bandwidth",
    "topk_compress",
    "topk_count",
    "topk_decompress",
    "forward_flops",
    "Plan",
    "resize_module",
    "MaskSet",
    "layer_rates",
    "magnitude_prune",
    "init_prune",
    "random_prune",
    "masked_weighted_average",
    "pack_state",
    "unpack_state",
]
