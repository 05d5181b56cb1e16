"""Sparse payloads: pruned layers as COO triplets, with byte accounting (PruneFL Sec. 4.1-4.2).

:func:`pack_state` turns a masked state into the tensors that travel (``weights_format="coo"``),
:func:`unpack_state` turns them back into full tensors and checks everything it reads.

Per tensor ``key`` of the state, the packed form is one of:

* **dense**: ``key`` itself, unchanged (unmasked tensors: biases, buffers, layers at level 0);
* **COO** (masked 2-D weights, i.e. FC layers, when that is smaller): ``key::coo_indices`` of
  shape ``(2, M)`` holding the row and column of every kept weight, sorted row-major, in the
  smallest integer type that fits both dimensions (``b`` bits: uint8, int16, int32 or int64;
  safetensors messages carry no unsigned 16/32-bit type), and ``key::coo_values`` of shape
  ``(M,)`` holding the kept values in the same order;
* **masked dense** (convolutions, and FC layers whose COO form would be larger): ``key`` with
  pruned positions zero plus ``key::mask``, the mask as packed bits (uint8, ``ceil(N/8)``
  bytes, most significant bit first, padding bits zero), so the receiver knows which zeros are
  pruned.

With ``M`` kept out of ``N`` entries, the COO form of a float32 layer takes
``(2*b*M + 32*M) / (32*N) = (1 + b/16) * M/N`` of the dense bytes (Eq. 2 of the paper), so for
``b = 16`` it pays off below half density. The choice between COO and masked dense depends only on
the shape, ``M`` and the value dtype, so a client re-packing its trained weights with the same
mask produces exactly the layout it received (the server checks the result against it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch
from safetensors.torch import save as st_save

from lightning_fedprune.core.contract import COO, register_weights_format
from lightning_fedprune.core.masks import MaskSet
from lightning_fedprune.errors import PayloadError

__all__ = [
    "COO_INDICES",
    "COO_VALUES",
    "MASK_BITS",
    "index_dtype_for",
    "index_bits",
    "dense_nbytes",
    "coo_nbytes",
    "mask_nbytes",
    "coo_size_ratio",
    "use_coo",
    "pack_bits",
    "unpack_bits",
    "pack_state",
    "unpack_state",
    "unpack_with_masks",
    "payload_masks",
    "payload_layout",
    "encoded_nbytes",
]

COO_INDICES = "::coo_indices"
COO_VALUES = "::coo_values"
MASK_BITS = "::mask"
_SUFFIXES = (COO_INDICES, COO_VALUES, MASK_BITS)

_INDEX_DTYPES: tuple[tuple[torch.dtype, int, int], ...] = (
    (torch.uint8, 8, 255),
    (torch.int16, 16, 2**15 - 1),
    (torch.int32, 32, 2**31 - 1),
    (torch.int64, 64, 2**63 - 1),
)
_INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)

Shapes = Mapping[str, Union[Sequence[int], torch.Size, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------------------------


def index_dtype_for(shape: Sequence[int]) -> torch.dtype:
    """The smallest integer dtype holding every row and column index of a 2-D ``shape``."""
    largest = max(int(s) for s in shape) - 1
    for dtype, _, top in _INDEX_DTYPES:
        if largest <= top:
            return dtype
    raise PayloadError(f"a dimension of {tuple(shape)} is too large for 64-bit indices")


def index_bits(dtype: torch.dtype) -> int:
    """``b``: bits per index of an index dtype."""
    for d, bits, _ in _INDEX_DTYPES:
        if d == dtype:
            return bits
    raise PayloadError(f"{dtype} is not an index dtype")


def dense_nbytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor's data."""
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def mask_nbytes(numel: int) -> int:
    """Bytes of a packed-bit mask of ``numel`` entries."""
    return (int(numel) + 7) // 8


