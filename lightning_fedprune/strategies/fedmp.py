"""Structured sub-model strategies: FedMP (Jiang et al., 2023) and its baselines.

Every client gets a physically smaller copy of the global model: the same fraction of the
filters / neurons / hidden units is removed from every prunable layer (L1 importance of each filter
alone, computed on the current global model; see :mod:`lightning_fedprune.core.plans`). The task
carries the sub-model's tensors with ``config["weights_format"] = "submodel"``; the client runtime
reshapes its network to them, trains, and returns tensors of the same shapes.

Aggregation (Section III-C of the paper):

* ``"r2sp"`` (Residual Recovery Synchronous Parallel, the default): each trained sub-model is
  recovered to full shape and its residual (global minus sparse model) added back, i.e. positions
  the client did not have keep the global values; then the recovered models are averaged.
  A stale result (asynchronous rounds) takes its residual from the *current* global model, so the
  positions it did not train do not roll back what was learned since it was sent; with no
  staleness this is exactly the paper's rule.
* ``"bsp"`` (the ablation of Fig. 7): recovered without the residual (pruned positions count as
  zeros in the average).

Strategies here:

* :class:`FedMP`: per-worker ratios chosen online by E-UCB (Algorithm 1); each agent is rewarded
  from the worker's loss decrease and completion time (Eq. 8's loss decrease per unit of distance
  from the mean time, bounded and unit-free by default; the printed form as an option; a late
  worker's decision earns ``late_reward``), so it needs no knowledge of device capabilities. ``fixed_ratios`` replaces the bandit by given
  ratios (deployment tests, ablations).
* :class:`UniformPruning` (UP-FL): one ratio for all workers in a round, fixed or chosen by one
  E-UCB agent rewarded with the mean loss decrease per second of round time.
* :class:`FlexCom`: full models, per-worker top-k compressed uploads whose keep ratio follows the
  worker's uplink bandwidth.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.aggregation import weighted_average
from lightning_fedprune.core.contract import (
    KEPT,
    PROBE_LOSS,
    PRUNING_RATIO,
    SUBMODEL,
    UPLOAD_ERROR_FEEDBACK,
    UPLOAD_KEEP_RATIO,
    WEIGHTS_FORMAT,
    encode_kept_groups,
)
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, TensorSpec, tensor_spec
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.strategies.base import ModelSpec
from lightning_fedprune.strategies.fedavg import FedAvg
from lightning_fedprune.strategies.registry import register_strategy

__all__ = ["SubModelStrategy", "FedMP", "UniformPruning", "FlexCom", "AGGREGATIONS"]

#: aggregation rules of sub-model strategies
AGGREGATIONS = ("r2sp", "bsp")


def _check_ratio(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value < 1.0
    if not ok:
        raise ConfigError(f"`{name}` must be a pruning ratio in [0, 1), got {value!r}")
    return float(value)


def _delta_loss(result: ClientResult) -> float:
    """The worker's loss decrease over its local work (Eq. 8's numerator); 0 when unknown.

    Uses the paired probe (the same batch evaluated with the received and the trained weights)
    when the client reports it, else the running training losses (first vs last part).
    """
    extra = result.metrics.extra
    if "probe_loss_before" in extra and "probe_loss_after" in extra:
        d = extra["probe_loss_before"] - extra["probe_loss_after"]
    else:
        d = result.metrics.loss_before - result.metrics.loss_after
    return float(d) if math.isfinite(d) else 0.0


def _final_loss(result: ClientResult) -> float:
    """The worker's loss after its local work: the paired probe's when reported, else the running
    training loss of the last part; ``nan`` when neither is finite."""
    extra = result.metrics.extra
    v = extra["probe_loss_after"] if "probe_loss_after" in extra else result.metrics.loss_after
    return float(v) if math.isfinite(v) else math.nan


def _completion_time(result: ClientResult) -> float:
    """Seconds from dispatch to arrival as the transport measured them (CPU seconds if none did)."""
    t = result.completion_time
    return float(t) if t is not None and math.isfinite(t) else float(result.metrics.compute_seconds)


class SubModelStrategy(FedAvg):
    """FedAvg over structured sub-models: the base of FedMP and UP-FL.

    Subclasses choose each client's pruning ratio in :meth:`client_ratios` and may learn from the
    results in :meth:`observe`. Plans of tasks still in flight are kept (and checkpointed) until
    their results or failures come back, so asynchronous rounds work.

    Args:
        aggregation: ``"r2sp"`` (default) or ``"bsp"`` (see the module docstring).
        send_kept: also send each task's kept channels per group (``config["kept"]``, a few
            bytes), so a client can line its own full-size tensors up with the sub-model
            (``ClientContext.plan``).
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options (sampling, local work,
            weighting, seed).
    """

    requires_planner = True

    def __init__(self, *, aggregation: str = "r2sp", send_kept: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.send_kept = bool(send_kept)
        self.planner: Any = None
        self.bandit: Any = None  # an E-UCB bandit, checkpointed with the strategy when a subclass sets one
        self._plans: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        if spec.planner is None:
            raise ConfigError(
                f"{type(self).__name__} sends structured sub-models and needs a pruning planner: pass "
                "ModelSpec(..., planner=lightning_fedprune.runtime.build_planner(module)) (the simulation "
                "engine and the FedML server do this themselves)"
            )
        super().initialize(spec, num_clients=num_clients)
        self.planner = spec.planner

    # ------------------------------------------------------------------ ratios
    @abc.abstractmethod
    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        """The pruning ratio of each selected client this round."""

    def observe(self, rnd: int, results: Sequence[ClientResult], ratios: Mapping[int, float]) -> dict[str, float]:
        """Learn from the round's results (``ratios``: the ratio each result was trained at)."""
        return {}

    def forget(self, failures: Sequence[ClientFailure]) -> None:
        """Tasks that will never deliver (override to drop pending decisions)."""

    # ------------------------------------------------------------------ round
    def round_plans(self, state: Mapping[str, torch.Tensor], ratios: Mapping[int, float]) -> dict[int, Any]:
        """Each selected client's plan this round (FedMP: the same ratio in every group, L1 of each
        filter alone, the global model scored once for every client)."""
        scores = self.planner.importance(state)
        return {cid: self.planner.plan(state, _check_ratio(f"ratio of client {cid}", r), scores=scores) for cid, r in ratios.items()}

    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        clients = self.sample(rnd, available)
        if not clients:
            return []
        ratios = {cid: _check_ratio(f"ratio of client {cid}", r) for cid, r in self.client_ratios(rnd, clients).items()}
        state = self.global_state
        plans = self.round_plans(state, {cid: ratios[cid] for cid in clients})
        tasks = []
        for cid in clients:
            plan = plans[cid]
            self._plans[(rnd, cid)] = plan
            config = {WEIGHTS_FORMAT: SUBMODEL, PRUNING_RATIO: ratios[cid], PROBE_LOSS: True, **self.task_config(rnd, cid)}
            if self.send_kept:
                config[KEPT] = encode_kept_groups(plan)
            tasks.append(
                ClientTask(
                    round=rnd,
                    client_id=cid,
                    weights=plan.extract(state),
                    extras=self.task_extras(rnd, cid),
                    config=config,
                    **self.local_work(rnd, cid),
                )
            )
        return tasks

    def drop_failed(self, failures: Sequence[ClientFailure]) -> dict[tuple[int, int], Any]:
        """Forget the plans of tasks that will never deliver; ``{(round, client): plan}`` of those dropped."""
        dropped = {}
        for f in failures:
            plan = self._plans.pop((f.round, f.client_id), None)
            if plan is not None:
                dropped[(f.round, f.client_id)] = plan
        return dropped

    def plans_of(self, results: Sequence[ClientResult]) -> list[Any]:
        """The plan of each result's task, in order.

        Raises:
            PayloadError: a result whose task was never sent or is already aggregated.
        """
        plans = []
        for r in results:
            plan = self._plans.get((r.round, r.client_id))
            if plan is None:
                raise PayloadError(f"no plan for client {r.client_id}'s task of round {r.round}: it was never sent or already aggregated")
            plans.append(plan)
        return plans

    def plan_of(self, rnd: int, client_id: int) -> Any:
        """The plan of the task sent to ``client_id`` in round ``rnd`` (``None`` once aggregated)."""
        return self._plans.get((int(rnd), int(client_id)))

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        return tensor_spec(task.weights), None

    def trained_positions(self, results: Sequence[ClientResult]) -> dict[str, torch.Tensor] | None:
        """The union of the results' kept positions (from their tasks' plans)."""
        covered: dict[str, torch.Tensor] = {}
        for r in results:
            plan = self._plans.get((r.round, r.client_id))
            if plan is None:
                return None  # aggregate() reports the missing plan
            ones = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in r.weights.items()}
            zeros = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in self.global_state.items() if k in ones}
            for k, v in plan.recover(ones, base=zeros).items():
                covered[k] = covered[k] | v if k in covered else v
        return covered

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        late: dict[str, float] = {}
        dropped = self.drop_failed(failures)
        for f in failures:
            plan = dropped.get((f.round, f.client_id))
            if f.kind == "deadline" and plan is not None and plan.ratio is not None:
                late[f"ratio/{f.client_id}"] = plan.ratio  # the ratio that was too low to make it
        self.forget(failures)
        if not results:
            return {"num_results": 0.0, **late}
        global_state = self.global_state
        base = global_state if self.aggregation == "r2sp" else None
        recovered, ratios, weights = [], {}, []
        # recover every result before touching the global model (a bad one leaves it as it was)
        for r, plan in zip(results, self.plans_of(results)):
            recovered.append(plan.recover(r.weights, base=base))
            ratios[r.client_id] = plan.ratio if plan.ratio is not None else math.nan
            weights.append(r.metrics.num_samples if self.weighted else 1.0)
        new_state = weighted_average(recovered, weights, keys=list(global_state))
        for r in results:
            del self._plans[(r.round, r.client_id)]
        self._global = new_state
        vals = list(ratios.values())
        out = {
            "num_results": float(len(results)),
            "ratio_mean": sum(vals) / len(vals),
            "ratio_min": min(vals),
            "ratio_max": max(vals),
            "staleness_mean": sum(rnd - r.round for r in results) / len(results),
        }
        out.update({f"ratio/{c}": v for c, v in ratios.items()})
        out.update(late)
        out.update(self.observe(rnd, results, ratios))
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["plans"] = {f"{r}:{c}": p.to_json() for (r, c), p in sorted(self._plans.items())}
        if self.bandit is not None:
            out["bandit"] = self.bandit.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        from lightning_fedprune.core.plans import Plan

        plans = {}
        for key, data in state.get("plans", {}).items():
            r, c = key.split(":")
            plan = Plan.from_json(data)
            if self.planner is not None:
                self.planner.check(plan)
            plans[(int(r), int(c))] = plan
        self._plans = plans
        if self.bandit is not None and "bandit" in state:
            self.bandit.load_state_dict(state["bandit"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(aggregation={self.aggregation!r})"


@register_strategy("fedmp")
class FedMP(SubModelStrategy):
    """FedMP: per-worker pruning ratios chosen by E-UCB, R2SP aggregation.

    Args:
        theta: E-UCB granularity: a chosen region is split while its diameter exceeds it
            (the paper finds 0.01-0.05 equally good; Fig. 4).
        discount: E-UCB discount factor λ (default 0.995; the paper's 0.95 caps an agent's
            discounted count at about 19, so with tens of leaves exploration never ends).
        ratio_range: ``(low, high)``: the arm space (the paper's is [0, 1)).
        exploration: scale of E-UCB's padding: a number (default 0.05; ``1.0``: as printed) or
            ``"auto"`` (the median observed ``|reward|`` of the agent, for the printed reward,
            whose unit is loss per second); see :class:`~lightning_fedprune.core.bandit.EUCBAgent`.
            With rewards in ``[0, 1]``, the best leaf's mean is about 0.2-0.35 on CNN/MNIST; the
            printed scale then keeps every leaf in play (replayed against the High scenario,
            cluster medians stayed near 0.5 against matched 0.0 / 0.4 / 0.7), and 0.05 lets the
            agents settle within about 50 rounds.
        reward: ``"bounded"`` (default: Eq. 8's intent, unit-free, in ``[0, 1]``) or
            ``"printed"`` (Eq. 8 as printed); see :mod:`lightning_fedprune.core.bandit`.
        gap_floor: the bounded reward's relative time gap that counts as a perfect fit.
        progress: what the reward counts as progress: ``"final_loss"`` (the default with the
            bounded reward: the round's lowest loss after local work over the worker's) or
            ``"loss_decrease"`` (the default, and the only choice, with the printed reward:
            Eq. 8's ΔLoss, in the bounded form as a share of the round's best, which late in
            training rewards pruning); see :mod:`lightning_fedprune.core.bandit`.
        inherit: a new leaf starts from the nearest data (its parent's estimate, or a
            neighbour's first observation) instead of being unexplored (default ``True``; see
            :class:`~lightning_fedprune.core.bandit.EUCBAgent`).
            ``FedMP(reward="printed", progress="loss_decrease", inherit=False, exploration=1.0,
            discount=0.95)`` is Algorithm 1 and Eq. 8 as printed.
        start_low: each agent's first decision is the low end of ``ratio_range`` (the unpruned
            model) instead of a uniform draw (default ``False``, as printed). It pays where the
            target takes few rounds (many local steps); see
            :class:`~lightning_fedprune.core.bandit.EUCBAgent`.
        late_reward: the reward of a decision whose result missed the round's deadline (failure
            kind ``"deadline"``); decisions of workers that dropped out or failed otherwise are
            discarded.
        fixed_ratios: client id -> ratio; replaces the bandit (clients not listed get 0).
        aggregation: ``"r2sp"`` or ``"bsp"``.
        send_kept: send each task's kept channels (see :class:`SubModelStrategy`).
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options.

    Raises:
        ConfigError: a bad option, named.
    """

    def __init__(
        self,
        *,
        theta: float = 0.05,
        discount: float = 0.995,
        ratio_range: tuple[float, float] = (0.0, 1.0),
        exploration: float | str = 0.05,
        reward: str = "bounded",
        gap_floor: float = 0.05,
        progress: str | None = None,
        inherit: bool = True,
        start_low: bool = False,
        late_reward: float = 0.0,
        fixed_ratios: Mapping[int, float] | None = None,
        aggregation: str = "r2sp",
        send_kept: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation=aggregation, send_kept=send_kept, **kwargs)
        from lightning_fedprune.core.bandit import EUCB

        lo, hi = (float(v) for v in ratio_range)
        self.bandit = EUCB(
            low=lo, high=hi, theta=theta, discount=discount, seed=self.seed, exploration=exploration, reward=reward, gap_floor=gap_floor,
            progress=progress if progress is not None else ("final_loss" if reward == "bounded" else "loss_decrease"),
            inherit=inherit, start_low=start_low,
        )
        if isinstance(late_reward, bool) or not isinstance(late_reward, (int, float)) or not math.isfinite(late_reward):
            raise ConfigError(f"`late_reward` must be a finite number, got {late_reward!r}")
        self.late_reward = float(late_reward)
        self.fixed_ratios = (
            {int(c): _check_ratio(f"fixed_ratios[{c}]", r) for c, r in fixed_ratios.items()} if fixed_ratios is not None else None
        )

    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        if self.fixed_ratios is not None:
            return {c: self.fixed_ratios.get(c, 0.0) for c in clients}
        return self.bandit.decide(rnd, clients)

    def observe(self, rnd: int, results: Sequence[ClientResult], ratios: Mapping[int, float]) -> dict[str, float]:
        if self.fixed_ratios is not None or not results:
            return {}
        times = {r.client_id: _completion_time(r) for r in results}
        mean_t = sum(times.values()) / len(times)
        finals = None
        if self.bandit.progress == "final_loss":
            finals = {r.client_id: _final_loss(r) for r in results}
            unknown = [c for c, v in finals.items() if not math.isfinite(v)]
            if unknown:  # no usable loss: the worst share of the round
                worst = max((v for v in finals.values() if math.isfinite(v)), default=1.0)
                finals.update({c: worst for c in unknown})
        rewards = self.bandit.observe(
            rnd,
            {r.client_id: (_delta_loss(r), times[r.client_id]) for r in results},
            decision_rounds={r.client_id: r.round for r in results},
            final_losses=finals,
        )
        vals = list(rewards.values())
        return {"reward_mean": sum(vals) / len(vals), "time_mean": mean_t, "time_max": max(times.values())}

    def forget(self, failures: Sequence[ClientFailure]) -> None:
        """A late result's decision earns ``late_reward``; other failures' decisions are discarded."""
        if self.fixed_ratios is None:
            for f in failures:
                if f.kind == "deadline":
                    self.bandit.penalize(f.round, [f.client_id], self.late_reward)
                else:
                    self.bandit.discard(f.round, [f.client_id])


    def __repr__(self) -> str:
        how = "fixed" if self.fixed_ratios is not None else "E-UCB"
        return f"FedMP(ratios={how}, aggregation={self.aggregation!r})"


@register_strategy("upfl")
class UniformPruning(SubModelStrategy):
    """UP-FL: one pruning ratio for every worker in a round.

    Args:
        ratio: a fixed ratio for every round; ``None`` lets one E-UCB agent choose the round's
            ratio, rewarded with the workers' mean loss decrease per second of round time
            (the round ends at its slowest worker).
        theta, discount, ratio_range, exploration: the agent's settings (as :class:`FedMP`).
        aggregation: ``"r2sp"`` (default) or ``"bsp"``.
        send_kept: send each task's kept channels (see :class:`SubModelStrategy`).
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options.
    """

    _AGENT = -1  # the one agent's id in the bandit

    def __init__(
        self,
        *,
        ratio: float | None = None,
        theta: float = 0.05,
        discount: float = 0.95,
        ratio_range: tuple[float, float] = (0.0, 1.0),
        exploration: float | str = "auto",
        aggregation: str = "r2sp",
        send_kept: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation=aggregation, send_kept=send_kept, **kwargs)
        from lightning_fedprune.core.bandit import EUCB

        self.ratio = _check_ratio("ratio", ratio) if ratio is not None else None
        lo, hi = (float(v) for v in ratio_range)
        self.bandit = EUCB(low=lo, high=hi, theta=theta, discount=discount, seed=self.seed, exploration=exploration)

    def client_ratios(self, rnd: int, clients: Sequence[int]) -> dict[int, float]:
        r = self.ratio if self.ratio is not None else self.bandit.decide(rnd, [self._AGENT])[self._AGENT]
        return {c: r for c in clients}

    def observe(self, rnd: int, results: Sequence[ClientResult], ratios: Mapping[int, float]) -> dict[str, float]:
        if self.ratio is not None or not results:
            return {}
        by_round: dict[int, list[ClientResult]] = {}
        for r in results:
            by_round.setdefault(r.round, []).append(r)
        rewards = []
        for issued, group in sorted(by_round.items()):
            round_time = max(_completion_time(r) for r in group)
            progress = sum(_delta_loss(r) for r in group) / len(group)
            reward = progress / max(round_time, 1e-9)
            self.bandit.agent(self._AGENT).observe(issued, ratios[group[0].client_id], reward)
            rewards.append(reward)
        return {"reward_mean": sum(rewards) / len(rewards)}



@register_strategy("flexcom")
class FlexCom(FedAvg):
    """FlexCom: full models, uploads compressed to a per-worker level set by its bandwidth.

    Each worker sends the top-k entries (by magnitude) of its update; a worker with the
    ``reference`` uplink bandwidth (default: the fastest given) sends everything, slower ones
    proportionally less (:func:`lightning_fedprune.core.compression.keep_ratio_for_bandwidth`).
    The server rebuilds each worker's model as the model it sent plus the decompressed update.

    Args:
        client_uplink: client id -> uplink bytes/s (the baseline is told the bandwidths).
        keep_ratios: client id -> keep ratio, instead of ``client_uplink``.
        min_keep: the smallest keep ratio.
        error_feedback: clients accumulate what they did not send and add it next time.
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options.
    """

    client_callbacks = ("topk_upload",)

    def __init__(
        self,
        *,
        client_uplink: Mapping[int, float] | None = None,
        keep_ratios: Mapping[int, float] | None = None,
        min_keep: float = 0.01,
        error_feedback: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (client_uplink is None) == (keep_ratios is None):
            raise ConfigError("FlexCom needs exactly one of `client_uplink` (bytes/s per client) and `keep_ratios`")
        if not 0.0 < min_keep <= 1.0:
            raise ConfigError(f"`min_keep` must be in (0, 1], got {min_keep}")
        if keep_ratios is not None:
            bad = {c: k for c, k in keep_ratios.items() if not (isinstance(k, (int, float)) and 0.0 < k <= 1.0)}
            if bad:
                raise ConfigError(f"`keep_ratios` must be in (0, 1]; got {bad}")
            self.keep_ratios = {int(c): float(k) for c, k in keep_ratios.items()}
        else:
            from lightning_fedprune.core.compression import keep_ratio_for_bandwidth

            assert client_uplink is not None
            if not client_uplink:
                raise ConfigError("`client_uplink` is empty")
            ref = max(float(v) for v in client_uplink.values())
            self.keep_ratios = {
                int(c): keep_ratio_for_bandwidth(float(v), reference=ref, min_keep=min_keep) for c, v in client_uplink.items()
            }
        self.min_keep = float(min_keep)
        self.error_feedback = bool(error_feedback)
        self._sent: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def task_config(self, rnd: int, client_id: int) -> dict[str, Any]:
        return {
            UPLOAD_KEEP_RATIO: self.keep_ratios.get(client_id, self.min_keep),
            UPLOAD_ERROR_FEEDBACK: self.error_feedback,
        }

    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        tasks = super().configure_round(rnd, available)
        for t in tasks:
            self._sent[(rnd, t.client_id)] = t.weights  # the global state of this round (shared, not copied)
        return tasks

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        return {}, None  # the upload is in the extras; decoded and validated in aggregate

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        from lightning_fedprune.core.compression import decode_topk_result

        for f in failures:
            self._sent.pop((f.round, f.client_id), None)
        if not results:
            return {"num_results": 0.0}
        models, weights = [], []
        for r in results:
            sent = self._sent.get((r.round, r.client_id))
            if sent is None:
                raise PayloadError(f"no task of round {r.round} was sent to client {r.client_id}")
            models.append(decode_topk_result(sent, r.extras))
            weights.append(r.metrics.num_samples if self.weighted else 1.0)
        new_state = weighted_average(models, weights, keys=list(self.global_state))
        for r in results:
            del self._sent[(r.round, r.client_id)]
        self._global = new_state
        keeps = [self.keep_ratios.get(r.client_id, self.min_keep) for r in results]
        return {"num_results": float(len(results)), "keep_mean": sum(keeps) / len(keeps)}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        # tasks in flight reference global states of earlier rounds; keep one copy per round
        rounds = sorted({r for r, _ in self._sent})
        out["sent_rounds"] = {str(r): dict(next(v for (rr, _), v in self._sent.items() if rr == r)) for r in rounds}
        out["sent"] = [[r, c] for r, c in sorted(self._sent)]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        by_round = {int(r): v for r, v in state.get("sent_rounds", {}).items()}
        self._sent = {(int(r), int(c)): by_round[int(r)] for r, c in state.get("sent", [])}
