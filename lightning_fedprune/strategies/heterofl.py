"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): width-sliced nested sub-models, count-weighted overlaps.

Each client trains the global model sliced to the FIRST channels of every prunable group (a
fraction ``1 - rate`` of them, absolute keep counts as in
:func:`~lightning_fedprune.core.nested.keep_counts`), so smaller sub-models are nested in larger
ones. Aggregation averages every position over the clients whose sub-models hold it
(:func:`~lightning_fedprune.core.aggregation.overlap_average`); by default each client counts once
(HeteroFL's count-weighted averaging; ``weighted=True`` weighs by samples). Positions no client
held keep their values.

Rate assignment (``assignment``):

* ``"fix"``: client ``c`` always trains at ``rates[c]`` (or, with ``level_proportions``, clients
  are split into the levels in those proportions, in client-id order, once);
* ``"dynamic"``: every round each client draws a level with ``level_proportions`` (seeded by
  ``(seed, "heterofl", round, client)``).

``levels`` default to HeteroFL's widths 1, 1/2, 1/4, 1/8, 1/16 (rates 0, .5, .75, .875, .9375).

The **scaler** (client callback ``"heterofl_scaler"``,
:class:`~lightning_fedprune.callbacks.heterofl.HeteroFLScaler`) divides every hidden
convolution's and linear layer's output by the kept fraction ``1 - rate`` while training, as
HeteroFL does, and not at evaluation. **Static BN**: clients train BatchNorm with the batch's
statistics without tracking running statistics (``static_bn=True``), so the global running
statistics are not averaged from sub-models of different widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_fedprune.core.aggregation import overlap_average
from lightning_fedprune.core.messages import ClientFailure, ClientResult
from lightning_fedprune.core.nested import keep_counts
from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.fedmp import SubModelStrategy
from lightning_fedprune.strategies.registry import register_strategy

__all__ = ["HeteroFL", "ASSIGNMENTS", "HETEROFL_LEVELS"]

ASSIGNMENTS = ("fix", "dynamic")
#: HeteroFL's model widths 1, 1/2, 1/4, 1/8, 1/16 as pruning rates
HETEROFL_LEVELS = (0.0, 0.5, 0.75, 0.875, 0.9375)
STATIC_BN = "heterofl_static_bn"


@register_strategy("heterofl")
class HeteroFL(SubModelStrategy):
    """HeteroFL's server (see the module docstring).

    Args:
        assignment: ``"fix"`` or ``"dynamic"``.
        rates: ``"fix"``: client id -> pruning rate (clients not listed: 0).
        levels: the pruning rates of the levels.
        level_proportions: the share of clients (``"fix"``) or the probability (``"dynamic"``)
            of each level (default: equal).
        static_bn: clients do not track BatchNorm running statistics.
        weighted: weigh clients by samples (default: each client counts once).
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options.

    Raises:
        ConfigError: an unknown assignment, rates outside ``[0, 1)``, proportions that do not fit.
    """

    client_callbacks = ("heterofl_scaler",)

    def __init__(
        self,
        *,
        assignment: str = "fix",
        rates: Mapping[int, float] | None = None,
        levels: tuple[float, ...] = HETEROFL_LEVELS,
        level_proportions: tuple[float, ...] | None = None,
        static_bn: bool = True,
        weighted: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation="r2sp", send_kept=True, weighted=weighted, **kwargs)
        if assignment not in ASSIGNMENTS:
            raise ConfigError(f"`assignment` can be {', '.join(ASSIGNMENTS)}, got {assignment!r}")
        for i, r in enumerate(levels):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise ConfigError(f"`levels[{i}]` must be a pruning rate in [0, 1), got {r!r}")
        if not levels:
            raise ConfigError("`levels` needs at least one rate")
        props = tuple(level_proportions) if level_proportions is not None else (1.0,) * len(levels)
        if len(props) != len(levels) or any(not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 0) for p in props) or sum(props) <= 0:
            raise ConfigError(f"`level_proportions` must be {len(levels)} numbers >= 0 with a positive sum, got {level_proportions!r}")
        self.assignment = assignment
        self.levels = tuple(float(r) for r in levels)
        self.level_proportions = tuple(float(p) / sum(props) for p in props)
        self.rates = {int(c): float(r) for c, r in (rates or {}).items()}
        for c, r in self.rates.items():
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"`rates[{c}]` must be a pruning rate in [0, 1), got {r!r}")
        self.static_bn = bool(static_bn)
        if self.static_bn:
            self.client_callbacks = (*self.client_callbacks, STATIC_BN)

    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        if self.assignment == "dynamic":
            return {c: self.levels[int(rng_for(self.seed, "heterofl", rnd, c).choice(len(self.levels), p=self.level_proportions))] for c in clients}
        if self.rates or not self.num_clients:
            return {c: self.rates.get(c, 0.0) for c in clients}
        # split the clients into the levels by proportion, in client-id order
        bounds, acc = [], 0.0
        for p in self.level_proportions:
            acc += p
            bounds.append(acc * self.num_clients)
        return {c: self.levels[next(i for i, b in enumerate(bounds) if c < b - 1e-9)] for c in clients}

    def round_plans(self, state: Mapping[str, Any], ratios: Mapping[int, float]) -> dict[int, Any]:
        """The FIRST channels of every group, ``keep_counts`` of them (nested by construction)."""
        plans = {r: self.planner.plan_from_indices([list(range(k)) for k in keep_counts(self.planner, r)]) for r in set(ratios.values())}
        return {cid: plans[r] for cid, r in ratios.items()}

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        self.drop_failed(failures)
        if not results:
            return {"num_results": 0.0}
        plans = self.plans_of(results)
        state = self.global_state
        trained = [p.recover(r.weights, base=state) for p, r in zip(plans, results)]
        weights = [float(r.metrics.num_samples) if self.weighted else 1.0 for r in results]
        new = overlap_average(state, trained, [{k: p.mask(k) for k in state} for p in plans], weights)
        levels = {tuple(p.kept_counts) for p in plans}
        kept = [p.kept_fraction() for p in plans]
        for r in results:
            del self._plans[(r.round, r.client_id)]
        self._global = new
        return {"num_results": float(len(results)), "num_partitions": float(len(levels)), "kept_fraction_mean": sum(kept) / len(kept)}

    def __repr__(self) -> str:
        return f"HeteroFL(assignment={self.assignment!r}, levels={self.levels})"
