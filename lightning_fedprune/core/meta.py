"""Per-FedAvg's math (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020): one MAML step, plain functions.

Per-FedAvg trains the meta-objective ``F(w) = f(w - α ∇f(w))`` on each client. One local step on
three independent batches ``D``, ``D'``, ``D''``::

    w̃       = w - α ∇f(w; D)                                  (inner step)
    g       = ∇f(w̃; D')                                       (outer gradient at the adapted point)
    FO:  w ← w - β g                                          (first-order: Hessian dropped)
    HF:  w ← w - β (g - α d),  d = [∇f(w + δ g; D'') - ∇f(w - δ g; D'')] / (2δ)
                                                               (Hessian-free: d ≈ ∇²f(w; D'') g)

Here: :func:`split_batch` cuts one batch into those parts, :func:`gradients` differentiates a loss
without touching ``.grad``, :func:`hessian_vector_product` is the finite-difference product and
:func:`meta_gradient` combines them. ``β`` is the client optimizer's learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["VARIANTS", "part_sizes", "batch_size_of", "split_batch", "gradients", "hessian_vector_product", "meta_gradient"]

#: Per-FedAvg's variants: first-order and Hessian-free
VARIANTS = ("fo", "hf")


def part_sizes(batch_size: int, variant: str, inner_fraction: float | None = None) -> list[int]:
    """Sizes of ``D, D'`` (``"fo"``) or ``D, D', D''`` (``"hf"``) cut from one batch of ``batch_size``.

    ``D`` takes ``max(1, round(inner_fraction * B))`` examples (default fraction: 1/2 for FO, 1/3
    for HF); FO gives the rest to ``D'``; HF splits the rest into ``D'`` (the larger half) and
    ``D''``. A batch too small for non-empty parts (``B < 2`` for FO, ``B < 3`` for HF) is used whole
    for every part: ``[B, B]`` / ``[B, B, B]``.
    """
    parts = 2 if variant == "fo" else 3
    if batch_size < parts:
        return [batch_size] * parts
    frac = inner_fraction if inner_fraction is not None else 1.0 / parts
    inner = min(batch_size - (parts - 1), max(1, round(frac * batch_size)))
    rest = batch_size - inner
    if parts == 2:
        return [inner, rest]
    second = (rest + 1) // 2
    return [inner, second, rest - second]


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    return batch


def batch_size_of(batch: Any) -> int:
    """The number of examples of a batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 1


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Consecutive slices of ``batch`` (tensors, or tuples / lists / dicts of them, cut along the
    first dimension) of ``sizes``; when the sizes all equal the batch size, the batch itself each time."""
    n = batch_size_of(batch)
    if all(s == n for s in sizes):
        return [batch] * len(sizes)
    out, start = [], 0
    for s in sizes:
        out.append(_slice(batch, start, start + s))
        start += s
    return out


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``∂loss/∂p`` for every parameter (zeros where it does not depend on one); ``.grad`` untouched."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def hessian_vector_product(
    loss_at: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor], delta: float
) -> list[torch.Tensor]:
    """``[∇f(w + δv) − ∇f(w − δv)] / (2δ)``: the Hessian of ``loss_at`` times ``vector``, without
    second derivatives. ``loss_at()`` evaluates the loss at the parameters' current values; they
    are moved in place and restored to exactly what they were."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, w, v in zip(params, saved, vector):
                p.copy_(w + delta * v)
        plus = gradients(loss_at(), params)
        with torch.no_grad():
            for p, w, v in zip(params, saved, vector):
                p.copy_(w - delta * v)
        minus = gradients(loss_at(), params)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    return [(a - b) / (2.0 * delta) for a, b in zip(plus, minus)]


def meta_gradient(outer: Sequence[torch.Tensor], alpha: float, hvp: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per-FedAvg's update direction: ``g`` (first-order, ``hvp`` ``None``) or ``g − α·hvp`` (HF)."""
    if hvp is None:
        return [g.clone() for g in outer]
    return [g - alpha * h for g, h in zip(outer, hvp)]
