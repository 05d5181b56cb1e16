"""Robust aggregation for any strategy, by wrapping it (math in :mod:`lightning_fedprune.core.robust`).

* :class:`ClipUpdates` (wrapper ``"clip_updates"``): each client's update (its result minus the
  weights it was sent) is scaled down to an L2 norm of at most ``max_norm`` before the inner
  strategy aggregates.
* :class:`RobustMean` (wrapper ``"robust_mean"``): the round's results are replaced by their
  coordinate-wise median (``rule="median"``) or trimmed mean (``rule="trimmed_mean"``, ``trim``)
  before the inner strategy aggregates; since every result then holds the same weights, any
  averaging rule of the inner strategy (FedAvg's, SCAFFOLD's ``x + mean(dy)``) yields that robust
  aggregate. The results' extras (e.g. SCAFFOLD's ``dc``) are left as they are. It needs results of
  one shape per tensor: with sub-model strategies whose clients train different widths it refuses,
  naming the tensor.

Both work on dense and structured sub-model weights; packed formats (PruneFL's COO) and uploads in
extras (FlexCom's top-k) are refused at the first task, naming the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.contract import DENSE, SUBMODEL, WEIGHTS_FORMAT
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask
from lightning_fedprune.core.robust import clip_update, coordinate_median, trimmed_mean
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.strategies.base import Strategy
from lightning_fedprune.strategies.registry import register_wrapper
from lightning_fedprune.strategies.wrappers import StrategyWrapper

__all__ = ["ClipUpdates", "RobustMean", "ROBUST_RULES"]

ROBUST_RULES = ("median", "trimmed_mean")


def _check_format(task: ClientTask, who: str) -> None:
    fmt = task.config.get(WEIGHTS_FORMAT, DENSE)
    if fmt not in (DENSE, SUBMODEL) or not task.weights:
        raise ConfigError(f"{who} works on dense or sub-model weights; the inner strategy sends weights_format {fmt!r}")


@register_wrapper("clip_updates")
class ClipUpdates(StrategyWrapper):
    """Clips every client's update to an L2 norm of ``max_norm`` (see the module docstring).

    Args:
        inner: the wrapped strategy.
        max_norm: the largest update norm let through.
    """

    def __init__(self, inner: Strategy, *, max_norm: float = 10.0) -> None:
        super().__init__(inner)
        if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm > 0):
            raise ConfigError(f"`max_norm` must be a number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self._sent: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._last: dict[str, float] = {}

    def wrap_task(self, task: ClientTask) -> ClientTask:
        _check_format(task, "clip_updates")
        self._sent[(task.round, task.client_id)] = task.weights
        return task

    def before_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> Sequence[ClientResult]:
        for f in failures:
            self._sent.pop((f.round, f.client_id), None)
        out, norms, clipped = [], [], 0
        for r in results:
            sent = self._sent.pop((r.round, r.client_id), None)
            if sent is None:
                raise PayloadError(f"no task of round {r.round} was sent to client {r.client_id}")
            weights, norm = clip_update(r.weights, sent, self.max_norm)
            norms.append(norm)
            clipped += norm > self.max_norm
            out.append(dataclasses.replace(r, weights=weights))
        self._last = {"clipped": float(clipped), "update_norm_max": max(norms) if norms else 0.0}
        return out

    def after_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        return dict(self._last)

    def wrapper_state(self) -> dict[str, Any]:
        return {"sent": {f"{r}:{c}": dict(w) for (r, c), w in sorted(self._sent.items())}}

    def load_wrapper_state(self, state: Mapping[str, Any]) -> None:
        self._sent = {}
        for key, w in state.get("sent", {}).items():
            r, c = key.split(":")
            self._sent[(int(r), int(c))] = dict(w)


@register_wrapper("robust_mean")
class RobustMean(StrategyWrapper):
    """Replaces the round's results by their coordinate-wise median or trimmed mean.

    Args:
        inner: the wrapped strategy.
        rule: ``"median"`` or ``"trimmed_mean"``.
        trim: the fraction trimmed at each end (``"trimmed_mean"``).
    """

    def __init__(self, inner: Strategy, *, rule: str = "median", trim: float = 0.1) -> None:
        super().__init__(inner)
        if rule not in ROBUST_RULES:
            raise ConfigError(f"`rule` can be {', '.join(ROBUST_RULES)}, got {rule!r}")
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"`trim` must be in [0, 0.5), got {trim!r}")
        self.rule = rule
        self.trim = float(trim)

    def wrap_task(self, task: ClientTask) -> ClientTask:
        _check_format(task, "robust_mean")
        return task

    def before_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> Sequence[ClientResult]:
        if len(results) < 2:
            return results
        states = [r.weights for r in results]
        robust = coordinate_median(states) if self.rule == "median" else trimmed_mean(states, self.trim)
        return [dataclasses.replace(r, weights={k: v.clone() for k, v in robust.items()}) for r in results]
