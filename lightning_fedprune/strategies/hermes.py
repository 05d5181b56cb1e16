"""Hermes (Li, Sun, Li, Pu, Li, Chen, MobiCom 2021): personalized structured-pruned sub-networks,
only overlapping parameters averaged.

Each client owns a structured sub-network of the global model (kept channels per group, a
:class:`~lightning_fedprune.core.plans.Plan` in full-model coordinates), starting from the full
model. Every round:

1. the client receives its OWN sub-network, sliced from the global model (only the sub-network
   travels, both ways), and trains it for the round's local steps; its trained sub-network is its
   personalized model (client callback ``"personalized"``: kept in its persistent state,
   checkpointed, never sent again) and is evaluated on its local test split;
2. the server averages every position only over the clients whose sub-networks hold it
   (:func:`~lightning_fedprune.core.aggregation.overlap_average`, sample-weighted unless
   ``weighted=False``); positions nobody holds keep their values;
3. **pruning while local accuracy holds**: a client whose local accuracy (``accuracy_key`` of its
   result, the runtime's ``local_test_acc``) reaches ``accuracy_threshold`` and whose pruning rate
   is below its ``target_rate`` has its sub-network pruned by ``prune_step`` more: channels
   ranked by the L1 magnitude of the client's OWN trained sub-network
   (:meth:`~lightning_fedprune.core.plans.Planner.plan_from_keep` within its current plan, absolute
   keep counts of :func:`~lightning_fedprune.core.nested.keep_counts`), so each sub-network is
   nested in the client's earlier ones and differs from the other clients'.

Choices where the paper is silent or where this library places a step (named options):

* ``target_rate`` (default 0.5), ``prune_step`` (0.1 of the channels per pruning) and
  ``accuracy_threshold`` (0.5), as in LotteryFL, Hermes' predecessor; ``target_rates`` gives
  per-client targets.
* The pruning decision uses the accuracy the client reports for its trained sub-network on its
  local held-out split (``accuracy_key``); it is made where the plan is kept (the server holds each
  client's plan to average overlaps), from the client's own uploaded tensors and its own accuracy:
  the same computation a device would run, with the plan travelling down as data (``kept``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.aggregation import overlap_average
from lightning_fedprune.core.messages import ClientFailure, ClientResult
from lightning_fedprune.core.nested import keep_counts
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.strategies.fedmp import SubModelStrategy
from lightning_fedprune.strategies.registry import register_strategy

log = logging.getLogger(__name__)

__all__ = ["Hermes"]


def _fraction(name: str, value: Any, *, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (0.0 < value if low_open else 0.0 <= value) and value < 1.0):
        raise ConfigError(f"`{name}` must be a number in {'(0' if low_open else '[0'}, 1), got {value!r}")
    return float(value)


@register_strategy("hermes")
class Hermes(SubModelStrategy):
    """Hermes' server (see the module docstring).

    Args:
        target_rate: the pruning rate each client's sub-network stops at.
        target_rates: client id -> target rate (clients not listed: ``target_rate``).
        prune_step: how much the rate grows at each pruning.
        accuracy_threshold: the local accuracy a client needs before its sub-network is pruned further.
        accuracy_key: the result metric (``metrics.extra``) holding that accuracy.
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options.

    Raises:
        ConfigError: a rate outside ``[0, 1)``, a step outside ``(0, 1)``, a threshold outside ``[0, 1]``.
    """

    client_callbacks = ("personalized",)

    def __init__(
        self,
        *,
        target_rate: float = 0.5,
        target_rates: Mapping[int, float] | None = None,
        prune_step: float = 0.1,
        accuracy_threshold: float = 0.5,
        accuracy_key: str = "local_test_acc",
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation="r2sp", send_kept=True, **kwargs)
        self.target_rate = _fraction("target_rate", target_rate)
        self.target_rates = {int(c): _fraction(f"target_rates[{c}]", r) for c, r in (target_rates or {}).items()}
        self.prune_step = _fraction("prune_step", prune_step, low_open=True)
        if isinstance(accuracy_threshold, bool) or not isinstance(accuracy_threshold, (int, float)) or not 0.0 <= accuracy_threshold <= 1.0:
            raise ConfigError(f"`accuracy_threshold` must be a number in [0, 1], got {accuracy_threshold!r}")
        self.accuracy_threshold = float(accuracy_threshold)
        if not isinstance(accuracy_key, str) or not accuracy_key:
            raise ConfigError(f"`accuracy_key` must be a metric name, got {accuracy_key!r}")
        self.accuracy_key = accuracy_key
        self._rates: dict[int, float] = {}
        self._client_plans: dict[int, Any] = {}

    # ------------------------------------------------------------------ sub-networks
    def target_of(self, client_id: int) -> float:
        """The pruning rate client ``client_id``'s sub-network stops at."""
        return self.target_rates.get(int(client_id), self.target_rate)

    def rate_of(self, client_id: int) -> float:
        """The current pruning rate of client ``client_id``'s sub-network (0: the full model)."""
        return self._rates.get(int(client_id), 0.0)

    def client_plan(self, client_id: int) -> Any:
        """Client ``client_id``'s current sub-network (a plan; the full model until it is pruned)."""
        plan = self._client_plans.get(int(client_id))
        return plan if plan is not None else self.planner.full_plan()

    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        return {c: self.rate_of(c) for c in clients}

    def round_plans(self, state: Mapping[str, torch.Tensor], ratios: Mapping[int, float]) -> dict[int, Any]:
        """Each client's own sub-network."""
        return {cid: self.client_plan(cid) for cid in ratios}

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        self.drop_failed(failures)
        if not results:
            return {"num_results": 0.0}
        plans = self.plans_of(results)
        state = self.global_state
        # everything is checked before anything changes
        trained = []
        for p, r in zip(plans, results):
            try:
                trained.append(p.recover(r.weights, base=state))
            except (ConfigError, PayloadError) as err:
                raise PayloadError(f"result of client {r.client_id} (round {r.round}) does not fit its sub-network: {err}") from None
        accuracy = {}
        for r in results:
            acc = r.metrics.extra.get(self.accuracy_key)
            if acc is None or not math.isfinite(float(acc)):
                raise ConfigError(
                    f"Hermes prunes by local accuracy, but the result of client {r.client_id} (round {r.round}) has no "
                    f"finite metrics.extra[{self.accuracy_key!r}]; HINT: give the clients a local test split "
                    "(data.local_test_fraction) and keep local evaluation on, or set `accuracy_key`"
                )
            accuracy[r.client_id] = float(acc)
        weights = [float(r.metrics.num_samples) if self.weighted else 1.0 for r in results]
        new = overlap_average(state, trained, [{k: p.mask(k) for k in state} for p in plans], weights)
        # pruning while local accuracy holds: from the client's own trained sub-network
        new_plans, new_rates = dict(self._client_plans), dict(self._rates)
        pruned = 0
        for r, plan, own in zip(results, plans, trained):
            c = r.client_id
            if r.round != max(x.round for x in results if x.client_id == c):
                continue
            rate, target = self.rate_of(c), self.target_of(c)
            if accuracy[c] < self.accuracy_threshold or rate >= target:
                continue
            nxt = min(target, round(rate + self.prune_step, 10))
            counts = [min(k, have) for k, have in zip(keep_counts(self.planner, nxt), plan.kept_counts)]
            new_plans[c] = self.planner.plan_from_keep(plan.sparse(own), counts, within=plan)
            new_rates[c] = nxt
            pruned += 1
        kept = [p.kept_fraction() for p in plans]
        for r in results:
            del self._plans[(r.round, r.client_id)]
        self._global, self._client_plans, self._rates = new, new_plans, new_rates
        return {
            "num_results": float(len(results)),
            "num_pruned": float(pruned),
            "kept_fraction_mean": sum(kept) / len(kept),
            "kept_fraction_min": min(kept),
            "rate_mean": sum(new_rates.get(r.client_id, 0.0) for r in results) / len(results),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["client_rates"] = {str(c): r for c, r in sorted(self._rates.items())}
        out["client_plans"] = {str(c): p.to_json() for c, p in sorted(self._client_plans.items())}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        from lightning_fedprune.core.plans import Plan

        plans = {}
        for c, data in state.get("client_plans", {}).items():
            plan = Plan.from_json(data)
            if self.planner is not None:
                self.planner.check(plan)
            plans[int(c)] = plan
        self._client_plans = plans
        self._rates = {int(c): float(r) for c, r in state.get("client_rates", {}).items()}

    def __repr__(self) -> str:
        return f"Hermes(target_rate={self.target_rate}, prune_step={self.prune_step}, accuracy_threshold={self.accuracy_threshold})"