def coo_nbytes(shape: Sequence[int], nnz: int, *, value_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the COO form of a 2-D tensor with ``nnz`` kept entries: ``nnz * (2*b/8 + value size)``."""
    b = index_bits(index_dtype_for(shape))
    return int(nnz) * (2 * b // 8 + torch.empty((), dtype=value_dtype).element_size())


def coo_size_ratio(nnz: int, numel: int, bits: int) -> float:
    """Eq. (2) of the paper: COO bytes over dense float32 bytes, ``(1 + b/16) * M / N``."""
    return (1.0 + bits / 16.0) * nnz / numel


def use_coo(shape: Sequence[int], nnz: int, *, value_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the COO form is smaller than the masked dense form (values + packed mask)."""
    if len(shape) != 2:
        return False
    numel = math.prod(int(s) for s in shape)
    return coo_nbytes(shape, nnz, value_dtype=value_dtype) < dense_nbytes(shape, value_dtype) + mask_nbytes(numel)


def encoded_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``tensors`` serialized as one safetensors blob (what a message would carry)."""
    return len(st_save({k: v.detach().contiguous() for k, v in tensors.items()}))


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(N/8)`` uint8 bytes, row-major, most significant bit first."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (1-D bool of ``numel``); raises if the padding bits are set."""
    expanded = (bits.to(torch.uint8).view(-1, 1) & _BIT_WEIGHTS).ne(0).flatten()
    if bool(expanded[numel:].any()):
        raise PayloadError("mask padding bits are set")
    return expanded[:numel]


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def pack_state(
    state: Mapping[str, torch.Tensor],
    masks: MaskSet | Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors to send for ``state`` under ``masks`` (see the module docstring for the layout).

    Args:
        state: full tensors keyed like a ``state_dict``.
        masks: a :class:`MaskSet` or ``{key: bool tensor}``; unmasked keys travel dense, a mask
            keeping everything is ignored.
        keys: the masked keys allowed to travel as COO (default: every masked 2-D tensor, i.e.
            the FC weights). Pass ``()`` to send every masked layer as masked dense.

    Returns:
        New tensors (never views of ``state``), in the order of ``state``.

    Raises:
        PayloadError: a mask whose key is not in ``state`` or whose shape differs.
    """
    mm = masks.masks if isinstance(masks, MaskSet) else dict(masks)
    for key, m in mm.items():
        if key not in state:
            raise PayloadError(f"mask of layer {key!r} has no tensor in the state to pack")
        if tuple(m.shape) != tuple(state[key].shape):
            raise PayloadError(f"mask of layer {key!r} has shape {tuple(m.shape)}, the tensor {tuple(state[key].shape)}")
    coo_ok = set(keys) if keys is not None else {k for k, m in mm.items() if m.dim() == 2}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        t = t.detach()
        m = mm.get(key)
        if m is None or bool(m.all()):
            out[key] = t.clone()
            continue
        nnz = int(m.sum())
        if key in coo_ok and t.dim() == 2 and use_coo(t.shape, nnz, value_dtype=t.dtype):
            rows, cols = m.nonzero(as_tuple=True)  # row-major order
            out[key + COO_INDICES] = torch.stack([rows, cols]).to(index_dtype_for(t.shape))
            out[key + COO_VALUES] = t[rows, cols].clone()
        else:
            out[key] = t * m.to(t.dtype)
            out[key + MASK_BITS] = pack_bits(m)
    return out


def payload_layout(payload: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: "dense" | "coo" | "masked"}`` for every tensor a packed payload describes.

    Raises:
        PayloadError: a COO half without the other, or a mask without its dense values.
    """
    layout: dict[str, str] = {}
    for name in payload:
        base, suffix = _split(name)
        if suffix is None:
            layout.setdefault(base, "dense")
        elif suffix in (COO_INDICES, COO_VALUES):
            layout[base] = "coo"
        else:
            layout[base] = "masked"
    for base, kind in layout.items():
        if kind == "coo":
            for part in (COO_INDICES, COO_VALUES):
                if base + part not in payload:
                    raise PayloadError(f"COO tensor {base!r} lacks {base + part!r}")
            if base in payload or base + MASK_BITS in payload:
                raise PayloadError(f"tensor {base!r} is sent both as COO and dense")
        elif kind == "masked" and base not in payload:
            raise PayloadError(f"mask {base + MASK_BITS!r} comes without the values {base!r}")
    return layout


def _split(name: str) -> tuple[str, str | None]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    if "::" in name:
        raise PayloadError(f"payload tensor {name!r} has an unknown '::' suffix (known: {', '.join(_SUFFIXES)})")
    return name, None


def unpack_with_masks(
    payload: Mapping[str, torch.Tensor], shapes: Shapes, *, strict: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full tensors and the masks of the packed (COO / masked dense) layers of a payload.

    Args:
        payload: tensors written by :func:`pack_state` (possibly received from another party).
        shapes: ``{key: shape}`` of the receiving model (tensors are accepted too).
        strict: every key of ``shapes`` must be in the payload.

    Returns:
        ``(state, masks)``: ``state`` holds a new full tensor per key (pruned positions 0),
        ``masks`` a bool tensor per COO or masked-dense key.

    Raises:
        PayloadError: an unknown or missing tensor, a wrong shape or dtype, indices out of range,
            unsorted or duplicated, values of the wrong length or not finite, dense values at
            pruned positions, a mask of the wrong size or with padding bits set; the message
            names the tensor.
    """
    want = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v) for k, v in shapes.items()}
    layout = payload_layout(payload)
    unknown = [k for k in layout if k not in want]
    if unknown:
        raise PayloadError(f"payload holds tensors the model does not have: {unknown[:5]}")
    if strict:
        missing = [k for k in want if k not in layout]
        if missing:
            raise PayloadError(f"payload lacks tensors of the model: {missing[:5]}")
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, kind in layout.items():
        shape = want[key]
        if kind == "dense":
            t = payload[key]
            if tuple(t.shape) != shape:
                raise PayloadError(f"tensor {key!r} has shape {tuple(t.shape)}, the model expects {shape}")
            state[key] = t.clone()
        elif kind == "coo":
            state[key], masks[key] = _unpack_coo(key, payload[key + COO_INDICES], payload[key + COO_VALUES], shape)
        else:
            state[key], masks[key] = _unpack_masked(key, payload[key], payload[key + MASK_BITS], shape)
    return state, masks


@register_weights_format(COO)
def unpack_state(payload: Mapping[str, torch.Tensor], shapes: Shapes, *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors from a packed payload (see :func:`unpack_with_masks`, which also returns the masks).

    Raises:
        PayloadError: on anything malformed, naming the tensor.
    """
    return unpack_with_masks(payload, shapes, strict=strict)[0]


def payload_masks(payload: Mapping[str, torch.Tensor], shapes: Shapes) -> dict[str, torch.Tensor]:
    """The masks a packed payload implies (COO and masked-dense keys only), validated."""
    return unpack_with_masks(payload, shapes, strict=False)[1]


def _unpack_coo(key: str, idx: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    name = key + COO_INDICES
    if len(shape) != 2:
        raise PayloadError(f"tensor {key!r} arrives as COO but the model's tensor has shape {shape} (COO is for 2-D weights)")
    if idx.dtype not in _INT_DTYPES:
        raise PayloadError(f"{name!r} must hold integers, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != 2:
        raise PayloadError(f"{name!r} must have shape (2, M), got {tuple(idx.shape)}")
    if not values.is_floating_point() or values.dim() != 1 or values.shape[0] != idx.shape[1]:
        raise PayloadError(
            f"{key + COO_VALUES!r} must be a 1-D float tensor of {idx.shape[1]} values, got {values.dtype} {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise PayloadError(f"{key + COO_VALUES!r} holds NaN or infinite values")
    rows, cols = idx[0].to(torch.int64), idx[1].to(torch.int64)
    nnz = rows.numel()
    if nnz == 0:
        raise PayloadError(f"{name!r} keeps no weight of layer {key!r}")
    if bool((rows < 0).any() | (rows >= shape[0]).any() | (cols < 0).any() | (cols >= shape[1]).any()):
        raise PayloadError(f"{name!r} holds indices outside the layer's shape {shape}")
    flat = rows * shape[1] + cols
    if nnz > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise PayloadError(f"{name!r} must be sorted row-major without duplicates")
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[flat] = True
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    dense[flat] = values
    return dense.reshape(shape), mask.reshape(shape)


def _unpack_masked(key: str, values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    name = key + MASK_BITS
    if tuple(values.shape) != shape:
        raise PayloadError(f"tensor {key!r} has shape {tuple(values.shape)}, the model expects {shape}")
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != mask_nbytes(numel):
        raise PayloadError(f"{name!r} must be {mask_nbytes(numel)} uint8 bytes, got {bits.dtype} {tuple(bits.shape)}")
    try:
        mask = unpack_bits(bits, numel).reshape(shape)
    except PayloadError as err:
        raise PayloadError(f"{name!r}: {err}") from None
    if not bool(mask.any()):
        raise PayloadError(f"{name!r} keeps no weight of layer {key!r}")
    if values.is_floating_point() and bool(values.masked_select(~mask).ne(0).any()):
        raise PayloadError(f"tensor {key!r} has non-zero values at positions its mask prunes")
    return values.clone(), mask
