"""Unstructured pruning masks: levels, layer-wise rates, magnitude / init / random pruning.

PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices")
prunes weights, not channels. Its vocabulary, kept here:

* a *prunable layer* is the ``weight`` of a fully connected (``nn.Linear``) or convolutional
  (``nn.Conv1d/2d/3d``) layer; biases and buffers are never pruned;
* every prunable layer has a *pruning rate* ``r`` in ``[0, 1)`` (Table 1: e.g. conv 5%/10%,
  FC 20%/20%/10% for the layers in order);
* one *level* of pruning removes, in every layer, ``round(r * remaining)`` of the weights that
  are still there, those with the smallest magnitudes (ties: the lower flat index goes first);
  "level L" means L such steps, so a layer keeps about ``(1 - r) ** L`` of its weights;
* a *mask* is a bool tensor of the layer's shape, ``True`` where the weight is kept. A
  :class:`MaskSet` holds the masks of all prunable layers and the level they are at. It is plain
  data: :meth:`MaskSet.to_json` writes, per layer, the shape and the runs of kept flat indices
  (``[start, length, start, length, ...]``), and :meth:`MaskSet.from_json` /
  :meth:`MaskSet.validate` check it against a model's shapes, naming the layer at fault.

``round`` is round-half-up: ``floor(r * n + 0.5)``. With LeNet-300-100 and rates 20%/20%/10%,
level 20 leaves 1.35% of all parameters (biases included) and level 30 0.29%, the figures the
paper quotes. A level that would remove every weight of a layer is refused
(:class:`~lightning_fedprune.errors.ConfigError` naming the layer); so is a rate outside
``[0, 1)``.

Everything here is tensors in, tensors out: no Lightning, no transport.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from lightning_fedprune.core.aggregation import weighted_average
from lightning_fedprune.errors import ConfigError

__all__ = [
    "MASKS_FORMAT",
    "PrunableLayer",
    "MaskSet",
    "prunable_layers",
    "layer_rates",
    "check_rate",
    "prune_count",
    "kept_after_levels",
    "check_levels",
    "magnitude_prune",
    "init_prune",
    "random_prune",
    "apply_masks",
    "apply_masks_",
    "masked_weighted_average",
    "reinitialize",
    "remaining_fraction",
    "pruned_linear_macs",
]

#: Version of the JSON written by :meth:`MaskSet.to_json`.
MASKS_FORMAT = 1

Shapes = Mapping[str, Union[Sequence[int], torch.Size, torch.Tensor]]
RateSpec = Union[float, Sequence[float], None]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------------------------
# layers and rates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight.

    Attributes:
        key: its ``state_dict`` key (e.g. ``"model.features.0.weight"``).
        kind: ``"fc"`` (fully connected) or ``"conv"``.
        shape: the weight's shape.
    """

    key: str
    kind: str
    shape: tuple[int, ...]


def prunable_layers(source: nn.Module | Mapping[str, torch.Tensor], *, keys: Iterable[str] | None = None) -> list[PrunableLayer]:
    """The prunable weights of a module or a state, in registration (layer) order.

    Args:
        source: an ``nn.Module`` (``nn.Linear`` weights are ``"fc"``, ``nn.ConvNd`` weights
            ``"conv"``; keys as in its ``state_dict``) or a state dict, where every ``*.weight``
            of 2 dimensions counts as ``"fc"`` and of 3 to 5 dimensions as ``"conv"`` (a 2-D
            embedding table would count as FC: pass explicit rates to leave it alone).
        keys: restrict to these keys (e.g. the trainable ones).
    """
    allowed = set(keys) if keys is not None else None
    out: list[PrunableLayer] = []
    if isinstance(source, nn.Module):
        for name, mod in source.named_modules():
            if isinstance(mod, nn.Linear):
                kind = "fc"
            elif isinstance(mod, _CONV_TYPES):
                kind = "conv"
            else:
                continue
            if getattr(mod, "weight", None) is None:
                continue
            key = f"{name}.weight" if name else "weight"
            if allowed is None or key in allowed:
                out.append(PrunableLayer(key, kind, tuple(mod.weight.shape)))
        return out
    for key, t in source.items():
        if not key.endswith("weight") or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if allowed is not None and key not in allowed:
            continue
        if t.dim() == 2:
            out.append(PrunableLayer(key, "fc", tuple(t.shape)))
        elif 3 <= t.dim() <= 5:
            out.append(PrunableLayer(key, "conv", tuple(t.shape)))
    return out


