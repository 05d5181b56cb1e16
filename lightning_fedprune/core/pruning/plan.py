"""A pruning plan: which channels of every prunable group one sub-model keeps.

A :class:`Plan` is data: the kept channel indices of every group, in the ORIGINAL (full-model)
coordinates, plus the architecture's :class:`~lightning_fedprune.core.pruning.layout.Layout`
(shared by all plans of one architecture). From it come, by plain tensor indexing:

* :meth:`Plan.extract`: the sub-model's tensors (contiguous clones) from the full tensors;
* :meth:`Plan.recover`: full-shape tensors from the sub-model's, pruned positions taken from a base
  (R2SP: the global model) or zero (BSP);
* :meth:`Plan.sparse` / :meth:`Plan.residual`: the full model with every pruned position of every
  coupled tensor zeroed, and the rest;
* :meth:`Plan.compose`: nesting (a plan of the sub-model, mapped back to the full model).

Plans are built by :class:`~lightning_fedprune.core.pruning.planner.Planner` or loaded with
:meth:`Plan.from_json`; they never touch a module.

Normalization over pruned channels (``LayerNorm``, ``GroupNorm``): the sub-model's norm has the
kept channels' affine parameters (sliced like any other tensor) and computes its statistics over
the kept channels only (a ``GroupNorm`` of ``G`` groups keeps the same channel offsets in every
group, so each sub-model group is the full group restricted to its kept channels). The sparse
model's norm still averages over every channel, pruned ones included (they are zero there), so
its forward is NOT the sub-model's where such a norm is pruned; it equals the sub-model's when the
norm's statistics are taken over the kept channels, which is what
:meth:`~lightning_fedprune.core.pruning.planner.Planner.from_module` checks. R2SP recovery is
position-wise there as everywhere: the kept positions of the norm's weight and bias come from the
trained sub-model, the pruned ones from the base (the global model), bit for bit. The recovered
global model normalizes over all channels again, so it is the merge of the parameters, not of the
sub-model's function (as BSP, recovery without a base, is for every model).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.pruning.layout import (
    LAYOUT_FORMAT,
    Layout,
    decode_kept,
    encode_kept,
)
from lightning_fedprune.errors import ConfigError, PayloadError

__all__ = ["Plan"]

_LAYOUT_CACHE: "OrderedDict[str, Layout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 16


def _check_kept(layout: Layout, kept: Sequence[torch.Tensor], error: type[Exception]) -> tuple[torch.Tensor, ...]:
    """Validate kept indices (sorted, unique, in range, non-empty, ties respected)."""
    if len(kept) != layout.num_groups:
        raise error(f"a plan needs kept channels for {layout.num_groups} groups, got {len(kept)}")
    out = []
    for g, (name, size, k) in enumerate(zip(layout.group_names, layout.group_sizes, kept)):
        t = torch.as_tensor(k)
        if t.numel() == 0:
            raise error(f"group {name!r}: kept indices are empty (at least one channel must be kept)")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise error(f"group {name!r}: kept indices must be integers, got dtype {t.dtype}")
        t = t.to(dtype=torch.long, device="cpu").reshape(-1)
        if t.numel() == 0:
            raise error(f"group {name!r}: kept indices are empty (at least one channel must be kept)")
        if int(t.min()) < 0 or int(t.max()) >= size:
            raise error(f"group {name!r}: kept indices must lie in [0, {size}), got min {int(t.min())} max {int(t.max())}")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise error(f"group {name!r}: kept indices must be sorted ascending and unique")
        if layout.units and layout.blocks_of(g, t) is None:
            raise error(f"group {name!r}: kept indices must be {layout.describe_units(g)}")
        out.append(t.contiguous())
    for tie in layout.ties:
        counts = {out[g].numel() for g in tie}
        if len(counts) > 1:
            names = [layout.group_names[g] for g in tie]
            raise error(
                f"groups {names} (the layers of one nn.LSTM / nn.GRU / nn.RNN) must keep the same number of "
                f"hidden units, got {[out[g].numel() for g in tie]}"
            )
    return tuple(out)


class Plan:
    """Kept channels per group of one architecture (see the module docstring).

    Build plans with a :class:`~lightning_fedprune.core.pruning.planner.Planner` (or
    :meth:`from_json`). Treat them as immutable; the ``kept`` tensors must not be modified.

    Args:
        layout: The architecture's layout.
        kept: Per group, sorted unique int64 kept channel indices (original coordinates).
        ratio: The pruning ratio the plan was made with (``None`` if it was not made from one).

    Raises:
        ConfigError: If ``kept`` does not fit the layout.
    """

    __slots__ = ("_layout", "_kept", "_ratio", "_masks", "_map_cache", "_idx_cache")

    def __init__(self, layout: Layout, kept: Sequence[Any], *, ratio: float | None = None) -> None:
        self._init(layout, _check_kept(layout, kept, ConfigError), ratio)

    def _init(self, layout: Layout, kept: tuple[torch.Tensor, ...], ratio: float | None) -> None:
        self._layout = layout
        self._kept = kept
        self._ratio = None if ratio is None else float(ratio)
        self._masks: list[torch.Tensor] | None = None
        self._map_cache: dict[int, torch.Tensor] = {}
        self._idx_cache: dict[str, tuple[torch.Tensor | None, ...]] = {}

    @classmethod
    def _trusted(cls, layout: Layout, kept: tuple[torch.Tensor, ...], ratio: float | None) -> "Plan":
        plan = cls.__new__(cls)
        plan._init(layout, kept, ratio)
        return plan

    # ------------------------------------------------------------------ basic attributes
    @property
    def layout(self) -> Layout:
        """The architecture's layout (shared by every plan of it)."""
        return self._layout

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the full model's ``(key, shape)`` list."""
        return self._layout.fingerprint

    @property
    def ratio(self) -> float | None:
        """The ratio the plan was made with, or ``None``."""
        return self._ratio

    @property
    def kept(self) -> tuple[torch.Tensor, ...]:
        """Per group, sorted int64 kept channel indices in original coordinates."""
        return self._kept

    @property
    def num_groups(self) -> int:
        return self._layout.num_groups

    @property
    def group_names(self) -> tuple[str, ...]:
        return self._layout.group_names

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Channels per group in the full model."""
        return self._layout.group_sizes

    @property
    def kept_counts(self) -> tuple[int, ...]:
        """Kept channels per group."""
        return tuple(k.numel() for k in self._kept)

    @property
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every key in the full model (a copy)."""
        return dict(self._layout.shapes)

    def keys(self) -> list[str]:
        """Every ``state_dict`` key the plan knows, in ``state_dict`` order."""
        return list(self._layout.shapes)

    # ------------------------------------------------------------------ index maps
    def _kept_masks(self) -> list[torch.Tensor]:
        if self._masks is None:
            masks = []
            for size, k in zip(self._layout.group_sizes, self._kept):
                m = torch.zeros(size, dtype=torch.bool)
                m[k] = True
                masks.append(m)
            self._masks = masks
        return self._masks

    def _map_kept(self, map_index: int) -> torch.Tensor:
        out = self._map_cache.get(map_index)
        if out is None:
            out = self._layout.maps[map_index].kept(self._kept_masks(), self._kept)
            self._map_cache[map_index] = out
        return out

    def indices(self, key: str) -> tuple[torch.Tensor | None, ...]:
        """Per dimension of ``key``, the kept indices (int64, sorted) or ``None`` (dim untouched).

        Raises:
            ConfigError: If the key is unknown.
        """
        out = self._idx_cache.get(key)
        if out is None:
            dims = self._layout.dims.get(key)
            if dims is None:
                raise ConfigError(f"the plan does not know tensor {key!r}")
            out = tuple(None if m is None else self._map_kept(m) for m in dims)
            self._idx_cache[key] = out
        return out

    def sub_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every key in the sub-model."""
        return {
            key: tuple(s if i is None else i.numel() for s, i in zip(shape, self.indices(key)))
            for key, shape in self._layout.shapes.items()
        }

    def mask(self, key: str) -> torch.Tensor:
        """Boolean full-shape mask of ``key``: ``True`` where the sub-model keeps the position."""
        shape = self._full_shape(key, ConfigError)
        out = torch.zeros(shape, dtype=torch.bool)
        idx = self.indices(key)
        if all(i is None for i in idx):
            out.fill_(True)
            return out
        _scatter_(out, idx, torch.ones((), dtype=torch.bool))
        return out

    def _full_shape(self, key: str, error: type[Exception]) -> tuple[int, ...]:
        shape = self._layout.shapes.get(key)
        if shape is None:
            raise error(f"the plan does not know tensor {key!r}")
        return shape

    # ------------------------------------------------------------------ tensors
    def _check_full_state(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        unknown = [k for k in state if k not in self._layout.shapes]
        if unknown:
            raise ConfigError(
                f"{what} has tensors the plan does not know: {unknown[:8]}"
                + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
                + ". HINT: the plan was made for another model (or another module prefix such as 'model.')."
            )
        for k, v in state.items():
            if tuple(v.shape) != self._layout.shapes[k]:
                raise ConfigError(
                    f"{what}: tensor {k!r} has shape {tuple(v.shape)}, the plan's full model has {self._layout.shapes[k]}"
                )

    @torch.no_grad()
    def extract(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Slice full-model tensors into the sub-model's tensors.

        Args:
            state: Full-shape tensors (any subset of the plan's keys).

        Returns:
            A new dict, same keys, each tensor a contiguous clone (never a view).

        Raises:
            ConfigError: On keys the plan does not know or shapes that differ from the full model.
        """
        self._check_full_state(state, "extract: state")
        return {k: _gather(v, self.indices(k)) for k, v in state.items()}

    @torch.no_grad()
    def recover(
        self, sub_state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Scatter sub-model tensors back to full shape, in a NEW dict.

        Kept positions get the sub-model's values; pruned positions are copied bit-identically from
        ``base`` (R2SP: ``base`` = the global model, so the result is recovered + residual) or are
        zero when ``base`` is ``None`` (BSP). With a ``base`` the result has ``base``'s dtype and
        device, otherwise the sub tensor's.

        Raises:
            PayloadError: If a key is unknown or a tensor's shape is not the sub-model's (raised
                before anything is built, naming the key).
            ConfigError: If ``base`` lacks a key or has a non-full shape.
        """
        unknown = [k for k in sub_state if k not in self._layout.shapes]
        if unknown:
            raise PayloadError(f"recover: tensors the plan does not know: {unknown[:8]}")
        for k, v in sub_state.items():
            expected = tuple(s if i is None else i.numel() for s, i in zip(self._layout.shapes[k], self.indices(k)))
            if tuple(v.shape) != expected:
                raise PayloadError(
                    f"recover: tensor {k!r} has shape {tuple(v.shape)}, the plan's sub-model has {expected}"
                )
        if base is not None:
            missing = [k for k in sub_state if k not in base]
            if missing:
                raise ConfigError(f"recover: base lacks tensors {missing[:8]}")
            for k in sub_state:
                if tuple(base[k].shape) != self._layout.shapes[k]:
                    raise ConfigError(
                        f"recover: base tensor {k!r} has shape {tuple(base[k].shape)}, the full model has "
                        f"{self._layout.shapes[k]}"
                    )
        out: dict[str, torch.Tensor] = {}
        for k, v in sub_state.items():
            idx = self.indices(k)
            v = v.detach()
            if base is None:
                full = torch.zeros(self._layout.shapes[k], dtype=v.dtype, device=v.device)
            else:
                full = base[k].detach().clone()
            if all(i is None for i in idx):
                full.copy_(v)
            else:
                _scatter_(full, idx, v)
            out[k] = full
        return out

    @torch.no_grad()
    def sparse(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sparse model: ``state`` with every pruned position of every coupled tensor zeroed.

        Its forward equals the sub-model's forward (BN shifts and LSTM gate biases of pruned
        channels are zeroed too), except where a ``LayerNorm`` / ``GroupNorm`` normalizes pruned
        channels: its statistics cover every channel here and only the kept ones in the sub-model
        (see the module docstring). Returns new tensors.

        Raises:
            ConfigError: On unknown keys or non-full shapes.
        """
        self._check_full_state(state, "sparse: state")
        out = {}
        for k, v in state.items():
            idx = self.indices(k)
            v = v.detach()
            if all(i is None for i in idx):
                out[k] = v.clone()
                continue
            full = torch.zeros_like(v, memory_format=torch.contiguous_format)
            _scatter_(full, idx, _gather(v, idx))
            out[k] = full
        return out

    @torch.no_grad()
    def residual(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state - sparse(state)``: the pruned positions' values, zero at kept positions.

        Raises:
            ConfigError: On unknown keys or non-full shapes.
        """
        self._check_full_state(state, "residual: state")
        out = {}
        for k, v in state.items():
            idx = self.indices(k)
            full = v.detach().clone(memory_format=torch.contiguous_format)
            if all(i is None for i in idx):
                full.zero_()
            else:
                _scatter_(full, idx, torch.zeros((), dtype=full.dtype, device=full.device))
            out[k] = full
        return out

    # ------------------------------------------------------------------ algebra
    def compose(self, inner: "Plan") -> "Plan":
        """Nest ``inner`` (a plan of this plan's SUB-model) into this plan.

        ``inner.kept[g]`` are positions within ``self.kept[g]`` (e.g. from a
        :class:`~lightning_fedprune.core.pruning.planner.Planner` built on the physically pruned
        sub-model); the result keeps ``self.kept[g][inner.kept[g]]`` in original coordinates.

        Raises:
            ConfigError: If ``inner``'s groups are not this plan's sub-model groups.
        """
        if not isinstance(inner, Plan):
            raise ConfigError(f"compose expects a Plan, got {type(inner).__name__}")
        if inner.group_names != self.group_names:
            raise ConfigError(
                f"compose: inner plan's groups {list(inner.group_names)[:4]}... are not this plan's "
                f"{list(self.group_names)[:4]}...: it must come from a planner of this plan's sub-model"
            )
        bad = [
            (n, s, k.numel())
            for n, s, k in zip(self.group_names, inner.group_sizes, self._kept)
            if s != k.numel()
        ]
        if bad:
            name, size, kept = bad[0]
            raise ConfigError(
                f"compose: group {name!r} of the inner plan has {size} channels, this plan keeps {kept}: "
                "the inner plan must come from a planner of this plan's sub-model"
            )
        kept = tuple(outer[i] for outer, i in zip(self._kept, inner.kept))
        return Plan._trusted(self._layout, kept, None)

    def kept_fraction(self, keys: Iterable[str] | None = None) -> float:
        """Kept elements / total elements over ``keys`` (default: every tensor the plan knows)."""
        keys = list(self._layout.shapes) if keys is None else list(keys)
        total = kept = 0
        for k in keys:
            full = self._full_shape(k, ConfigError)
            total += math.prod(full)
            kept += math.prod(s if i is None else i.numel() for s, i in zip(full, self.indices(k)))
        return kept / total if total else 1.0

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """JSON-able form (strings, ints and lists): layout + kept masks (hex bit masks)."""
        data: dict[str, Any] = {
            "format": LAYOUT_FORMAT,
            "fingerprint": self.fingerprint,
            "kept": [encode_kept(k, s) for k, s in zip(self._kept, self._layout.group_sizes)],
            "layout": self._layout.to_json(),
        }
        if self._ratio is not None:
            data["ratio"] = repr(self._ratio)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Plan":
        """Rebuild a plan from :meth:`to_json`'s output, validating everything.

        Raises:
            PayloadError: On malformed or inconsistent data.
        """
        if not isinstance(data, Mapping):
            raise PayloadError(f"a plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") != LAYOUT_FORMAT:
            raise PayloadError(f"unknown plan format {data.get('format')!r}; expected {LAYOUT_FORMAT!r}")
        unknown = set(data) - {"format", "fingerprint", "kept", "layout", "ratio"}
        if unknown:
            raise PayloadError(f"plan has unknown fields {sorted(unknown)}")
        fingerprint = data.get("fingerprint")
        if not isinstance(fingerprint, str):
            raise PayloadError("plan fingerprint must be a string")
        ratio = None
        if "ratio" in data:
            try:
                ratio = float(data["ratio"]) if isinstance(data["ratio"], str) else None
            except ValueError:
                ratio = None
            if ratio is None or not 0.0 <= ratio < 1.0:
                raise PayloadError(f"plan ratio must be a string holding a float in [0, 1), got {data['ratio']!r:.40}")
        layout = _cached_layout(data.get("layout"), fingerprint)
        masks = data.get("kept")
        if not isinstance(masks, list) or len(masks) != layout.num_groups:
            raise PayloadError(f"plan 'kept' must be a list of {layout.num_groups} masks")
        kept = [
            decode_kept(m, s, f"group {n!r}")
            for m, s, n in zip(masks, layout.group_sizes, layout.group_names)
        ]
        return cls._trusted(layout, _check_kept(layout, kept, PayloadError), ratio)

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            self.fingerprint == other.fingerprint
            and self._ratio == other._ratio
            and all(torch.equal(a, b) for a, b in zip(self._kept, other._kept))
            and self._layout.same_structure(other._layout)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}:{k}/{s}" for n, k, s in zip(self.group_names[:4], self.kept_counts, self.group_sizes))
        more = ", ..." if self.num_groups > 4 else ""
        return f"Plan(fingerprint={self.fingerprint}, ratio={self._ratio}, groups=[{counts}{more}])"


def _cached_layout(data: Any, fingerprint: str) -> Layout:
    try:
        key = fingerprint + json.dumps(data, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"plan layout is not JSON data: {exc}") from None
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        layout = Layout.from_json(data, fingerprint)
        _LAYOUT_CACHE[key] = layout
        while len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.popitem(last=False)
    else:
        _LAYOUT_CACHE.move_to_end(key)
    return layout


# --------------------------------------------------------------------------------------------------
# indexing helpers
# --------------------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, idx: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Index-select every indexed dimension; always returns a new contiguous tensor."""
    t = t.detach()
    out = None
    for d, i in enumerate(idx):
        if i is not None:
            out = (t if out is None else out).index_select(d, i.to(t.device))
    return t.clone(memory_format=torch.contiguous_format) if out is None else out.contiguous()


def _scatter_(full: torch.Tensor, idx: Sequence[torch.Tensor | None], values: torch.Tensor) -> None:
    """``full[kept positions] = values`` in place (``values`` of the sub shape, or a scalar)."""
    dims = [d for d, i in enumerate(idx) if i is not None]
    device = full.device
    values = values.to(device=device, dtype=full.dtype)
    if len(dims) == 1 and values.dim() > 0:
        full.index_copy_(dims[0], idx[dims[0]].to(device), values)
        return
    last = dims[-1]
    index = []
    for d in range(last + 1):
        i = idx[d] if idx[d] is not None else torch.arange(full.shape[d])
        shape = [1] * (last + 1)
        shape[d] = -1
        index.append(i.to(device).view(shape))
    full.index_put_(tuple(index), values)
