"""E-UCB: FedMP's continuous-arm bandit that picks one pruning ratio per worker and round.

This is Algorithm 1 of the FedMP paper (Section IV-C), one :class:`EUCBAgent` per worker, and
:class:`EUCB`, which keeps the agents of all workers and turns the workers' outcomes into the
rewards of Eq. 8. Nothing here knows about devices: an agent only sees the ratios it chose and the
rewards they earned.

Conventions:
    * The arm space ``[low, high)`` (default ``[0, 1)``; pruning ratios must be ``< 1``) is
      partitioned into half-open leaves ``[a, b)``; ``P_0 = {[low, high)}``.
    * Round ``k``'s decision (Lines 3-10): for every leaf ``P``

          N_k(P)   = sum_{s<k} lambda^(k-s) 1{alpha_s in P}                         (Eq. 9)
          mean_k(P) = sum_{s<k} lambda^(k-s) R_s 1{alpha_s in P} / N_k(P)           (Eq. 9)
          n_k      = sum_P N_k(P)
          U_k(P)   = mean_k(P) + sqrt(2 max(log n_k, 0) / N_k(P))                   (Eqs. 10, 11)

      where the sums run over the rounds ``s`` whose reward has been observed. A leaf with no
      observed reward (``N = 0``) has ``U = +inf``; in a synchronous run this is exactly "a leaf
      never chosen". The leaf with the largest ``U`` is chosen (ties: the lowest left edge, so the
      lowest unexplored leaf goes first), the ratio is drawn uniformly inside it with a generator
      seeded by ``(seed, "eucb", worker, round)``, and when the leaf's diameter ``b - a`` exceeds
      ``theta`` it is split at the drawn ratio into ``[a, alpha)`` and ``[alpha, b)``.
    * Guard of the padding (Eq. 10): with a discount ``lambda`` the total discounted count
      ``n_k`` is below 1 in the first rounds (at most ``lambda / (1 - lambda)`` ever), where
      ``log n_k <= 0`` and the square root is undefined or meaningless. The padding uses
      ``max(log n_k, 0)``: it is 0 while ``n_k <= 1``, so the choice is then the best mean.
    * Splits are exact: each child's statistics are those of the past observations whose ratio
      lies inside the child (each agent keeps the observation list of every leaf).
    * Inherited estimates (``inherit=True``, a departure from the literal reading). A split at
      the drawn ratio ``alpha`` often leaves all past observations on one side of ``alpha``, so
      the other child has none, ``U = +inf``, and must be explored next. From a blank tree this
      runs as a cascade: round 0 splits ``[0, 1)`` at ``alpha_0`` and leaves ``[0, alpha_0)``
      blank, round 1 explores it and leaves ``[0, alpha_1)`` blank, and so on down to ``theta``.
      Every agent thus walks down to the ratios near 0 in the same rounds; on CNN/MNIST (High,
      seed 0) rounds 2-10 ran every worker at ratios below 0.1 and lasted 3.6 s each, as long as
      a Syn-FL round. The paper implements E-UCB with "incremental regression trees", and a new
      leaf of a regression tree predicts from the nearest data until it has its own. With
      ``inherit``:
        - at a split each child starts from its parent's estimate, the parent's discounted count
          (observations and inherited pseudo-counts) and mean, on top of its own observations;
        - a leaf that knows nothing (split from a parent that knew nothing) takes, when a
          neighbouring leaf gets its first observation, that observation as its estimate.
      An inherited estimate decays like an observation, and a leaf is chosen only when its
      estimate plus its padding is the largest ``U``. The inherited pseudo-counts are part of
      ``N`` and ``n`` in Eqs. 9-10.
    * Low start (``start_low=True``, a departure; off by default). A blank agent's first ratio
      is Line 6's uniform draw in ``[low, high)``, so round 0 trains sub-models pruned by 0 to
      0.99 and the first global model is poor. When the target takes few rounds that costs
      more than pruning saves: on CNN/MNIST under Low heterogeneity with 50 local steps (seed 0)
      round 0 reached 21% against Syn-FL's 58%, and FedMP reached 90% in 16 rounds against 10
      (0.76x Syn-FL's time). With ``start_low`` a blank agent with no decision outstanding
      chooses ``low`` (the unpruned model) and does not split; its next decision is Line 6's
      draw. Measured (seed 0, same runs otherwise): Low, 50 local steps, 90% in 11 rounds,
      1.02x Syn-FL's time (0.76x without); Low, 20 local steps, 1.08x (0.87x); Medium, 50 local
      steps, 0.84x (0.83x): there the later explorations cost more than round 0 did. With 5
      local steps, where 90% takes about 100-200 rounds, it costs: High 3.00x (3.41x without),
      Low 1.18x (1.23x). Hence off by default.
    * Lazy decay: a leaf stores its sums ``n, r`` as of a reference round ``t`` (``n = sum
      lambda^(t-s)``); at round ``k`` its count is ``n * lambda^(k-t)`` and its mean ``r / n``.
      A decision costs O(leaves), an observation O(log leaves), a split O(observations in the
      leaf).
    * Asynchrony: a reward may be observed after later rounds were decided (stale results). It is
      recorded for the round it was *decided* in, so its weight at a later decision round ``k`` is
      ``lambda^(k-s)`` with ``s`` the decision round, and it lands in whatever leaf now contains
      its ratio.

Rewards (:data:`REWARD_FORMS`, :func:`round_rewards`):
    * ``"printed"``: Eq. 8 as printed, ``R_n = ΔLoss_n / |T_n - mean T|`` (:func:`eucb_reward`),
      with a denominator floor against division by zero. Its unit is loss per second, it is
      unbounded, and a negative ``ΔLoss`` (frequent late in training with little local work:
      40-47 % of the values after round 80 with 5 local steps) turns the best-fitting ratio into
      the most penalized one.
    * ``"bounded"`` (:func:`bounded_reward`): Eq. 8's intent, loss decrease per unit of distance
      from the mean completion time, made unit-free and bounded to ``[0, 1]``:

          R_n = min(max(ΔLoss_n, 0) / max_m max(ΔLoss_m, 0), 1)
                * gap_floor / max(|T_n - mean T| / mean T, gap_floor)

      Departures from the printed equation, each for a measured failure of it:
        1. ``ΔLoss`` is clipped at 0: a loss that rose is "no progress", not a negative reward
           that grows as the time fits better (the sign inversion).
        2. ``ΔLoss`` is divided by the round's largest clipped ``ΔLoss`` (the progress share): it
           removes the loss's unit and its drift over training (early losses fall by much more
           than late ones), so old and new rewards stay comparable under discounting. When no
           worker of the round made progress every progress share is 0.
        3. The gap is relative to the mean time (unit-free) and floored at ``gap_floor`` (5 % by
           default): all workers within 5 % of the mean fit equally well; Eq. 8's near-zero gaps
           gave rewards of -316 to +275 and let one lucky round dominate a leaf's mean.
      Within one round, for workers with ``ΔLoss > 0`` and a gap above the floor, ``R_n`` is Eq. 8
      times the same positive constant ``gap_floor * mean T / max ΔLoss``: the ordering Eq. 8
      gives within a round is kept. With rewards in ``[0, 1]``, UCB's padding as printed
      (``exploration=1``) has the scale it was derived for.
    * Progress (``progress``, bounded form only). Eq. 8 calls its numerator "the contribution of
      the workers to model convergence" without fixing how to measure it.
        - ``"loss_decrease"``: ``ΔLoss``, the loss of the received sub-model minus the loss of the
          trained one on the same batch, as a share of the round's best (above).
        - ``"final_loss"`` (4th departure): the round's lowest loss after local work divided by
          the worker's own, ``min_m L_m / L_n`` in ``(0, 1]`` (:func:`final_loss_share`). Measured
          on CNN/MNIST with 5 local steps (High scenario, seed 0; Spearman correlations with the
          ratio over 50-round windows): ``ΔLoss`` goes from -0.44 (rounds 0-49) to +0.09 and then
          +0.35 (rounds 100-149), with 48% of the values negative by then. A pruned sub-model
          starts from a higher loss and recovers part of its pruning damage in the round, and
          that recovery counts as progress, so late in training ``ΔLoss`` rewards pruning and
          pulls fast workers to high ratios. The final loss correlates with the ratio at +0.23,
          +0.41 and +0.58 in the same windows: the less a worker was pruned, the better the model
          it returns, throughout training.
      The reward is ``progress share * time fit``; the time fit is the bounded form's
      ``gap_floor / max(|T_n - mean T| / mean T, gap_floor)``.
    * Penalty: a worker whose result missed the round's deadline gets an explicit reward
      (:meth:`EUCB.penalize`, 0 by default: the bottom of the bounded range), so its agent learns
      that the ratio was too low for its device instead of forgetting the decision.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError

__all__ = ["EUCB", "EUCBAgent", "LeafStats", "REWARD_FORMS", "bounded_reward", "eucb_reward", "round_rewards"]

#: reward forms of :class:`EUCB` (see the module docstring)
REWARD_FORMS = ("bounded", "printed")
#: what the bounded reward counts as a worker's progress (see the module docstring)
PROGRESS_MEASURES = ("loss_decrease", "final_loss")

_STATE_VERSION = 1


def _check_config(low: float, high: float, theta: float, discount: float) -> tuple[float, float, float, float]:
    """Validate the shared hyper-parameters; return them as floats."""
    for name, value in (("low", low), ("high", high), ("theta", theta), ("discount", discount)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"`{name}` must be a finite number, got {value!r}")
    if not 0.0 <= low < high:
        raise ConfigError(f"`low` and `high` must satisfy 0 <= low < high, got low={low}, high={high}")
    if high > 1.0:
        raise ConfigError(f"`high` must be <= 1 (pruning ratios lie in [0, 1)), got {high}")
    if theta <= 0:
        raise ConfigError(f"`theta` (the split granularity) must be > 0, got {theta}")
    if not 0.0 < discount < 1.0:
        raise ConfigError(f"`discount` (lambda) must be in (0, 1), got {discount}")
    return float(low), float(high), float(theta), float(discount)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be true or false, got {value!r}")
    return value


def _check_exploration(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"`exploration` must be 'auto' or a finite number >= 0, got {value!r}")
    return float(value)


def _check_round(rnd: Any, what: str) -> int:
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ConfigError(f"`{what}` must be an int >= 0, got {rnd!r}")
    return rnd


def eucb_reward(delta_loss: float, completion_time: float, mean_time: float, *, eps: float = 1e-3) -> float:
    """The reward of Eq. 8: ``delta_loss / |completion_time - mean_time|``.

    Guard: a worker whose time equals the mean (always the case when one worker reports alone)
    would divide by zero. The denominator is ``max(|completion_time - mean_time|, eps *
    mean_time)``: a gap smaller than ``eps`` (relative, default 0.1 %) of the mean round time
    counts as that small gap, so the reward stays finite and the best possible fit is still the
    largest reward.

    Args:
        delta_loss: the worker's contribution to convergence (e.g. training loss before minus after
            its local work; larger is better, may be negative).
        completion_time: the worker's round time ``T_n`` (seconds, >= 0).
        mean_time: ``(1/N) sum_n' T_n'`` over the workers that reported in the same round (> 0).
        eps: relative floor of the denominator (> 0).

    Raises:
        ConfigError: a non-finite input, a negative time, ``mean_time <= 0`` or ``eps <= 0``.
    """
    for name, value in (("delta_loss", delta_loss), ("completion_time", completion_time), ("mean_time", mean_time), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"eucb_reward: `{name}` must be a finite number, got {value!r}")
    if completion_time < 0:
        raise ConfigError(f"eucb_reward: `completion_time` must be >= 0, got {completion_time}")
    if mean_time <= 0:
        raise ConfigError(f"eucb_reward: `mean_time` must be > 0, got {mean_time}")
    if eps <= 0:
        raise ConfigError(f"eucb_reward: `eps` must be > 0, got {eps}")
    gap = max(abs(float(completion_time) - float(mean_time)), float(eps) * float(mean_time))
    return float(delta_loss) / gap


def _finite(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: `{name}` must be a finite number, got {value!r}")
    return float(value)


def _check_gap_floor(gap_floor: Any) -> float:
    g = _finite("gap_floor", gap_floor, "E-UCB")
    if not 0.0 < g <= 1.0:
        raise ConfigError(f"`gap_floor` (the relative time gap that counts as a perfect fit) must be in (0, 1], got {gap_floor!r}")
    return g


def bounded_reward(delta_loss: float, completion_time: float, mean_time: float, *, best_delta_loss: float, gap_floor: float = 0.05) -> float:
    """The bounded, unit-free form of Eq. 8 (see the module docstring), in ``[0, 1]``.

    ``min(max(delta_loss, 0) / best_delta_loss, 1) * gap_floor / max(|completion_time -
    mean_time| / mean_time, gap_floor)``; the progress share is 0 when ``best_delta_loss <= 0``.

    Args:
        delta_loss: the worker's loss decrease over its local work (any sign).
        completion_time: the worker's round time ``T_n`` (seconds, >= 0).
        mean_time: the mean ``T`` of the workers that reported in the same round (> 0).
        best_delta_loss: the round's largest ``max(ΔLoss, 0)``.
        gap_floor: relative gap below which every fit is perfect, in ``(0, 1]``.

    Raises:
        ConfigError: a non-finite input, a negative time, ``mean_time <= 0`` or a bad ``gap_floor``.
    """
    where = "bounded_reward"
    dl = _finite("delta_loss", delta_loss, where)
    t = _finite("completion_time", completion_time, where)
    mean = _finite("mean_time", mean_time, where)
    best = _finite("best_delta_loss", best_delta_loss, where)
    floor = _check_gap_floor(gap_floor)
    if t < 0:
        raise ConfigError(f"{where}: `completion_time` must be >= 0, got {completion_time}")
    if mean <= 0:
        raise ConfigError(f"{where}: `mean_time` must be > 0, got {mean_time}")
    progress = min(max(dl, 0.0) / best, 1.0) if best > 0 else 0.0
    return progress * time_fit(t, mean, floor)


def time_fit(completion_time: float, mean_time: float, gap_floor: float) -> float:
    """The bounded reward's time term: ``gap_floor / max(|T - mean T| / mean T, gap_floor)``, in
    ``(0, 1]`` (inputs as validated by :func:`bounded_reward`)."""
    return gap_floor / max(abs(completion_time - mean_time) / mean_time, gap_floor)


def final_loss_share(final_loss: float, best_final_loss: float) -> float:
    """Progress as the final loss: the round's lowest final loss over the worker's, in ``[0, 1]``
    (1 for the best worker; 1 when the worker's loss is 0)."""
    fl = _finite("final_loss", final_loss, "final_loss_share")
    best = _finite("best_final_loss", best_final_loss, "final_loss_share")
    if fl < 0 or best < 0:
        raise ConfigError(f"final_loss_share: losses must be >= 0, got {final_loss!r} and {best_final_loss!r}")
    return 1.0 if fl <= 0 else min(best / fl, 1.0)


def round_rewards(
    outcomes: Mapping[int, tuple[float, float]],
    *,
    form: str = "bounded",
    gap_floor: float = 0.05,
    eps: float = 1e-3,
    progress: str = "loss_decrease",
    final_losses: Mapping[int, float] | None = None,
) -> dict[int, float]:
    """The rewards of workers that reported together: ``worker -> (delta_loss, completion_time)``.

    ``form`` is ``"bounded"`` (:func:`bounded_reward`) or ``"printed"`` (:func:`eucb_reward`,
    with ``eps``); the mean time (and the bounded form's best loss decrease) is taken over
    exactly these workers. With ``progress="final_loss"`` (bounded form only) the progress share
    is :func:`final_loss_share` of ``final_losses[worker]`` (the loss after local work) instead
    of the loss decrease's share.

    Raises:
        ConfigError: an unknown ``form`` or ``progress``, a missing final loss, or a bad outcome
            (see the reward functions).
    """
    if form not in REWARD_FORMS:
        raise ConfigError(f"`reward` can be {', '.join(REWARD_FORMS)}, got {form!r}")
    _check_progress(progress, form)
    if not outcomes:
        return {}
    mean_time = sum(float(t) for _, t in outcomes.values()) / len(outcomes)
    if form == "printed":
        return {w: eucb_reward(dl, t, mean_time, eps=eps) for w, (dl, t) in outcomes.items()}
    if progress == "loss_decrease":
        best = max(max(float(dl), 0.0) for dl, _ in outcomes.values())
        return {w: bounded_reward(dl, t, mean_time, best_delta_loss=best, gap_floor=gap_floor) for w, (dl, t) in outcomes.items()}
    missing = sorted(set(outcomes) - set(final_losses or {}))
    if missing:
        raise ConfigError(f"progress='final_loss' needs the final loss of every worker; none for {missing}")
    assert final_losses is not None
    best_final = min(float(final_losses[w]) for w in outcomes)
    out = {}
    for w, (_, t) in outcomes.items():
        # the validation of time and gap floor is bounded_reward's, with a full progress share
        fit = bounded_reward(1.0, t, mean_time, best_delta_loss=1.0, gap_floor=gap_floor)
        out[w] = final_loss_share(final_losses[w], best_final) * fit
    return out


def _check_progress(progress: Any, form: str) -> str:
    if progress not in PROGRESS_MEASURES:
        raise ConfigError(f"`progress` can be {', '.join(PROGRESS_MEASURES)}, got {progress!r}")
    if progress != "loss_decrease" and form != "bounded":
        raise ConfigError(f"`progress={progress!r}` needs `reward='bounded'` (the printed Eq. 8 uses the loss decrease)")
    return progress


@dataclass(frozen=True)
class LeafStats:
    """One leaf's statistics at a decision round (see the module docstring for the formulas)."""

    low: float
    high: float
    count: float
    mean: float
    padding: float
    ucb: float


class _Leaf:
    """A leaf ``[a, b)`` with lazily decayed sums and the observations that fell inside it.

    ``pn, pr`` are an inherited prior (see ``inherit``): pseudo-counts and pseudo-reward sums
    taken from the parent at a split or from a neighbour's first observation, decayed like
    observations. Without ``inherit`` they are 0.
    """

    __slots__ = ("a", "b", "ref", "n", "r", "pn", "pr", "obs")

    def __init__(self, a: float, b: float) -> None:
        self.a = a
        self.b = b
        self.ref = 0  # the round the sums n, r, pn, pr refer to
        self.n = 0.0  # sum over observations of lambda^(ref - s)
        self.r = 0.0  # sum over observations of lambda^(ref - s) * R_s
        self.pn = 0.0  # inherited pseudo-count as of ref
        self.pr = 0.0  # inherited pseudo-reward sum as of ref
        self.obs: list[tuple[int, float, float]] = []  # (decision round, ratio, reward)

    @property
    def known(self) -> bool:
        """Whether the leaf has an estimate (an observation or an inherited prior)."""
        return bool(self.obs) or self.pn > 0

    def add(self, rnd: int, ratio: float, reward: float, discount: float) -> None:
        if not self.known:
            self.ref, self.n, self.r = rnd, 1.0, reward
        else:
            t = max(self.ref, rnd)
            decay = discount ** (t - self.ref)
            w = discount ** (t - rnd)
            self.n = self.n * decay + w
            self.r = self.r * decay + w * reward
            self.pn *= decay
            self.pr *= decay
            self.ref = t
        self.obs.append((rnd, ratio, reward))

    def rebuild(self, ref: int, discount: float) -> None:
        """Recompute the sums exactly from the observation list, as of round ``ref`` (the prior
        is already as of ``ref``)."""
        self.ref = ref
        self.n = 0.0
        self.r = 0.0
        for s, _, reward in self.obs:
            w = discount ** (ref - s)
            self.n += w
            self.r += w * reward

    def count(self, rnd: int, discount: float) -> float:
        """``N_rnd(lambda, P)``, inherited pseudo-counts included (0 when nothing is known)."""
        if not self.known:
            return 0.0
        return (self.n + self.pn) * discount ** (rnd - self.ref)

    def mean(self) -> float:
        return (self.r + self.pr) / (self.n + self.pn)


class EUCBAgent:
    """One worker's E-UCB agent (Algorithm 1 of FedMP).

    Args:
        low: smallest ratio of the arm space.
        high: end of the arm space (exclusive, ``<= 1``).
        theta: a leaf is split only while its diameter exceeds ``theta`` (the paper uses
            ``theta`` in ``[0.01, 0.05]``).
        discount: the discount factor ``lambda`` in ``(0, 1)`` (the paper uses 0.95).
        seed: run seed; the ratio drawn in round ``k`` depends only on ``(seed, worker, k)`` and
            the agent's history.
        worker: the worker's id (part of the draw's seed).
        exploration: the padding's scale. UCB's padding ``sqrt(2 log n / N)`` presumes rewards in
            [0, 1]; Eq. 8's rewards have units (loss per second), so with the padding as printed
            the decisions change with the unit of time and, at typical magnitudes, exploration
            never ends. ``"auto"`` (default) multiplies the padding by the median ``|reward|``
            this agent has observed (a robust scale: Eq. 8 is heavy-tailed, a gap near zero gives
            a huge reward), which makes decisions invariant to the reward's unit; a number
            multiplies it by that constant (``1.0``: the padding exactly as printed).
        inherit: what a leaf created by a split knows before its first observation. ``False``
            (Algorithm 1 read literally): nothing, so its ``U`` is ``+inf`` and it is chosen next;
            every split of a leaf whose observations all lie on one side of the drawn ratio
            forces one more exploration. ``True``: like a new leaf of a regression tree, it
            starts from the nearest data: its parent's estimate (count and mean), or, when the
            parent had none, the first observation of a neighbouring leaf (see the module
            docstring).
        start_low: the first decision of a blank agent (no observation, no estimate) is the
            arm space's low end (with ``[0, 1)``: the unpruned model) instead of a uniform draw
            (see the module docstring). ``False``: Algorithm 1 as printed.

    Decisions must come in increasing rounds (:meth:`choose`); each decision is observed at most
    once (:meth:`observe`) or dropped (:meth:`discard`).

    Raises:
        ConfigError: a bad argument, named.
    """

    def __init__(
        self,
        *,
        low: float = 0.0,
        high: float = 1.0,
        theta: float = 0.05,
        discount: float = 0.95,
        seed: int = 0,
        worker: int = 0,
        exploration: float | str = "auto",
        inherit: bool = False,
        start_low: bool = False,
    ) -> None:
        self.low, self.high, self.theta, self.discount = _check_config(low, high, theta, discount)
        self.exploration = _check_exploration(exploration)
        self.inherit = _check_flag("inherit", inherit)
        self.start_low = _check_flag("start_low", start_low)
        self.seed = int(seed)
        self.worker = int(worker)
        self._leaves: list[_Leaf] = [_Leaf(self.low, self.high)]
        self._edges: list[float] = [self.low]  # left edges, sorted (for bisect)
        self._pending: dict[int, float] = {}  # decision round -> ratio, not yet observed
        self._last_round: int | None = None
        self._magnitudes: list[float] = []  # sorted |reward| of every observation (the padding's scale)

    # ------------------------------------------------------------------ views
    @property
    def leaves(self) -> list[tuple[float, float]]:
        """The current partition as ``[(a, b), ...]`` in increasing order (a copy)."""
        return [(leaf.a, leaf.b) for leaf in self._leaves]

    @property
    def pending(self) -> dict[int, float]:
        """Decisions not observed yet: ``{decision round: ratio}`` (a copy)."""
        return dict(self._pending)

    @property
    def last_round(self) -> int | None:
        """The round of the latest decision (``None`` before the first one)."""
        return self._last_round

    def statistics(self, rnd: int) -> list[LeafStats]:
        """Every leaf's ``N``, mean, padding and ``U`` as they would be at decision round ``rnd``.

        ``rnd`` must be later than every observed decision round (``s < k`` in Eq. 9).
        """
        rnd = _check_round(rnd, "rnd")
        latest = max((s for leaf in self._leaves for s, _, _ in leaf.obs), default=-1)
        if rnd <= latest:
            raise ConfigError(f"statistics at round {rnd} would include the reward of round {latest} (needs s < k)")
        return self._stats(rnd)

    def _stats(self, rnd: int) -> list[LeafStats]:
        counts = [leaf.count(rnd, self.discount) for leaf in self._leaves]
        total = sum(counts)
        log_n = max(math.log(total), 0.0) if total > 0 else 0.0
        out = []
        scale = self.padding_scale()
        for leaf, count in zip(self._leaves, counts):
            if count > 0:
                mean = leaf.mean()
                pad = scale * math.sqrt(2.0 * log_n / count)
                out.append(LeafStats(leaf.a, leaf.b, count, mean, pad, mean + pad))
            else:
                out.append(LeafStats(leaf.a, leaf.b, 0.0, math.nan, math.inf, math.inf))
        return out

    def padding_scale(self) -> float:
        """The factor applied to ``sqrt(2 log n / N)`` (see ``exploration``)."""
        if self.exploration != "auto":
            return float(self.exploration)
        mags = self._magnitudes
        if not mags:
            return 1.0
        n = len(mags)
        median = mags[n // 2] if n % 2 else 0.5 * (mags[n // 2 - 1] + mags[n // 2])
        return median if median > 0 else 1.0

    # ------------------------------------------------------------------ Algorithm 1
    def choose(self, rnd: int) -> float:
        """Decide the ratio of round ``rnd`` (Lines 3-10) and grow the tree.

        Returns:
            a ratio in ``[low, high)``.

        Raises:
            ConfigError: ``rnd`` is not later than the previous decision's round.
        """
        rnd = _check_round(rnd, "rnd")
        if self._last_round is not None and rnd <= self._last_round:
            raise ConfigError(
                f"worker {self.worker}: decisions must come in increasing rounds; round {rnd} after round {self._last_round}"
            )
        # Lines 3-5: the argmax of U; strict '>' keeps the lowest left edge on ties
        best, best_u = 0, -math.inf
        counts = [leaf.count(rnd, self.discount) for leaf in self._leaves]
        total = sum(counts)
        log_n = max(math.log(total), 0.0) if total > 0 else 0.0
        scale = self.padding_scale()
        for j, (leaf, count) in enumerate(zip(self._leaves, counts)):
            if count <= 0:
                u = math.inf
            else:
                u = leaf.mean() + scale * math.sqrt(2.0 * log_n / count)
            if u > best_u:
                best, best_u = j, u
                if u == math.inf:
                    break  # the lowest unexplored leaf
        leaf = self._leaves[best]
        # Line 6: uniformly inside the chosen leaf [a, b)
        alpha = float(rng_for(self.seed, "eucb", self.worker, rnd).uniform(leaf.a, leaf.b))
        if alpha >= leaf.b:  # uniform() may round up to b
            alpha = math.nextafter(leaf.b, leaf.a)
        alpha = max(alpha, leaf.a)
        if self.start_low and len(self._leaves) == 1 and not leaf.known and not self._pending:
            alpha = leaf.a  # a blank agent starts from the low end (no split: a draw on the left edge)
        # Lines 7-10: split while the leaf is coarser than theta (a draw on the left edge cannot split)
        if leaf.b - leaf.a > self.theta and alpha > leaf.a:
            self._split(best, alpha)
        self._pending[rnd] = alpha
        self._last_round = rnd
        return alpha

    def _split(self, index: int, alpha: float) -> None:
        leaf = self._leaves[index]
        left, right = _Leaf(leaf.a, alpha), _Leaf(alpha, leaf.b)
        for ob in leaf.obs:
            (left if ob[1] < alpha else right).obs.append(ob)
        for child in (left, right):
            if self.inherit and leaf.known:
                # a regression tree's new leaf: the parent's prior, and for a child without
                # observations of its own also the parent's observations' estimate
                child.pn, child.pr = leaf.pn, leaf.pr
                if not child.obs:
                    child.pn += leaf.n
                    child.pr += leaf.r
            if child.known:
                child.rebuild(leaf.ref, self.discount)
        self._leaves[index : index + 1] = [left, right]
        self._edges[index : index + 1] = [left.a, right.a]

    def observe(self, rnd: int, ratio: float, reward: float) -> None:
        """Record the reward of the ratio decided in round ``rnd`` (Line 12).

        Args:
            rnd: the round the ratio was *decided* in (for a stale asynchronous result, the
                earlier round).
            ratio: the ratio that was returned by :meth:`choose` for ``rnd``.
            reward: its reward (e.g. :func:`eucb_reward`), finite.

        Raises:
            ConfigError: no pending decision in ``rnd``, another ratio, or a non-finite reward.
        """
        rnd = _check_round(rnd, "rnd")
        if rnd not in self._pending:
            raise ConfigError(f"worker {self.worker} was not asked for a ratio in round {rnd} (or it was already observed)")
        if float(ratio) != self._pending[rnd]:
            raise ConfigError(f"worker {self.worker}: round {rnd} decided ratio {self._pending[rnd]!r}, observed {ratio!r}")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise ConfigError(f"worker {self.worker}: `reward` must be a finite number, got {reward!r}")
        alpha = self._pending.pop(rnd)
        j = bisect.bisect_right(self._edges, alpha) - 1
        leaf = self._leaves[j]
        first = not leaf.known
        leaf.add(rnd, alpha, float(reward), self.discount)
        bisect.insort(self._magnitudes, abs(float(reward)))
        if self.inherit and first:
            # a neighbour that knows nothing takes the nearest data: this observation
            for k in (j - 1, j + 1):
                if 0 <= k < len(self._leaves) and not self._leaves[k].known:
                    nb = self._leaves[k]
                    nb.ref, nb.pn, nb.pr = rnd, 1.0, float(reward)

    def discard(self, rnd: int) -> None:
        """Forget the decision of round ``rnd`` (its worker failed; no reward will come)."""
        self._pending.pop(rnd, None)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, JSON-able (floats round-trip exactly through ``json``)."""
        return {
            "version": _STATE_VERSION,
            "config": {
                "low": self.low, "high": self.high, "theta": self.theta, "discount": self.discount, "seed": self.seed,
                "worker": self.worker, "exploration": self.exploration, "inherit": self.inherit, "start_low": self.start_low,
            },
            "leaves": [
                {"a": leaf.a, "b": leaf.b, "ref": leaf.ref, "n": leaf.n, "r": leaf.r, "pn": leaf.pn, "pr": leaf.pr,
                 "obs": [list(o) for o in leaf.obs]}
                for leaf in self._leaves
            ],
            "pending": {str(k): v for k, v in self._pending.items()},
            "last_round": self._last_round,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly.

        Raises:
            ConfigError: the state was written with other hyper-parameters, or is malformed.
        """
        try:
            config = state["config"]
            mine = {
                "low": self.low, "high": self.high, "theta": self.theta, "discount": self.discount, "seed": self.seed,
                "worker": self.worker, "exploration": self.exploration, "inherit": self.inherit, "start_low": self.start_low,
            }
            for key, value in mine.items():
                if config.get(key, False if key in ("inherit", "start_low") else None) != value:
                    raise ConfigError(f"E-UCB state was saved with {key}={config.get(key)!r}, this agent has {key}={value!r}")
            leaves = []
            for item in state["leaves"]:
                leaf = _Leaf(float(item["a"]), float(item["b"]))
                leaf.ref, leaf.n, leaf.r = int(item["ref"]), float(item["n"]), float(item["r"])
                leaf.pn, leaf.pr = float(item.get("pn", 0.0)), float(item.get("pr", 0.0))
                leaf.obs = [(int(s), float(x), float(rw)) for s, x, rw in item["obs"]]
                leaves.append(leaf)
            pending = {int(k): float(v) for k, v in state.get("pending", {}).items()}
            last = state.get("last_round")
            last = None if last is None else int(last)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"malformed E-UCB agent state: {err!r}") from None
        if not leaves or leaves[0].a != self.low or leaves[-1].b != self.high or any(p.b != q.a for p, q in zip(leaves, leaves[1:])):
            raise ConfigError(f"malformed E-UCB agent state: the leaves do not partition [{self.low}, {self.high})")
        self._leaves = leaves
        self._edges = [leaf.a for leaf in leaves]
        self._pending = pending
        self._last_round = last
        self._magnitudes = sorted(abs(o[2]) for leaf in leaves for o in leaf.obs)


class EUCB:
    """E-UCB for all workers: one :class:`EUCBAgent` per worker, created on first use.

    Workers may join at any round; the server needs no knowledge of their devices.

    Args:
        low / high / theta / discount / seed / exploration: as for :class:`EUCBAgent` (shared by all
            agents).
        reward: ``"printed"`` (Eq. 8 as printed, the default here) or ``"bounded"`` (see the
            module docstring).
        gap_floor: the bounded reward's relative gap floor, in ``(0, 1]``.
        inherit / start_low: as for :class:`EUCBAgent`.
        progress: what the bounded reward counts as progress (see the module docstring).

    Raises:
        ConfigError: a bad argument, named.
    """

    def __init__(
        self,
        *,
        low: float = 0.0,
        high: float = 1.0,
        theta: float = 0.05,
        discount: float = 0.95,
        seed: int = 0,
        exploration: float | str = "auto",
        reward: str = "printed",
        gap_floor: float = 0.05,
        inherit: bool = False,
        progress: str = "loss_decrease",
        start_low: bool = False,
    ) -> None:
        self.low, self.high, self.theta, self.discount = _check_config(low, high, theta, discount)
        self.exploration = _check_exploration(exploration)
        self.inherit = _check_flag("inherit", inherit)
        self.start_low = _check_flag("start_low", start_low)
        if reward not in REWARD_FORMS:
            raise ConfigError(f"`reward` can be {', '.join(REWARD_FORMS)}, got {reward!r}")
        self.reward = reward
        self.progress = _check_progress(progress, reward)
        self.gap_floor = _check_gap_floor(gap_floor)
        self.seed = int(seed)
        self._agents: dict[int, EUCBAgent] = {}

    @property
    def workers(self) -> list[int]:
        """Ids of the workers that have an agent, sorted."""
        return sorted(self._agents)

    def agent(self, worker: int) -> EUCBAgent:
        """The agent of ``worker`` (created on first use)."""
        worker = int(worker)
        agent = self._agents.get(worker)
        if agent is None:
            agent = EUCBAgent(
                low=self.low, high=self.high, theta=self.theta, discount=self.discount, seed=self.seed, worker=worker,
                exploration=self.exploration, inherit=self.inherit, start_low=self.start_low,
            )
            self._agents[worker] = agent
        return agent

    def decide(self, rnd: int, workers: Iterable[int]) -> dict[int, float]:
        """One ratio per worker for round ``rnd`` (each from its own agent)."""
        return {int(w): self.agent(w).choose(rnd) for w in workers}

    def observe(
        self,
        rnd: int,
        outcomes: Mapping[int, tuple[float, float]],
        *,
        decision_rounds: Mapping[int, int] | None = None,
        eps: float = 1e-3,
        final_losses: Mapping[int, float] | None = None,
    ) -> dict[int, float]:
        """Turn the outcomes of workers that reported together into rewards and record them.

        Args:
            rnd: the round the ratios were decided in.
            outcomes: ``worker -> (delta_loss, completion_time)`` for the workers whose results
                arrived together; Eq. 8's mean time is taken over exactly these workers.
            decision_rounds: for asynchronous runs, ``worker -> decision round`` of workers whose
                result is stale (decided in an earlier round than ``rnd``); others use ``rnd``.
            eps: the printed reward's denominator floor (see :func:`eucb_reward`).
            final_losses: ``worker -> loss after local work`` (needed with ``progress="final_loss"``).

        Returns:
            ``worker -> reward``.

        Raises:
            ConfigError: a worker was not asked for a ratio in its decision round (nothing is
                recorded then), or an outcome is not finite.
        """
        rnd = _check_round(rnd, "rnd")
        decision_rounds = dict(decision_rounds or {})
        unknown = sorted(set(decision_rounds) - set(outcomes))
        if unknown:
            raise ConfigError(f"`decision_rounds` names workers {unknown} that have no outcome")
        plan: list[tuple[EUCBAgent, int, float, float]] = []
        for w, outcome in outcomes.items():
            dr = _check_round(decision_rounds.get(w, rnd), f"decision_rounds[{w}]")
            agent = self._agents.get(int(w))
            if agent is None or dr not in agent._pending:
                raise ConfigError(f"worker {w} was not asked for a ratio in round {dr} (or it was already observed)")
            try:
                delta_loss, completion = (float(v) for v in outcome)
            except (TypeError, ValueError):
                raise ConfigError(f"outcome of worker {w} must be (delta_loss, completion_time), got {outcome!r}") from None
            if not (math.isfinite(delta_loss) and math.isfinite(completion) and completion >= 0):
                raise ConfigError(f"outcome of worker {w} must be finite with completion_time >= 0, got {outcome!r}")
            plan.append((agent, dr, delta_loss, completion))
        if not plan:
            return {}
        finals = None
        if self.progress == "final_loss":
            missing = sorted(w for w in outcomes if w not in (final_losses or {}))
            if missing:
                raise ConfigError(f"progress='final_loss' needs the final loss of every worker; none for {missing}")
            assert final_losses is not None
            finals = {i: final_losses[w] for i, w in enumerate(outcomes)}
        values = round_rewards(
            {i: (p[2], p[3]) for i, p in enumerate(plan)}, form=self.reward, gap_floor=self.gap_floor, eps=eps,
            progress=self.progress, final_losses=finals,
        )
        rewards: dict[int, float] = {}
        for i, (agent, dr, _, _) in enumerate(plan):
            agent.observe(dr, agent._pending[dr], values[i])
            rewards[agent.worker] = values[i]
        return rewards

    def penalize(self, rnd: int, workers: Iterable[int], reward: float = 0.0) -> dict[int, float]:
        """Reward the decisions of round ``rnd`` of workers that missed the round's deadline.

        Each such worker's pending ratio of round ``rnd`` is recorded with ``reward`` (the bottom
        of the bounded range, 0, by default), so its agent learns that the ratio did not fit.
        Workers without a pending decision in ``rnd`` are skipped.

        Returns:
            ``worker -> ratio`` of the decisions penalized.

        Raises:
            ConfigError: a non-finite ``reward``.
        """
        rnd = _check_round(rnd, "rnd")
        reward = _finite("reward", reward, "EUCB.penalize")
        out = {}
        for w in workers:
            agent = self._agents.get(int(w))
            if agent is not None and rnd in agent._pending:
                ratio = agent._pending[rnd]
                agent.observe(rnd, ratio, reward)
                out[int(w)] = ratio
        return out

    def discard(self, rnd: int, workers: Iterable[int]) -> None:
        """Forget the decisions of round ``rnd`` for workers that failed (no reward will come)."""
        for w in workers:
            agent = self._agents.get(int(w))
            if agent is not None:
                agent.discard(rnd)

    def state_dict(self) -> dict[str, Any]:
        """All agents' states, JSON-able."""
        return {
            "version": _STATE_VERSION,
            "config": {
                "low": self.low, "high": self.high, "theta": self.theta, "discount": self.discount, "seed": self.seed,
                "exploration": self.exploration, "reward": self.reward, "gap_floor": self.gap_floor, "inherit": self.inherit,
                "progress": self.progress, "start_low": self.start_low,
            },
            "agents": {str(w): a.state_dict() for w, a in sorted(self._agents.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly (agents not in ``state`` are dropped).

        Raises:
            ConfigError: the state was written with other hyper-parameters, or is malformed.
        """
        if not isinstance(state, Mapping) or "agents" not in state:
            raise ConfigError("malformed E-UCB state: no 'agents'")
        config = state.get("config", {})
        mine = (("low", self.low), ("high", self.high), ("theta", self.theta), ("discount", self.discount), ("seed", self.seed),
                ("exploration", self.exploration), ("reward", self.reward), ("gap_floor", self.gap_floor),
                ("inherit", self.inherit), ("progress", self.progress), ("start_low", self.start_low))
        # states written before these options existed
        saved_before = {"reward": "printed", "gap_floor": 0.05, "inherit": False, "progress": "loss_decrease", "start_low": False}
        for key, value in mine:
            if config.get(key, saved_before.get(key)) != value:
                raise ConfigError(f"E-UCB state was saved with {key}={config.get(key)!r}, this bandit has {key}={value!r}")
        agents: dict[int, EUCBAgent] = {}
        for w, agent_state in state["agents"].items():
            agent = EUCBAgent(
                low=self.low, high=self.high, theta=self.theta, discount=self.discount, seed=self.seed, worker=int(w),
                exploration=self.exploration, inherit=self.inherit, start_low=self.start_low,
            )
            agent.load_state_dict(agent_state)
            agents[int(w)] = agent
        self._agents = agents