def check_rate(rate: Any, layer: str) -> float:
    """``rate`` as a float after checking it is a number in ``[0, 1)``.

    Raises:
        ConfigError: naming ``layer``.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(float(rate)) or not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"pruning rate of layer {layer!r} must be a number in [0, 1), got {rate!r}")
    return float(rate)


def _spread(spec: RateSpec, layers: list[PrunableLayer], kind: str) -> dict[str, float]:
    if spec is None or not layers:
        return {}
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        values = [spec] * len(layers)
    else:
        values = list(spec)
        if len(values) == 1:
            values = values * len(layers)
        elif len(values) != len(layers):
            names = ", ".join(repr(l.key) for l in layers)
            raise ConfigError(
                f"`{kind}_rates` has {len(values)} values but the model has {len(layers)} "
                f"{'fully connected' if kind == 'fc' else 'convolutional'} layers ({names}); give one rate per "
                f"layer, a single rate for all of them, or explicit per-layer `rates`"
            )
    return {l.key: check_rate(v, l.key) for l, v in zip(layers, values)}


def layer_rates(
    source: nn.Module | Mapping[str, torch.Tensor] | Sequence[PrunableLayer],
    *,
    fc: RateSpec = (0.2, 0.2, 0.1),
    conv: RateSpec = (0.05, 0.1),
    rates: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer pruning rates, Table 1 style: one rate per FC layer and per conv layer, in order.

    Args:
        source: a module, a state dict or a list of :class:`PrunableLayer` (see
            :func:`prunable_layers`).
        fc: rates of the fully connected layers: one per layer, a single value for all, or
            ``None`` to leave them unpruned. The default is Table 1's 20%/20%/10% (3 FC layers).
        conv: rates of the convolutional layers, likewise (Table 1: 5%/10%). Ignored when the
            model has no convolution.
        rates: explicit ``{key: rate}`` overriding the above (a key may also name a layer that
            :func:`prunable_layers` does not list, e.g. an embedding, if ``source`` has it).

    Returns:
        ``{key: rate}`` for every layer with a rate (rate 0 layers included).

    Raises:
        ConfigError: a rate outside ``[0, 1)`` (naming the layer), a sequence whose length
            matches neither 1 nor the number of layers, or an explicit key the model lacks.
    """
    if isinstance(source, (nn.Module, Mapping)):
        layers = prunable_layers(source)
        if isinstance(source, nn.Module):
            known = {k for k, _ in source.named_parameters()}
        else:
            known = set(source)
    else:
        layers = list(source)
        known = {l.key for l in layers}
    out = _spread(fc, [l for l in layers if l.kind == "fc"], "fc")
    out.update(_spread(conv, [l for l in layers if l.kind == "conv"], "conv"))
    for key, rate in (rates or {}).items():
        if key not in known:
            raise ConfigError(f"`rates` names layer {key!r}, which the model does not have; prunable layers: {[l.key for l in layers]}")
        out[key] = check_rate(rate, key)
    order = {l.key: i for i, l in enumerate(layers)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


# --------------------------------------------------------------------------------------------
# level arithmetic
# --------------------------------------------------------------------------------------------


def prune_count(remaining: int, rate: float) -> int:
    """How many of ``remaining`` weights one level at ``rate`` removes: ``floor(rate*remaining + 0.5)``."""
    return int(math.floor(rate * remaining + 0.5))


def kept_after_levels(numel: int, rate: float, levels: int, *, start: int | None = None) -> list[int]:
    """Weights kept after each of ``levels`` steps, starting from ``start`` (default ``numel``) kept.

    Returns ``[kept after step 1, ..., kept after step levels]`` (may reach 0: see :func:`check_levels`).
    """
    kept = numel if start is None else int(start)
    out = []
    for _ in range(int(levels)):
        kept -= prune_count(kept, rate)
        out.append(kept)
    return out


def check_levels(shapes: Shapes, rates: Mapping[str, float], levels: int, *, start_level: int = 0, kept: Mapping[str, int] | None = None) -> None:
    """Raise unless pruning from ``start_level`` up to ``levels`` keeps a weight in every layer.

    Args:
        shapes: layer shapes (``{key: shape or tensor}``).
        rates: ``{key: rate}``.
        levels: the target level.
        start_level: the level the layers are at now.
        kept: weights kept now per key (default: all of them).

    Raises:
        ConfigError: naming the first layer that would lose every weight, and the level.
    """
    for key, rate in rates.items():
        check_rate(rate, key)
        if key not in shapes:
            raise ConfigError(f"pruning rate given for layer {key!r}, which the model does not have")
        numel = math.prod(_shape(shapes[key]))
        now = numel if kept is None or key not in kept else int(kept[key])
        for i, k in enumerate(kept_after_levels(numel, rate, levels - start_level, start=now)):
            if k <= 0:
                raise ConfigError(
                    f"pruning level {start_level + i + 1} would remove every weight of layer {key!r} "
                    f"({numel} weights, rate {rate:g} per level). HINT: lower the target level or that layer's rate"
                )


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(v) for v in value)


