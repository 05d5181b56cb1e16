"""Top-k sparsification of model updates, as FlexCom uploads them (one keep ratio per worker).

FlexCom (the FedMP paper's baseline [13]) lets every worker compress its upload to its own level,
chosen from its bandwidth: a worker sends only the ``k`` largest-magnitude entries of its update
``trained - received`` per tensor, and the server adds them back onto what it sent that worker.

Payload format (``{name: tensor}``, encodable with safetensors; names are the model's keys plus a
suffix):

    * ``<key>/idx``: the kept flat positions, 1-D, in the smallest integer dtype that holds
      ``numel - 1`` among uint8, int16, int32, int64 (:func:`index_dtype`), increasing;
    * ``<key>/val``: the update's values at those positions, 1-D float32;
    * ``<key>/dense``: the whole update flattened, float32, used instead of ``idx`` + ``val``
      whenever it takes fewer bytes (``4 * numel < k * (index bytes + 4)``);
    * ``<key>/raw``: a tensor sent as it is (the trained value, not an update; its own dtype and
      shape): how :func:`compress_upload` sends non-float tensors such as BatchNorm's
      ``num_batches_tracked``.

Selection: ``k = max(1, ceil(keep_ratio * numel))`` (the product is rounded to 9 decimals first so
that e.g. ``0.1 * 30`` keeps 3, not 4) entries with the largest ``|update|``; among equal
magnitudes the lower flat index wins, so the choice is deterministic. Values travel as float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lightning_fedprune.errors import ConfigError, PayloadError

__all__ = [
    "TOPK_PREFIX",
    "index_dtype",
    "topk_count",
    "topk_compress",
    "topk_decompress",
    "compress_upload",
    "decode_topk_result",
    "keep_ratio_for_bandwidth",
]

#: prefix of the payload's names inside a result's ``extras``
TOPK_PREFIX = "topk/"

_INDEX_DTYPES: tuple[tuple[int, torch.dtype], ...] = (
    (2**8 - 1, torch.uint8),
    (2**15 - 1, torch.int16),
    (2**31 - 1, torch.int32),
    (2**63 - 1, torch.int64),
)
_KINDS = ("idx", "val", "dense", "raw")


def index_dtype(numel: int) -> torch.dtype:
    """The smallest of uint8 / int16 / int32 / int64 that holds every index ``0 .. numel - 1``."""
    largest = int(numel) - 1
    for limit, dtype in _INDEX_DTYPES:
        if largest <= limit:
            return dtype
    raise ConfigError(f"a tensor of {numel} elements cannot be indexed with int64")


def _check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not math.isfinite(keep_ratio):
        raise ConfigError(f"`keep_ratio` must be a number in (0, 1], got {keep_ratio!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"`keep_ratio` must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def topk_count(numel: int, keep_ratio: float) -> int:
    """``k = max(1, ceil(keep_ratio * numel))``, at most ``numel`` (see the module docstring)."""
    keep_ratio = _check_keep_ratio(keep_ratio)
    if numel <= 0:
        return 0
    return min(int(numel), max(1, math.ceil(round(keep_ratio * numel, 9))))


def _topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest entries, ties to the lower index, increasing (int64)."""
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n)
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest value
    above = torch.nonzero(magnitude > threshold).squeeze(1)
    tied = torch.nonzero(magnitude == threshold).squeeze(1)[: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def topk_compress(update: Mapping[str, torch.Tensor], keep_ratio: float) -> dict[str, torch.Tensor]:
    """Keep, per tensor, the ``k`` largest-magnitude entries of ``update`` (see the module docstring).

    Args:
        update: floating tensors (``trained - received``), keyed like the model's ``state_dict``.
        keep_ratio: fraction of each tensor's entries to keep, in ``(0, 1]``.

    Returns:
        the payload: ``<key>/idx`` + ``<key>/val``, or ``<key>/dense`` where smaller.

    Raises:
        ConfigError: a bad ``keep_ratio`` or a non-floating tensor (named).
        PayloadError: a tensor holding NaN or infinite values (named).
    """
    keep_ratio = _check_keep_ratio(keep_ratio)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in update.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConfigError(f"topk_compress compresses floating tensors; {key!r} is {what}")
        flat = tensor.detach().reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise PayloadError(f"update tensor {key!r} holds NaN or infinite values")
        numel = flat.numel()
        k = topk_count(numel, keep_ratio)
        sparse_bytes = k * (index_dtype(numel).itemsize + 4)
        if 4 * numel < sparse_bytes or k >= numel:
            out[f"{key}/dense"] = flat.to(torch.float32).clone()
            continue
        magnitude = flat.abs()
        if magnitude.dtype in (torch.float16, torch.bfloat16):
            magnitude = magnitude.float()  # exact, and kthvalue's CPU kernels want it
        idx = _topk_indices(magnitude, k)
        out[f"{key}/idx"] = idx.to(index_dtype(numel))
        out[f"{key}/val"] = flat[idx].to(torch.float32)
    return out


def _split_names(payload: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{key: {kind: tensor}}`` from ``<key>/<kind>`` names."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in payload.items():
        key, sep, kind = name.rpartition("/")
        if not sep or not key or kind not in _KINDS:
            raise PayloadError(f"top-k payload entry {name!r} is not '<key>/<kind>' with kind in {', '.join(_KINDS)}")
        if not isinstance(tensor, torch.Tensor):
            raise PayloadError(f"top-k payload entry {name!r} is a {type(tensor).__name__}, not a tensor")
        groups.setdefault(key, {})[kind] = tensor
    return groups


def topk_decompress(payload: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Rebuild the dense float32 updates of :func:`topk_compress`, validating everything.

    Args:
        payload: ``<key>/idx`` + ``<key>/val`` or ``<key>/dense`` entries.
        shapes: the expected shape of every key; each must be in the payload exactly once.

    Returns:
        ``{key: update}`` (float32, zeros where nothing was sent), in ``shapes``' order.

    Raises:
        PayloadError: naming the key: an unknown key or kind, a missing or doubled entry, a wrong
            dtype, rank or length, an index out of range or repeated, a non-finite value.
    """
    groups = _split_names(payload)
    unknown = sorted(set(groups) - set(shapes))
    if unknown:
        raise PayloadError(f"top-k payload holds unknown key(s) {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise PayloadError(f"shape of {key!r} must be a sequence of ints, got {shape!r}") from None
        numel = math.prod(shape)
        parts = groups.get(key)
        if not parts:
            raise PayloadError(f"top-k payload has no entry for {key!r}")
        if "raw" in parts:
            raise PayloadError(f"top-k payload sends {key!r} raw where an update was expected")
        if "dense" in parts:
            if len(parts) > 1:
                raise PayloadError(f"top-k payload has both dense and sparse entries for {key!r}")
            dense = parts["dense"]
            if dense.dtype != torch.float32 or dense.dim() != 1 or dense.numel() != numel:
                raise PayloadError(
                    f"{key}/dense must be 1-D float32 of {numel} values, got {tuple(dense.shape)} {dense.dtype}"
                )
            if not bool(torch.isfinite(dense).all()):
                raise PayloadError(f"{key}/dense holds NaN or infinite values")
            out[key] = dense.reshape(shape).clone()
            continue
        if set(parts) != {"idx", "val"}:
            raise PayloadError(f"top-k payload for {key!r} needs idx and val, got {sorted(parts)}")
        idx, val = parts["idx"], parts["val"]
        want = index_dtype(numel)
        if idx.dtype != want or idx.dim() != 1:
            raise PayloadError(f"{key}/idx must be 1-D {want} for {numel} elements, got {tuple(idx.shape)} {idx.dtype}")
        if val.dtype != torch.float32 or val.dim() != 1:
            raise PayloadError(f"{key}/val must be 1-D float32, got {tuple(val.shape)} {val.dtype}")
        if idx.numel() != val.numel():
            raise PayloadError(f"{key}: {idx.numel()} indices but {val.numel()} values")
        if not 1 <= idx.numel() <= numel:
            raise PayloadError(f"{key}: {idx.numel()} entries for a tensor of {numel} elements")
        pos = idx.to(torch.int64)
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= numel:
            raise PayloadError(f"{key}/idx holds an index outside [0, {numel}): {lo if lo < 0 else hi}")
        if torch.unique(pos).numel() != pos.numel():
            raise PayloadError(f"{key}/idx holds duplicate indices")
        if not bool(torch.isfinite(val).all()):
            raise PayloadError(f"{key}/val holds NaN or infinite values")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[pos] = val
        out[key] = dense.reshape(shape)
    return out


def compress_upload(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    keep_ratio: float,
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A client's compressed upload: top-k of ``trained - received`` (+ ``residual``).

    Floating tensors are sent as top-k updates; the others (e.g. ``num_batches_tracked``) as
    ``<key>/raw`` copies of the trained value.

    Error feedback: with ``residual`` (the part of earlier updates that was not sent, ``{}`` the
    first time), the compressed quantity is ``update + residual`` and the returned residual is
    what it leaves unsent this time. Without it the returned residual is ``{}``.

    Args:
        trained: the client's weights after local training.
        received: the weights it started from (what the server sent), same keys and shapes.
        keep_ratio: in ``(0, 1]``.
        residual: error-feedback memory, keyed like the floating tensors (missing keys or keys
            of another shape count as zero).

    Returns:
        ``(payload, new_residual)``; the payload's names carry no prefix.

    Raises:
        ConfigError: the key sets or shapes of ``trained`` and ``received`` differ, or a bad ratio.
    """
    if set(trained) != set(received):
        raise ConfigError(
            f"trained and received weights differ: only trained {sorted(set(trained) - set(received))[:5]}, "
            f"only received {sorted(set(received) - set(trained))[:5]}"
        )
    updates: dict[str, torch.Tensor] = {}
    payload: dict[str, torch.Tensor] = {}
    for key, t in trained.items():
        r = received[key]
        if tuple(t.shape) != tuple(r.shape):
            raise ConfigError(f"{key!r} has shape {tuple(t.shape)} after training but {tuple(r.shape)} when received")
        if t.is_floating_point():
            u = t.detach() - r.detach().to(t.dtype)
            if residual is not None and key in residual and tuple(residual[key].shape) == tuple(u.shape):
                u = u + residual[key].to(u.dtype)
            updates[key] = u
        else:
            payload[f"{key}/raw"] = t.detach().clone()
    compressed = topk_compress(updates, keep_ratio)
    payload.update(compressed)
    new_residual: dict[str, torch.Tensor] = {}
    if residual is not None and updates:
        sent = topk_decompress(compressed, {k: tuple(u.shape) for k, u in updates.items()})
        new_residual = {k: u - sent[k].to(u.dtype) for k, u in updates.items()}
    return payload, new_residual


def decode_topk_result(received: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server side: the client's full trained weights = ``received`` + decompressed update.

    Args:
        received: what the server sent this client (its full weights, or its sub-model's).
        extras: the result's extras; entries under :data:`TOPK_PREFIX` are the payload (others
            are ignored).

    Returns:
        ``{key: tensor}`` with ``received``'s keys, shapes and dtypes.

    Raises:
        PayloadError: naming the key: anything :func:`topk_decompress` rejects, a raw tensor whose
            shape or dtype differs from what was sent, or a non-float tensor sent as an update.
    """
    payload = {k[len(TOPK_PREFIX) :]: v for k, v in extras.items() if k.startswith(TOPK_PREFIX)}
    raw: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in payload.items():
        if name.endswith("/raw"):
            raw[name[: -len("/raw")]] = tensor
        else:
            rest[name] = tensor
    for key, tensor in raw.items():
        if key not in received:
            raise PayloadError(f"top-k payload holds unknown key {key!r}")
        want = received[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            got = (tuple(tensor.shape), tensor.dtype) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PayloadError(f"{key}/raw must have shape {tuple(want.shape)} and dtype {want.dtype}, got {got}")
    shapes = {k: tuple(v.shape) for k, v in received.items() if k not in raw}
    for key in shapes:
        if not received[key].is_floating_point():
            raise PayloadError(f"{key!r} is {received[key].dtype}: it must be sent raw, not as an update")
    updates = topk_decompress(rest, shapes)
    out: dict[str, torch.Tensor] = {}
    for key, base in received.items():
        out[key] = raw[key].clone() if key in raw else base + updates[key].to(base.dtype)
    return out


def keep_ratio_for_bandwidth(
    uplink_bytes_per_second: float, *, reference: float, min_keep: float = 0.01, max_keep: float = 1.0
) -> float:
    """FlexCom's compression level of a worker from its uplink bandwidth.

    Rule: ``clip(max_keep * uplink / reference, min_keep, max_keep)``. A worker with the
    reference bandwidth (the fastest worker's) keeps ``max_keep`` (everything, by default); a
    worker with a ``c`` times slower uplink keeps ``c`` times fewer values, so the number of values
    per second of upload is the same for all. (Each kept value costs its index too, so the sparse
    upload of a slow worker is 1.25x-3x the bytes of that many dense values; ``min_keep`` bounds the
    loss of information.)

    Raises:
        ConfigError: a non-positive or non-finite bandwidth, or not ``0 < min_keep <= max_keep <= 1``.
    """
    for name, value in (("uplink_bytes_per_second", uplink_bytes_per_second), ("reference", reference)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"`{name}` must be a positive finite number, got {value!r}")
    for name, value in (("min_keep", min_keep), ("max_keep", max_keep)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"`{name}` must be a number in (0, 1], got {value!r}")
    if not 0.0 < min_keep <= max_keep <= 1.0:
        raise ConfigError(f"need 0 < min_keep <= max_keep <= 1, got min_keep={min_keep}, max_keep={max_keep}")
    return float(min(max_keep, max(min_keep, max_keep * uplink_bytes_per_second / reference)))
