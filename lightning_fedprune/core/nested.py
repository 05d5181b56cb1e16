"""NestFL's math: nested sub-networks, partition-wise aggregation, angle-based weights, rates.

Plain functions on tensors and plans (:mod:`lightning_fedprune.core.plans`); the strategy
(:mod:`lightning_fedprune.strategies.nestfl`) only calls them.

* :func:`keep_counts` / :func:`progressive_plans`: progressive pruning. Rates are sorted ascending;
  the first plan prunes the global model, every next one prunes the previous sub-model further
  (importance recomputed on it: the previous plan's sparse model, whose pruned positions are zero,
  scores each remaining filter over its remaining inputs), keeping an ABSOLUTE number of channels
  per group, ``max(1, int(C * (1 - rate)))`` of the full model's ``C`` (rounded down to whole
  blocks such as attention heads), so nothing drifts. Every sub-network is nested in all larger ones.
* :func:`partition_aggregate`: the new global model from the smallest sub-network outward.
  Partition ``k`` holds the positions in the ``k``-th smallest sub-network but not in the next
  smaller one; it is averaged only over the clients whose sub-models contain it, with one weight
  per (client, partition); positions no client trained keep their values.
* :func:`gompertz` / :func:`angle_weights`: FedAdp's weighting (Wu & Wang, IEEE TCCN 2021): the
  angle between a client's update and the aggregate update of the clients sharing the partition,
  smoothed over rounds and mapped by ``f(θ) = α(1 − exp(−exp(−α(θ − 1))))``; weights
  ``∝ n_i · exp(f(θ̃_i))``.
* :func:`choose_rate`: the smallest rate of a grid whose estimated round time (FLOPs × local steps
  / speed + payload bytes / bandwidth) fits a budget and whose memory fits the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.errors import ConfigError

__all__ = [
    "keep_counts",
    "progressive_plans",
    "partition_levels",
    "partition_aggregate",
    "gompertz",
    "update_angle",
    "angle_weights",
    "choose_rate",
]


def keep_counts(planner: Any, rate: float) -> list[int]:
    """Absolute channels kept per group at ``rate``: ``max(1, int(C * (1 - rate)))`` of the full
    model's ``C``, in whole blocks (attention heads, GroupNorm groups)."""
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0):
        raise ConfigError(f"a pruning rate must be in [0, 1), got {rate!r}")
    out = []
    for g, size in enumerate(planner.layout.group_sizes):
        chunks, unit = planner.layout.group_units(g)
        block = chunks * unit
        out.append(max(1, int(size // block * (1 - rate))) * block)
    return out


def progressive_plans(planner: Any, state: Mapping[str, torch.Tensor], rates: Sequence[float]) -> dict[float, Any]:
    """One nested plan per distinct rate (see the module docstring): ``{rate: plan}``.

    Raises:
        ConfigError: a rate outside ``[0, 1)``.
    """
    out: dict[float, Any] = {}
    prev = None
    for rate in sorted({float(r) for r in rates}):
        counts = keep_counts(planner, rate)
        if prev is None:
            plan = planner.plan_from_keep(state, counts)
        else:
            counts = [min(k, c) for k, c in zip(counts, prev.kept_counts)]
            plan = planner.plan_from_keep(prev.sparse(state), counts, within=prev)
        out[rate] = plan
        prev = plan
    return out


def partition_levels(plans: Sequence[Any], key: str) -> torch.Tensor:
    """Per position of tensor ``key``, how many of ``plans`` (nested, any order) contain it."""
    masks = [p.mask(key) for p in plans]
    return torch.stack(masks).sum(0) if masks else torch.zeros(0)


def gompertz(theta: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """FedAdp's non-linear mapping ``α(1 − exp(−exp(−α(θ − 1))))`` of an angle in radians."""
    t = torch.as_tensor(theta, dtype=torch.float64)
    return alpha * (1.0 - torch.exp(-torch.exp(-alpha * (t - 1.0))))


def update_angle(update: torch.Tensor, aggregate: torch.Tensor) -> float:
    """The angle (radians) between two flat update vectors; 0 when either is zero."""
    u, g = update.double().reshape(-1), aggregate.double().reshape(-1)
    nu, ng = float(u.norm()), float(g.norm())
    if nu == 0.0 or ng == 0.0:
        return 0.0
    return math.acos(max(-1.0, min(1.0, float(u @ g) / (nu * ng))))


def angle_weights(samples: Sequence[float], thetas: Sequence[float], alpha: float) -> list[float]:
    """Normalized weights ``n_i · exp(f(θ_i)) / Σ_j n_j · exp(f(θ_j))``."""
    raw = [float(n) * math.exp(float(gompertz(th, alpha))) for n, th in zip(samples, thetas)]
    total = sum(raw)
    if total <= 0:
        raise ConfigError("angle weights need at least one client with samples")
    return [r / total for r in raw]


def partition_aggregate(
    global_state: Mapping[str, torch.Tensor],
    trained: Sequence[Mapping[str, torch.Tensor]],
    plans: Sequence[Any],
    weight_of: Callable[[int, Sequence[int], dict[int, torch.Tensor]], Sequence[float]],
) -> tuple[dict[str, torch.Tensor], dict[int, list[int]]]:
    """Partition-wise aggregation of nested sub-models (see the module docstring).

    Args:
        global_state: the current global model (full shapes).
        trained: per client, its trained model recovered to full shape (pruned positions equal to
            ``global_state``'s, e.g. ``plan.recover(sub, base=global_state)``).
        plans: per client, its (nested) plan.
        weight_of: ``(partition k, clients sharing it, {client: its flat update on the partition})``
            -> one weight per sharing client (normalized or not).

    Returns:
        ``(new state, {partition k: the clients sharing it})``; partition 0 is the smallest
        sub-network. Non-float tensors are averaged in float64 and rounded back.
    """
    n = len(plans)
    if n != len(trained):
        raise ConfigError(f"{len(trained)} trained models for {n} plans")
    sizes = sorted({tuple(p.kept_counts) for p in plans}, key=lambda c: sum(c))
    level_of = [sizes.index(tuple(p.kept_counts)) for p in plans]  # 0 = the smallest sub-network
    num_levels = len(sizes)
    keys = list(global_state)
    masks = {k: [p.mask(k) for p in plans] for k in keys}
    # partition id of each position: the smallest level whose sub-network contains it (-1: none)
    part: dict[str, torch.Tensor] = {}
    for k in keys:
        pid = torch.full(global_state[k].shape, -1, dtype=torch.long)
        for lvl in reversed(range(num_levels)):
            holder = next(i for i in range(n) if level_of[i] == lvl)
            pid[masks[k][holder]] = lvl
        part[k] = pid
    sharing = {lvl: [i for i in range(n) if level_of[i] >= lvl] for lvl in range(num_levels)}
    new = {k: v.clone() for k, v in global_state.items()}
    for lvl in range(num_levels):
        clients = sharing[lvl]
        updates = {
            i: torch.cat([
                (trained[i][k].double() - global_state[k].double())[part[k] == lvl].reshape(-1)
                for k in keys if global_state[k].is_floating_point()
            ] or [torch.zeros(0, dtype=torch.float64)])
            for i in clients
        }
        w = [float(x) for x in weight_of(lvl, clients, updates)]
        total = sum(w)
        if not (math.isfinite(total) and total > 0):
            raise ConfigError(f"partition {lvl}: weights must be finite with a positive sum, got {w}")
        for k in keys:
            sel = part[k] == lvl
            if not bool(sel.any()):
                continue
            acc = sum(wi * trained[i][k].double()[sel] for wi, i in zip(w, clients)) / total
            target = new[k]
            target[sel] = acc.round().to(target.dtype) if not target.is_floating_point() else acc.to(target.dtype)
    return new, sharing


def choose_rate(
    grid: Sequence[float],
    *,
    seconds: Callable[[float], float],
    memory: Callable[[float], float],
    budget_s: float,
    memory_limit: float | None,
) -> float | None:
    """The smallest rate of ``grid`` whose estimated round time fits ``budget_s`` and whose memory
    fits ``memory_limit`` (``None``: unlimited); ``None`` when no rate fits."""
    for rate in sorted(float(r) for r in grid):
        if seconds(rate) <= budget_s and (memory_limit is None or memory(rate) <= memory_limit):
            return rate
    return None