# --------------------------------------------------------------------------------------------
# the mask set
# --------------------------------------------------------------------------------------------


def _runs(flat: torch.Tensor) -> list[int]:
    """``[start, length, ...]`` runs of True in a 1-D bool tensor."""
    if flat.numel() == 0:
        return []
    x = flat.to(torch.int8)
    d = torch.diff(x, prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8))
    starts = (d == 1).nonzero().flatten()
    ends = (d == -1).nonzero().flatten()
    return torch.stack([starts, ends - starts], dim=1).flatten().tolist()


@dataclass(frozen=True)
class MaskSet:
    """The masks of a model's prunable layers at one pruning level.

    Attributes:
        masks: ``{state_dict key: bool tensor}``, ``True`` = kept. Keys absent are unpruned.
        level: how many levels of pruning produced them.
    """

    masks: dict[str, torch.Tensor]
    level: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int) or self.level < 0:
            raise ConfigError(f"mask level must be an int >= 0, got {self.level!r}")
        for key, m in self.masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise ConfigError(f"mask of layer {key!r} must be a bool tensor, got {getattr(m, 'dtype', type(m).__name__)}")
            if not bool(m.any()):
                raise ConfigError(f"mask of layer {key!r} removes every weight of the layer")

    # ---------------------------------------------------------------- construction
    @classmethod
    def full(cls, shapes: Shapes) -> MaskSet:
        """Level-0 masks keeping every weight of the given layers."""
        return cls({k: torch.ones(_shape(s), dtype=torch.bool) for k, s in shapes.items()}, 0)

    # ---------------------------------------------------------------- queries
    def keys(self) -> list[str]:
        return list(self.masks)

    def num_kept(self, key: str | None = None) -> int:
        """Kept weights of one layer, or of all masked layers."""
        if key is not None:
            return int(self.masks[key].sum())
        return sum(int(m.sum()) for m in self.masks.values())

    def num_total(self, key: str | None = None) -> int:
        if key is not None:
            return self.masks[key].numel()
        return sum(m.numel() for m in self.masks.values())

    def density(self, key: str | None = None) -> float:
        """Kept fraction of one layer, or of all masked layers together."""
        total = self.num_total(key)
        return self.num_kept(key) / total if total else 1.0

    def kept_counts(self) -> dict[str, int]:
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def equal(self, other: MaskSet) -> bool:
        """Same keys, level and masks."""
        return (
            self.level == other.level
            and list(self.masks) == list(other.masks)
            and all(torch.equal(m, other.masks[k]) for k, m in self.masks.items())
        )

    # ---------------------------------------------------------------- checks
    def validate(self, shapes: Shapes) -> None:
        """Check every mask against the model's tensor shapes.

        Raises:
            ConfigError: a masked layer the model lacks, or a shape mismatch (naming the layer).
        """
        for key, m in self.masks.items():
            if key not in shapes:
                raise ConfigError(f"mask names layer {key!r}, which the model does not have")
            want = _shape(shapes[key])
            if tuple(m.shape) != want:
                raise ConfigError(f"mask of layer {key!r} has shape {tuple(m.shape)}, the model's weight has shape {want}")

    # ---------------------------------------------------------------- applying
    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new state with pruned positions zeroed (other tensors are the same objects)."""
        return apply_masks(state, self)

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """Plain JSON: ``{"format", "level", "layers": {key: {"shape", "kept", "runs"}}}``.

        ``runs`` lists ``start, length`` pairs of kept flat (row-major) indices.
        """
        return {
            "format": MASKS_FORMAT,
            "level": self.level,
            "layers": {
                k: {"shape": list(m.shape), "kept": int(m.sum()), "runs": _runs(m.flatten())} for k, m in self.masks.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> MaskSet:
        """Rebuild from :meth:`to_json` output.

        Raises:
            ConfigError: on anything malformed, naming the layer.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"masks must be a JSON object, got {type(data).__name__}")
        if data.get("format") != MASKS_FORMAT:
            raise ConfigError(f"masks format {data.get('format')!r} is not supported (expected {MASKS_FORMAT})")
        level = data.get("level")
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise ConfigError(f"masks `level` must be an int >= 0, got {level!r}")
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise ConfigError("masks lack the `layers` object")
        masks: dict[str, torch.Tensor] = {}
        for key, entry in layers.items():
            masks[str(key)] = _mask_from_json(str(key), entry)
        return cls(masks, level)


