"""The static part of a pruning plan: which positions of which tensor each channel owns.

A :class:`Layout` is computed once per architecture (by
:meth:`~lightning_fedprune.core.pruning.planner.Planner.from_module`) and shared by every
:class:`~lightning_fedprune.core.pruning.plan.Plan` made from it. It holds

* the prunable *groups* (name and number of channels), in the graph's order;
* for every ``state_dict`` key: its full shape and, per dimension, an optional :class:`DimMap`;
* ties: groups that must keep the same number of channels (the layers of one ``nn.LSTM`` /
  ``nn.GRU`` / ``nn.RNN``);
* units: groups pruned by whole blocks. A group of ``C`` channels with units ``(chunks, unit)``
  is ``chunks`` equal chunks of ``C / chunks`` channels, each cut into blocks of ``unit``
  consecutive channels; a plan keeps whole blocks, the same blocks in every chunk. A timm
  attention's ``qkv`` rows are ``(3, head_dim)`` (the same heads in q, k and v), an
  ``nn.MultiheadAttention``'s embedding ``(1, head_dim)`` (whole heads), a ``GroupNorm`` of ``G``
  groups ``(G, 1)`` (every group keeps the same channel offsets, so the sub-model's groups are the
  full model's groups restricted to the kept channels).

A :class:`DimMap` says how the channels of one or more groups map to the positions of one tensor
dimension. It is a list of :class:`Part` s, each a set of ``(target position, group channel)``
pairs; positions no part covers are always kept. Given each group's kept channels, the kept
positions of the dimension are those of uncovered positions and of pairs whose channel is kept.

Most parts are *regular*: channel ``c`` owns positions ``offset + c*stride + j*step`` for
``j < repeat`` (identity: ``(0, 1, 1, 0)``; a flattened ``C x HW`` feature map:
``(0, HW, HW, 1)``; the four LSTM gate blocks: ``(0, 1, 4, H)``; a concatenation: ``offset``).
Those are stored in JSON as five integers; irregular parts as explicit position lists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fedprune.errors import PayloadError

__all__ = ["Part", "DimMap", "Layout", "fingerprint_of", "encode_kept", "decode_kept", "LAYOUT_FORMAT"]

#: Format tag written into plan JSON.
LAYOUT_FORMAT = "lightning_fedprune.plan/1"


def fingerprint_of(shapes: Mapping[str, Sequence[int]], wiring: str = "") -> str:
    """Stable hash of ``(key, shape)`` of every tensor (order-independent) and of the graph's
    ``wiring`` hash (when given), 16 hex digits."""
    h = hashlib.sha256()
    for key in sorted(shapes):
        h.update(key.encode())
        h.update(b":")
        h.update(",".join(str(int(s)) for s in shapes[key]).encode())
        h.update(b";")
    if wiring:
        h.update(b"wiring:" + wiring.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# kept-channel encoding: a hexadecimal bit mask (bit c set = channel c kept)
# --------------------------------------------------------------------------------------------------
def encode_kept(kept: torch.Tensor, size: int) -> str:
    """Encode sorted kept channel indices as a hex bit mask of ``ceil(size / 4)`` digits."""
    value = 0
    for c in kept.tolist():
        value |= 1 << c
    return format(value, f"0{(size + 3) // 4}x")


def decode_kept(text: Any, size: int, where: str) -> torch.Tensor:
    """Decode :func:`encode_kept`'s mask; :class:`PayloadError` naming ``where`` if malformed."""
    if not isinstance(text, str) or len(text) != (size + 3) // 4:
        raise PayloadError(f"{where}: kept mask must be a string of {(size + 3) // 4} hex digits, got {text!r:.60}")
    try:
        value = int(text, 16)
    except ValueError:
        raise PayloadError(f"{where}: kept mask is not hexadecimal: {text!r:.60}") from None
    if value >> size:
        raise PayloadError(f"{where}: kept mask sets channels beyond the group's {size} channels")
    kept = [c for c in range(size) if (value >> c) & 1]
    if not kept:
        raise PayloadError(f"{where}: kept mask keeps no channel (at least one must be kept)")
    return torch.tensor(kept, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# index maps
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Part:
    """``(target position, group channel)`` pairs of one group in one tensor dimension.

    Attributes:
        group: Index of the group.
        tgt: int64 positions in the tensor dimension.
        root: int64 channels of the group, ``root[i]`` owns ``tgt[i]``.
        regular: ``(offset, stride, repeat, step)`` when the pairs are exactly
            ``{(offset + c*stride + j*step, c) : c < group size, j < repeat}``, else ``None``.
    """

    group: int
    tgt: torch.Tensor
    root: torch.Tensor
    regular: tuple[int, int, int, int] | None

    @staticmethod
    def from_pairs(group: int, tgt: torch.Tensor, root: torch.Tensor, group_size: int) -> "Part":
        """Build a part from pairs, detecting a regular form (pairs are sorted by channel)."""
        tgt = torch.as_tensor(tgt, dtype=torch.long)
        root = torch.as_tensor(root, dtype=torch.long)
        order = torch.argsort(root * (int(tgt.max()) + 1 if tgt.numel() else 1) + tgt)
        tgt, root = tgt[order].contiguous(), root[order].contiguous()
        return Part(group, tgt, root, _detect_regular(tgt, root, group_size))

    @staticmethod
    def from_regular(group: int, group_size: int, offset: int, stride: int, repeat: int, step: int) -> "Part":
        """Build the regular part ``offset + c*stride + j*step``."""
        c = torch.arange(group_size, dtype=torch.long)
        j = torch.arange(repeat, dtype=torch.long)
        tgt = (offset + c[:, None] * stride + j[None, :] * step).reshape(-1)
        root = c.repeat_interleave(repeat)
        return Part(group, tgt, root, (offset, stride, repeat, step))

    def to_json(self) -> list[Any]:
        if self.regular is not None:
            return [self.group, *self.regular]
        return [self.group, self.tgt.tolist(), self.root.tolist()]


def _detect_regular(tgt: torch.Tensor, root: torch.Tensor, group_size: int) -> tuple[int, int, int, int] | None:
    n = tgt.numel()
    if n == 0 or n % group_size:
        return None
    repeat = n // group_size
    if not torch.equal(root, torch.arange(group_size).repeat_interleave(repeat)):
        return None
    table = tgt.view(group_size, repeat)
    offset = int(table[0, 0])
    stride = int(table[1, 0] - table[0, 0]) if group_size > 1 else 1
    step = int(table[0, 1] - table[0, 0]) if repeat > 1 else 0
    c = torch.arange(group_size)[:, None]
    j = torch.arange(repeat)[None, :]
    if torch.equal(table, offset + c * stride + j * step):
        return (offset, stride, repeat, step)
    return None


@dataclass(frozen=True, eq=False)
class DimMap:
    """How group channels map to the positions of one tensor dimension of ``size`` positions.

    Attributes:
        size: Length of the dimension in the full model.
        parts: The groups' parts (disjoint target positions).
        free: Positions no part covers (always kept).
        identity_group: If the dimension is exactly one group's channels (identity part covering
            every position), that group's index: kept positions ARE the group's kept channels.
    """

    size: int
    parts: tuple[Part, ...]
    free: torch.Tensor = field(repr=False)
    identity_group: int | None

    @staticmethod
    def build(size: int, parts: Sequence[Part]) -> "DimMap":
        covered = torch.zeros(size, dtype=torch.bool)
        for p in parts:
            covered[p.tgt] = True
        free = torch.nonzero(~covered).view(-1)
        identity = None
        if len(parts) == 1 and parts[0].regular == (0, 1, 1, 0) and parts[0].tgt.numel() == size:
            identity = parts[0].group
        return DimMap(size, tuple(parts), free, identity)

    def kept(self, kept_masks: Sequence[torch.Tensor], kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """Kept positions (sorted int64) given each group's kept mask / kept indices."""
        if self.identity_group is not None:
            return kept[self.identity_group]
        pieces = [self.free] if self.free.numel() else []
        for p in self.parts:
            pieces.append(p.tgt[kept_masks[p.group][p.root]])
        out = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
        return torch.sort(out).values

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "parts": [p.to_json() for p in self.parts]}


@dataclass(frozen=True, eq=False)
class Layout:
    """Groups, tensors and index maps of one architecture (see the module docstring).

    Attributes:
        fingerprint: :func:`fingerprint_of` the full shapes.
        group_names: A readable name per group (the root layer's module name).
        group_sizes: Channels per group.
        shapes: Full shape of every ``state_dict`` key, in ``state_dict`` order.
        maps: The distinct dimension maps.
        dims: Per key, per dimension, an index into ``maps`` or ``None`` (dimension untouched).
        ties: Groups that must keep equal numbers of channels.
        units: Per group ``(chunks, unit)`` (see the module docstring), or ``()`` when every group is
            ``(1, 1)`` (any channel set).
        wiring: Hash of the traced graph's wiring (which layer and operation reads which, in
            argument order), so that models with the same tensors but other connections (e.g. the
            inputs of a ``torch.cat`` swapped) have other fingerprints; ``""`` for layouts saved
            before it existed. The fingerprint covers it.
    """

    fingerprint: str
    group_names: tuple[str, ...]
    group_sizes: tuple[int, ...]
    shapes: dict[str, tuple[int, ...]]
    maps: tuple[DimMap, ...]
    dims: dict[str, tuple[int | None, ...]]
    ties: tuple[tuple[int, ...], ...] = ()
    wiring: str = ""
    units: tuple[tuple[int, int], ...] = ()

    # ------------------------------------------------------------------ derived
    @property
    def shapes_fingerprint(self) -> str:
        """:func:`fingerprint_of` the shapes alone (without the wiring)."""
        return fingerprint_of(self.shapes)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def group_units(self, g: int) -> tuple[int, int]:
        """``(chunks, unit)`` of group ``g``; ``(1, 1)`` for a group of free channels."""
        return self.units[g] if self.units else (1, 1)

    def expand_units(self, g: int, blocks: torch.Tensor) -> torch.Tensor:
        """Sorted channels of group ``g`` made of ``blocks`` (sorted block indices within a chunk)."""
        chunks, unit = self.group_units(g)
        per_chunk = self.group_sizes[g] // chunks
        c = torch.arange(chunks)[:, None, None] * per_chunk
        j = torch.arange(unit)[None, None, :]
        return (c + blocks.to(torch.long)[None, :, None] * unit + j).reshape(-1)

    def blocks_of(self, g: int, kept: torch.Tensor) -> torch.Tensor | None:
        """The block indices of sorted channels ``kept`` of group ``g``, or ``None`` if ``kept`` is
        not whole blocks, the same in every chunk."""
        chunks, unit = self.group_units(g)
        if (chunks, unit) == (1, 1):
            return kept
        first = kept[kept < self.group_sizes[g] // chunks]
        blocks = torch.unique(first // unit)
        expanded = self.expand_units(g, blocks)
        if expanded.numel() != kept.numel() or not torch.equal(expanded, kept):
            return None
        return blocks

    def describe_units(self, g: int) -> str:
        chunks, unit = self.group_units(g)
        if chunks == 1:
            return f"whole blocks of {unit} consecutive channels (attention heads)"
        if unit == 1:
            return f"the same channel offsets in each of its {chunks} equal chunks (GroupNorm groups)"
        return f"whole blocks of {unit} channels, the same in each of its {chunks} chunks (heads of q, k and v)"

    def group_index(self, key: str | int) -> int:
        """Index of a group given by name or index (raises ``KeyError``)."""
        if isinstance(key, bool):
            raise KeyError(key)
        if isinstance(key, int):
            if 0 <= key < self.num_groups:
                return key
            raise KeyError(key)
        return self._name_to_index[key]

    @property
    def _name_to_index(self) -> dict[str, int]:
        cache = self.__dict__.get("_n2i")
        if cache is None:
            cache = {n: i for i, n in enumerate(self.group_names)}
            object.__setattr__(self, "_n2i", cache)
        return cache

    def same_structure(self, other: "Layout") -> bool:
        """True if ``other`` describes the same groups, tensors and maps."""
        return self is other or self.canonical_json() == other.canonical_json()

    def canonical_json(self) -> str:
        cache = self.__dict__.get("_canon")
        if cache is None:
            data = self.to_json()
            data.pop("wiring", None)  # the structure only (the fingerprint covers the wiring)
            cache = json.dumps(data, sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_canon", cache)
        return cache

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "groups": [[n, s] for n, s in zip(self.group_names, self.group_sizes)],
            "maps": [m.to_json() for m in self.maps],
            "tensors": [[k, list(self.shapes[k]), list(self.dims[k])] for k in self.shapes],
            "ties": [list(t) for t in self.ties],
        }
        if self.wiring:
            data["wiring"] = self.wiring
        if self.units:
            data["units"] = [[g, c, u] for g, (c, u) in enumerate(self.units) if (c, u) != (1, 1)]
        return data

    @staticmethod
    def from_json(data: Any, fingerprint: Any) -> "Layout":
        """Rebuild and validate a layout (raises :class:`PayloadError` on malformed data)."""
        if not isinstance(data, Mapping):
            raise PayloadError("plan layout must be a JSON object")
        groups = _list(data.get("groups"), "layout.groups")
        names: list[str] = []
        sizes: list[int] = []
        for i, g in enumerate(groups):
            g = _list(g, f"layout.groups[{i}]")
            if len(g) != 2 or not isinstance(g[0], str):
                raise PayloadError(f"layout.groups[{i}] must be [name, size], got {g!r:.80}")
            names.append(g[0])
            sizes.append(_pos_int(g[1], f"layout.groups[{i}] size"))
        if len(set(names)) != len(names):
            raise PayloadError("layout.groups has duplicate group names")

        maps: list[DimMap] = []
        for mi, m in enumerate(_list(data.get("maps"), "layout.maps")):
            where = f"layout.maps[{mi}]"
            if not isinstance(m, Mapping):
                raise PayloadError(f"{where} must be an object")
            size = _pos_int(m.get("size"), f"{where}.size")
            parts: list[Part] = []
            covered = torch.zeros(size, dtype=torch.bool)
            for pi, p in enumerate(_list(m.get("parts"), f"{where}.parts")):
                pw = f"{where}.parts[{pi}]"
                p = _list(p, pw)
                if not p:
                    raise PayloadError(f"{pw} is empty")
                g = _nonneg_int(p[0], f"{pw} group")
                if g >= len(sizes):
                    raise PayloadError(f"{pw} refers to group {g}, the layout has {len(sizes)}")
                if len(p) == 5:
                    offset, stride, repeat, step = (_int(v, pw) for v in p[1:])
                    if repeat <= 0:
                        raise PayloadError(f"{pw}: repeat must be positive")
                    part = Part.from_regular(g, sizes[g], offset, stride, repeat, step)
                elif len(p) == 3:
                    tgt = [_int(v, pw) for v in _list(p[1], pw)]
                    root = [_int(v, pw) for v in _list(p[2], pw)]
                    if len(tgt) != len(root) or not tgt:
                        raise PayloadError(f"{pw}: position and channel lists must be non-empty and of equal length")
                    if min(root) < 0 or max(root) >= sizes[g]:
                        raise PayloadError(f"{pw}: channel out of range [0, {sizes[g]})")
                    part = Part.from_pairs(g, torch.tensor(tgt), torch.tensor(root), sizes[g])
                else:
                    raise PayloadError(f"{pw} must be [group, offset, stride, repeat, step] or [group, positions, channels]")
                if int(part.tgt.min()) < 0 or int(part.tgt.max()) >= size:
                    raise PayloadError(f"{pw}: positions out of range [0, {size})")
                if torch.unique(part.tgt).numel() != part.tgt.numel() or bool(covered[part.tgt].any()):
                    raise PayloadError(f"{pw}: positions overlap")
                covered[part.tgt] = True
                parts.append(part)
            maps.append(DimMap.build(size, parts))

        shapes: dict[str, tuple[int, ...]] = {}
        dims: dict[str, tuple[int | None, ...]] = {}
        for ti, t in enumerate(_list(data.get("tensors"), "layout.tensors")):
            where = f"layout.tensors[{ti}]"
            t = _list(t, where)
            if len(t) != 3 or not isinstance(t[0], str):
                raise PayloadError(f"{where} must be [key, shape, dims]")
            key = t[0]
            if key in shapes:
                raise PayloadError(f"{where}: duplicate key {key!r}")
            shape = tuple(_nonneg_int(s, f"{key} shape") for s in _list(t[1], f"{key} shape"))
            dl = _list(t[2], f"{key} dims")
            if len(dl) != len(shape):
                raise PayloadError(f"tensor {key!r}: {len(dl)} dimension maps for a {len(shape)}-d shape")
            kd: list[int | None] = []
            for d, mi in enumerate(dl):
                if mi is None:
                    kd.append(None)
                    continue
                mi = _nonneg_int(mi, f"{key} dims")
                if mi >= len(maps):
                    raise PayloadError(f"tensor {key!r} dim {d} refers to map {mi}, the layout has {len(maps)}")
                if maps[mi].size != shape[d]:
                    raise PayloadError(f"tensor {key!r} dim {d} has {shape[d]} positions, its map {maps[mi].size}")
                kd.append(mi)
            shapes[key] = shape
            dims[key] = tuple(kd)

        ties: list[tuple[int, ...]] = []
        for i, t in enumerate(_list(data.get("ties", []), "layout.ties")):
            members = tuple(_nonneg_int(g, f"layout.ties[{i}]") for g in _list(t, f"layout.ties[{i}]"))
            if any(g >= len(sizes) for g in members) or len({sizes[g] for g in members}) > 1:
                raise PayloadError(f"layout.ties[{i}] refers to missing groups or groups of different sizes")
            ties.append(members)

        units = [(1, 1)] * len(sizes)
        for i, u in enumerate(_list(data.get("units", []), "layout.units")):
            u = _list(u, f"layout.units[{i}]")
            if len(u) != 3:
                raise PayloadError(f"layout.units[{i}] must be [group, chunks, unit]")
            g, chunks, unit = (_nonneg_int(v, f"layout.units[{i}]") for v in u)
            if g >= len(sizes) or chunks < 1 or unit < 1 or sizes[g] % (chunks * unit):
                raise PayloadError(f"layout.units[{i}] does not divide its group's channels")
            units[g] = (chunks, unit)
        wiring = data.get("wiring", "")
        if not isinstance(wiring, str) or (wiring and not _is_hex(wiring, 16)):
            raise PayloadError(f"layout.wiring must be a string of 16 hex digits, got {wiring!r:.40}")
        expected = fingerprint_of(shapes, wiring)
        if fingerprint != expected:
            raise PayloadError(
                f"plan fingerprint {fingerprint!r} does not match its own tensor shapes and wiring ({expected!r}): "
                "corrupted plan"
            )
        unit_tuple = tuple(units) if any(u != (1, 1) for u in units) else ()
        return Layout(expected, tuple(names), tuple(sizes), shapes, tuple(maps), dims, tuple(ties), wiring, unit_tuple)


# --------------------------------------------------------------------------------------------------
# JSON validation helpers
# --------------------------------------------------------------------------------------------------
def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PayloadError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}: expected an integer, got {value!r:.40}")
    return value


def _nonneg_int(value: Any, where: str) -> int:
    v = _int(value, where)
    if v < 0:
        raise PayloadError(f"{where}: expected a non-negative integer, got {v}")
    return v


def _pos_int(value: Any, where: str) -> int:
    v = _int(value, where)
    if v <= 0:
        raise PayloadError(f"{where}: expected a positive integer, got {v}")
    return v
