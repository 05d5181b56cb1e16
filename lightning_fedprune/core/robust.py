"""Robust aggregation rules as plain functions (tensors in, tensors out).

* :func:`clip_update`: scale an update ``w - w0`` down to an L2 norm of at most ``max_norm``
  (over all floating-point tensors together); integer tensors are left as they are.
* :func:`coordinate_median`: the element-wise median of several models (for an even count, the
  mean of the two middle values).
* :func:`trimmed_mean`: the element-wise mean after dropping the ``k`` largest and ``k`` smallest
  values of every position (``k = floor(trim * n)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lightning_fedprune.errors import ConfigError

__all__ = ["clip_update", "coordinate_median", "trimmed_mean", "update_norm"]

State = Mapping[str, torch.Tensor]


def update_norm(new: State, old: State) -> float:
    """The L2 norm of ``new - old`` over every floating-point tensor."""
    total = 0.0
    for k, v in new.items():
        if v.is_floating_point():
            total += float(((v.double() - old[k].double()) ** 2).sum())
    return math.sqrt(total)


def clip_update(new: State, old: State, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``old + (new - old) * min(1, max_norm / ||new - old||)`` and the update's norm before clipping."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"`max_norm` must be a number > 0, got {max_norm!r}")
    norm = update_norm(new, old)
    if norm <= max_norm:
        return dict(new), norm
    scale = max_norm / norm
    out = {}
    for k, v in new.items():
        out[k] = (old[k].double() + (v.double() - old[k].double()) * scale).to(v.dtype) if v.is_floating_point() else v
    return out, norm


def _stack(states: Sequence[State], key: str) -> torch.Tensor:
    shapes = {tuple(s[key].shape) for s in states}
    if len(shapes) > 1:
        raise ConfigError(f"robust aggregation needs tensors of one shape per key; {key!r} comes in shapes {sorted(shapes)}")
    return torch.stack([s[key].double() for s in states])


def coordinate_median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The element-wise median (mean of the two middle values for an even count)."""
    if not states:
        raise ConfigError("the median of no model is undefined")
    out = {}
    for k, v in states[0].items():
        x = torch.sort(_stack(states, k), dim=0).values
        n = x.shape[0]
        med = x[n // 2] if n % 2 else (x[n // 2 - 1] + x[n // 2]) / 2
        out[k] = med.to(v.dtype) if v.is_floating_point() else med.round().to(v.dtype)
    return out


def trimmed_mean(states: Sequence[State], trim: float) -> dict[str, torch.Tensor]:
    """The element-wise mean without the ``floor(trim * n)`` largest and smallest values.

    Raises:
        ConfigError: ``trim`` outside ``[0, 0.5)`` or nothing left to average.
    """
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"`trim` must be in [0, 0.5), got {trim!r}")
    n = len(states)
    k = int(math.floor(trim * n))
    if n - 2 * k < 1:
        raise ConfigError(f"trimming {k} of each end of {n} models leaves nothing to average")
    out = {}
    for key, v in states[0].items():
        x = torch.sort(_stack(states, key), dim=0).values[k:n - k].mean(0)
        out[key] = x.to(v.dtype) if v.is_floating_point() else x.round().to(v.dtype)
    return out