def _mask_from_json(key: str, entry: Any) -> torch.Tensor:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"mask of layer {key!r} must be an object with shape, kept and runs")
    shape, kept, runs = entry.get("shape"), entry.get("kept"), entry.get("runs")
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ConfigError(f"mask of layer {key!r}: `shape` must be a list of positive ints, got {shape!r}")
    if not isinstance(runs, list) or len(runs) % 2 or not all(isinstance(r, int) and not isinstance(r, bool) for r in runs):
        raise ConfigError(f"mask of layer {key!r}: `runs` must be a list of int start/length pairs")
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.bool)
    prev_end = -1
    total = 0
    for i in range(0, len(runs), 2):
        start, length = runs[i], runs[i + 1]
        if length < 1 or start <= prev_end or start + length > numel:
            raise ConfigError(
                f"mask of layer {key!r}: run {i // 2} (start {start}, length {length}) overlaps, touches the previous "
                f"run, is empty or leaves the layer's {numel} weights"
            )
        flat[start : start + length] = True
        prev_end = start + length
        total += length
    if kept != total:
        raise ConfigError(f"mask of layer {key!r}: `kept` is {kept!r} but the runs keep {total} weights")
    return flat.reshape(shape)


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------


def _start_masks(shapes: Shapes, rates: Mapping[str, float], masks: MaskSet | None) -> tuple[dict[str, torch.Tensor], int]:
    out: dict[str, torch.Tensor] = {}
    if masks is not None:
        masks.validate(shapes)
        out = {k: m.clone() for k, m in masks.masks.items()}
    for key in rates:
        if key not in shapes:
            raise ConfigError(f"pruning rate given for layer {key!r}, which the model does not have")
        if key not in out:
            out[key] = torch.ones(_shape(shapes[key]), dtype=torch.bool)
    return out, (masks.level if masks is not None else 0)


def _prune_layer(key: str, mask: torch.Tensor, scores: torch.Tensor | None, rate: float, level: int, gen: torch.Generator | None) -> torch.Tensor:
    flat = mask.flatten().clone()
    kept_idx = flat.nonzero().flatten()
    n = prune_count(kept_idx.numel(), rate)
    if n == 0:
        return flat.reshape(mask.shape)
    if n >= kept_idx.numel():
        raise ConfigError(
            f"pruning level {level} would remove every weight of layer {key!r} ({kept_idx.numel()} weights left, "
            f"rate {rate:g} per level). HINT: lower the target level or that layer's rate"
        )
    if scores is None:
        order = torch.randperm(kept_idx.numel(), generator=gen)
    else:
        order = torch.sort(scores.flatten()[kept_idx], stable=True).indices
    flat[kept_idx[order[:n]]] = False
    return flat.reshape(mask.shape)


