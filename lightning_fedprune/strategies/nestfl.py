"""NestFL (Zhou, Jia, Xie): progressive pruning into nested sub-networks, partition-wise aggregation.

Every round:

1. **Resource-driven rates.** Each participant's pruning rate comes from its resources this round
   (:func:`~lightning_fedprune.core.nested.choose_rate`): the smallest rate of ``rate_grid`` whose
   estimated round time fits ``round_budget_s`` and whose memory fits the device. The estimate of
   a sub-model at rate ``r`` with kept parameter fraction ``q(r)``::

       seconds(r) = q(r) * flops_per_step * local_steps / speed + q(r) * model_bytes * (1/down + 1/up)
       memory(r)  = q(r) * model_bytes * memory_factor

   ``flops_per_step`` defaults to ``6 * parameters * batch_size`` (forward + backward of every
   weight once per example), ``model_bytes`` to the float32 size of the model. Resources are the
   devices' declared profiles (``devices``), with per-round bandwidth fluctuation
   (``bandwidth_sigma``, :func:`~lightning_fedprune.core.devices.fluctuate_bandwidth`); a device's
   memory is ``DeviceProfile.memory_bytes`` (``None``: unlimited). ``round_budget_s`` defaults to
   the median over the devices of the FULL model's estimated time, so the slower half prunes. When
   no rate of the grid fits, ``infeasible="smallest"`` (default) takes the grid's largest rate (the
   smallest model) and ``"error"`` refuses naming the client. ``fixed_rates`` (client -> rate) is
   the ablation: a fixed per-device table.
2. **Progressive pruning** of the global model into nested sub-networks
   (:func:`~lightning_fedprune.core.nested.progressive_plans`): rates ascending, each step pruning
   the previous sub-model further with absolute keep counts. Tasks carry the sub-model's tensors
   and its kept channels (``config["kept"]``), so a client can line its personalized weights up.
3. **Local training**: ``local_steps`` SGD steps (``t``) on the received sub-model.
4. **Partition-wise aggregation** from the smallest sub-network outward
   (:func:`~lightning_fedprune.core.nested.partition_aggregate`), each partition weighted by the
   angle between a client's update and the partition's aggregate update (``weighting="angle"``,
   FedAdp's Gompertz mapping with ``alpha``) or by samples only (``weighting="samples"``, the
   ablation).

Choices where the paper is silent (named options):

* **Angle smoothing** (``smoothing="client"``): FedAdp's running mean per client over the rounds
  it took part in; within a round, a partition's instantaneous angle is averaged with the client's
  running mean (as if it were the next observation), and after the round the running mean takes
  the mean of the client's partition angles. ``smoothing="none"`` uses the instantaneous angle.
* **The aggregate update** of a partition is the sample-weighted mean of the sharing clients'
  updates on it.
* **Stale results** (async rounds): results are aggregated per issue round, oldest first, each
  group against the current global model.

Personalization: each client keeps its trained sub-network as its personalized model (client
callback ``"personalized"``, :class:`~lightning_fedprune.callbacks.personal.PersonalizedModel`):
stored in its persistent state, checkpointed, never sent. The client runtime evaluates the trained
sub-network on the client's local test split, reported per round as ``local_acc_mean/min/max``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.devices import DeviceProfile, fluctuate_bandwidth
from lightning_fedprune.core.messages import ClientFailure, ClientResult
from lightning_fedprune.core.nested import (
    angle_weights,
    choose_rate,
    keep_counts,
    partition_aggregate,
    progressive_plans,
    update_angle,
)
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.base import ModelSpec
from lightning_fedprune.strategies.fedmp import SubModelStrategy
from lightning_fedprune.strategies.registry import register_strategy

log = logging.getLogger(__name__)

__all__ = ["NestFL", "WEIGHTINGS", "SMOOTHINGS"]

WEIGHTINGS = ("angle", "samples")
SMOOTHINGS = ("client", "none")
INFEASIBLE = ("smallest", "error")


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ConfigError(f"`{name}` must be a pruning rate in [0, 1), got {value!r}")
    return float(value)


@register_strategy("nestfl")
class NestFL(SubModelStrategy):
    """NestFL's server (see the module docstring).

    Args:
        rate_grid: candidate pruning rates.
        round_budget_s: the round-time budget (``None``: the devices' median full-model time).
        devices: the devices' declared profiles, one per client (a recipe passes them).
        bandwidth_sigma: per-round bandwidth fluctuation of the resources.
        fixed_rates: client id -> rate, instead of resource-driven rates (clients not listed: 0).
        infeasible: ``"smallest"`` or ``"error"`` when no rate fits a device.
        weighting: ``"angle"`` (FedAdp) or ``"samples"``.
        alpha: the Gompertz mapping's ``α`` (FedAdp: 5).
        smoothing: ``"client"`` or ``"none"``.
        batch_size: examples per local step, for the time estimate.
        flops_per_step: training FLOPs of one local step of the full model (default
            ``6 * parameters * batch_size``).
        memory_factor: training memory per model byte (weights, gradients, optimizer state and
            activations; default 4).
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options (``local_steps`` is ``t``).

    Raises:
        ConfigError: a rate outside ``[0, 1)``, an empty grid, an unknown choice, a negative budget.
    """

    client_callbacks = ("personalized",)

    def __init__(
        self,
        *,
        rate_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
        round_budget_s: float | None = None,
        devices: Sequence[DeviceProfile] | None = None,
        bandwidth_sigma: float = 0.0,
        fixed_rates: Mapping[int, float] | None = None,
        infeasible: str = "smallest",
        weighting: str = "angle",
        alpha: float = 5.0,
        smoothing: str = "client",
        batch_size: int = 32,
        flops_per_step: float | None = None,
        memory_factor: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation="r2sp", send_kept=True, **kwargs)
        grid = [_rate(f"rate_grid[{i}]", r) for i, r in enumerate(rate_grid)]
        if not grid:
            raise ConfigError("`rate_grid` needs at least one rate")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"`weighting` can be {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if smoothing not in SMOOTHINGS:
            raise ConfigError(f"`smoothing` can be {', '.join(SMOOTHINGS)}, got {smoothing!r}")
        if infeasible not in INFEASIBLE:
            raise ConfigError(f"`infeasible` can be {', '.join(INFEASIBLE)}, got {infeasible!r}")
        if round_budget_s is not None and not (math.isfinite(round_budget_s) and round_budget_s > 0):
            raise ConfigError(f"`round_budget_s` must be null or a number of seconds > 0, got {round_budget_s!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"`alpha` must be a number > 0, got {alpha!r}")
        if batch_size < 1 or memory_factor <= 0 or (flops_per_step is not None and flops_per_step <= 0):
            raise ConfigError("`batch_size`, `memory_factor` and `flops_per_step` must be positive")
        self.rate_grid = sorted(set(grid))
        self.round_budget_s = round_budget_s
        self.devices = list(devices) if devices is not None else None
        self.bandwidth_sigma = float(bandwidth_sigma)
        self.fixed_rates = {int(c): _rate(f"fixed_rates[{c}]", r) for c, r in fixed_rates.items()} if fixed_rates is not None else None
        if self.fixed_rates is None and self.devices is None:
            raise ConfigError(
                "NestFL picks rates from the devices' resources: give `devices` (a recipe passes its device profiles) "
                "or `fixed_rates` (a fixed per-device table)"
            )
        self.infeasible = infeasible
        self.weighting = weighting
        self.alpha = float(alpha)
        self.smoothing = smoothing
        self.batch_size = int(batch_size)
        self.flops_per_step = flops_per_step
        self.memory_factor = float(memory_factor)
        self._kept_fraction: dict[float, float] = {}
        self._angle_mean: dict[int, float] = {}
        self._angle_count: dict[int, int] = {}
        self._budget: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        super().initialize(spec, num_clients=num_clients)
        if self.devices is not None and len(self.devices) != num_clients:
            raise ConfigError(f"NestFL got {len(self.devices)} device profiles for {num_clients} clients")
        state = self.global_state
        self._model_bytes = float(sum(v.numel() * 4 for v in state.values() if v.is_floating_point()))
        params = sum(state[k].numel() for k in self._trainable)
        self._flops = float(self.flops_per_step) if self.flops_per_step is not None else 6.0 * params * self.batch_size
        self._kept_fraction = {
            r: self.planner.plan_from_keep(state, keep_counts(self.planner, r)).kept_fraction() for r in self.rate_grid
        }

    # ------------------------------------------------------------------ rates
    def _steps(self, rnd: int, client_id: int) -> float:
        work = self.local_work(rnd, client_id)
        return float(work["local_steps"] if work["local_steps"] is not None else work["local_epochs"] * 10)

    def _seconds(self, dev: DeviceProfile, rate: float, steps: float) -> float:
        q = self._kept_fraction[rate]
        bytes_ = q * self._model_bytes
        return q * self._flops * steps / dev.flops_per_second + bytes_ / dev.downlink_bytes_per_second + bytes_ / dev.uplink_bytes_per_second

    def round_budget(self) -> float:
        """The round-time budget (given, or the devices' median full-model time)."""
        if self.round_budget_s is not None:
            return self.round_budget_s
        if self._budget is None:
            assert self.devices is not None
            full = min(self.rate_grid)
            self._budget = statistics.median(self._seconds(d, full, self._steps(0, c)) for c, d in enumerate(self.devices))
        return self._budget

    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        if self.fixed_rates is not None:
            return {c: self.fixed_rates.get(c, 0.0) for c in clients}
        assert self.devices is not None
        devs = fluctuate_bandwidth(self.devices, rnd, seed=self.seed, sigma=self.bandwidth_sigma)
        budget = self.round_budget()
        out = {}
        for c in clients:
            if not 0 <= c < len(devs):
                raise ConfigError(f"NestFL has no resources for client {c} (devices for clients 0..{len(devs) - 1})")
            dev, steps = devs[c], self._steps(rnd, c)
            mem = getattr(dev, "memory_bytes", None)
            rate = choose_rate(
                self.rate_grid, seconds=lambda r: self._seconds(dev, r, steps),
                memory=lambda r: self._kept_fraction[r] * self._model_bytes * self.memory_factor, budget_s=budget, memory_limit=mem,
            )
            if rate is None:
                if self.infeasible == "error":
                    raise ConfigError(
                        f"no rate of {self.rate_grid} fits client {c} in round {rnd} (budget {budget:.3g} s, memory {mem}); "
                        "HINT: add larger rates to `rate_grid`, raise `round_budget_s`, or set infeasible: smallest"
                    )
                rate = max(self.rate_grid)
            out[c] = rate
        return out

    # ------------------------------------------------------------------ round
    def round_plans(self, state: Mapping[str, torch.Tensor], ratios: Mapping[int, float]) -> dict[int, Any]:
        """Progressive pruning: one nested plan per distinct rate (see the module docstring)."""
        plans = progressive_plans(self.planner, state, list(ratios.values()))
        return {cid: plans[r] for cid, r in ratios.items()}

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        self.drop_failed(failures)
        if not results:
            return {"num_results": 0.0}
        kept = [p.kept_fraction() for p in self.plans_of(results)]
        state = self.global_state
        angles: dict[int, list[float]] = {}
        num_partitions = 0
        for issued in sorted({r.round for r in results}):
            group = [r for r in results if r.round == issued]
            plans = [self._plans[(r.round, r.client_id)] for r in group]
            trained = [p.recover(r.weights, base=state) for p, r in zip(plans, group)]  # checked before anything changes
            samples = [float(r.metrics.num_samples) if self.weighted else 1.0 for r in group]

            def weights(level: int, sharing: Sequence[int], updates: dict[int, torch.Tensor]) -> list[float]:
                if self.weighting == "samples" or len(sharing) == 1:
                    return [samples[i] for i in sharing]
                total = sum(samples[i] for i in sharing)
                agg = sum(samples[i] * updates[i] for i in sharing) / total
                thetas = []
                for i in sharing:
                    theta = update_angle(updates[i], agg)
                    angles.setdefault(group[i].client_id, []).append(theta)
                    thetas.append(self._smoothed(group[i].client_id, theta))
                return angle_weights([samples[i] for i in sharing], thetas, self.alpha)

            state, sharing = partition_aggregate(state, trained, plans, weights)
            num_partitions += len(sharing)
        for r in results:
            del self._plans[(r.round, r.client_id)]
        self._global = state
        for c, ths in angles.items():
            n = self._angle_count.get(c, 0)
            self._angle_mean[c] = (self._angle_mean.get(c, 0.0) * n + sum(ths) / len(ths)) / (n + 1)
            self._angle_count[c] = n + 1
        out = {
            "num_results": float(len(results)),
            "num_partitions": float(num_partitions),
            "kept_fraction_mean": sum(kept) / len(kept),
            "kept_fraction_min": min(kept),
        }
        if angles:
            out["angle_mean"] = sum(sum(v) / len(v) for v in angles.values()) / len(angles)
        return out

    def _smoothed(self, client_id: int, theta: float) -> float:
        if self.smoothing == "none":
            return theta
        n = self._angle_count.get(client_id, 0)
        return (self._angle_mean.get(client_id, 0.0) * n + theta) / (n + 1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["angles"] = {str(c): [self._angle_mean[c], self._angle_count[c]] for c in sorted(self._angle_mean)}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._angle_mean = {int(c): float(v[0]) for c, v in state.get("angles", {}).items()}
        self._angle_count = {int(c): int(v[1]) for c, v in state.get("angles", {}).items()}

    def __repr__(self) -> str:
        how = "fixed" if self.fixed_rates is not None else "resources"
        return f"NestFL(rates={how}, weighting={self.weighting!r})"