def magnitude_prune(
    weights: Mapping[str, torch.Tensor],
    rates: Mapping[str, float],
    *,
    masks: MaskSet | None = None,
    levels: int = 1,
) -> MaskSet:
    """Prune ``levels`` more levels by magnitude: the smallest ``|w|`` among the kept weights go.

    Args:
        weights: the current weights (a state dict); only the keys in ``rates`` are read.
        rates: ``{key: rate}`` (see :func:`layer_rates`).
        masks: the masks to prune further (default: nothing pruned yet, level 0).
        levels: how many levels to add (several levels on unchanged weights equal keeping the
            largest ``kept_after_levels`` weights).

    Returns:
        The new :class:`MaskSet` at ``masks.level + levels``.

    Raises:
        ConfigError: a rate outside ``[0, 1)``, a layer the weights lack, a mask of the wrong
            shape, non-finite weights, or a level that would remove a whole layer (all naming
            the layer).
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ConfigError(f"`levels` must be an int >= 0, got {levels!r}")
    out, level = _start_masks(weights, rates, masks)
    for key, rate in rates.items():
        check_rate(rate, key)
        w = weights[key].detach()
        if not bool(torch.isfinite(w).all()):
            raise ConfigError(f"weights of layer {key!r} hold NaN or infinite values; cannot prune by magnitude")
        scores = w.abs().to(torch.float64)
        for step in range(levels):
            out[key] = _prune_layer(key, out[key], scores, rate, level + step + 1, None)
    return MaskSet(out, level + levels)


def init_prune(init_state: Mapping[str, torch.Tensor], rates: Mapping[str, float], level: int) -> MaskSet:
    """Initialization-based (sample-less) pruning: magnitude pruning of the untrained weights to ``level``."""
    return magnitude_prune(init_state, rates, levels=level)


def random_prune(
    shapes: Shapes,
    rates: Mapping[str, float],
    *,
    seed: int,
    masks: MaskSet | None = None,
    levels: int = 1,
) -> MaskSet:
    """Random (sample-less) pruning: each level removes ``round(rate * kept)`` kept weights at random.

    The draws depend only on ``seed`` and the layer order of ``rates``.

    Raises:
        ConfigError: as :func:`magnitude_prune`.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ConfigError(f"`levels` must be an int >= 0, got {levels!r}")
    out, level = _start_masks(shapes, rates, masks)
    gen = torch.Generator().manual_seed(int(seed))
    for key, rate in rates.items():
        check_rate(rate, key)
        for step in range(levels):
            out[key] = _prune_layer(key, out[key], None, rate, level + step + 1, gen)
    return MaskSet(out, level + levels)


# --------------------------------------------------------------------------------------------
# using masks
# --------------------------------------------------------------------------------------------


def apply_masks(state: Mapping[str, torch.Tensor], masks: MaskSet) -> dict[str, torch.Tensor]:
    """A new state whose masked tensors have their pruned positions set to exactly 0.

    Raises:
        ConfigError: a mask whose layer is missing from ``state`` or has another shape.
    """
    masks.validate(state)
    return {k: (v * masks.masks[k].to(v.dtype)) if k in masks.masks else v for k, v in state.items()}


def apply_masks_(tensors: Mapping[str, torch.Tensor], masks: MaskSet | Mapping[str, torch.Tensor]) -> None:
    """Zero pruned positions in place (e.g. a module's parameters from ``state_dict(keep_vars=True)``)."""
    mm = masks.masks if isinstance(masks, MaskSet) else masks
    with torch.no_grad():
        for key, m in mm.items():
            t = tensors[key]
            t.mul_(m.to(t.dtype))


def masked_weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    masks: MaskSet,
    *,
    keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """FedAvg over unpruned positions only: the weighted mean of each kept weight; pruned stay 0.

    All clients train the same mask, so averaging kept positions is the plain weighted mean
    there, and pruned positions are set to exactly zero whatever the clients sent.
    """
    avg = weighted_average(states, weights, keys=keys)
    return apply_masks(avg, masks)


def reinitialize(init_state: Mapping[str, torch.Tensor], masks: MaskSet, *, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Reset to the initial values (the "winning ticket" reset): ``init_state`` with pruned positions 0.

    Args:
        init_state: the model's values at initialization.
        masks: the current masks.
        keys: the keys to return (default: all of ``init_state``).
    """
    names = list(keys) if keys is not None else list(init_state)
    missing = [k for k in names if k not in init_state]
    if missing:
        raise ConfigError(f"the initial state lacks {missing[:5]}: cannot reinitialize those tensors")
    return apply_masks({k: init_state[k].clone() for k in names}, masks)


def remaining_fraction(state: Mapping[str, torch.Tensor], masks: MaskSet, *, keys: Iterable[str] | None = None) -> float:
    """Fraction of the parameters left (unmasked tensors such as biases count in full).

    This is the "% of params" of the paper's tables (e.g. 1.35% at level 20 for LeNet-300-100).
    """
    names = list(keys) if keys is not None else [k for k, v in state.items() if v.is_floating_point()]
    total = sum(state[k].numel() for k in names)
    kept = sum(masks.num_kept(k) if k in masks.masks else state[k].numel() for k in names)
    return kept / total if total else 1.0


def pruned_linear_macs(module: nn.Module, masks: MaskSet) -> int:
    """Multiply-accumulates per example that sparse FC compute saves: the pruned ``nn.Linear`` weights.

    A dense FC layer does one MAC per weight per example; a sparse one only per kept weight.
    (Convolutions are masked, not computed sparsely, as in the paper, so they save nothing.)
    """
    saved = 0
    for layer in prunable_layers(module):
        if layer.kind == "fc" and layer.key in masks.masks:
            saved += masks.num_total(layer.key) - masks.num_kept(layer.key)
    return saved
