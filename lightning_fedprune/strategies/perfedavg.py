"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, "Personalized federated learning with theoretical
guarantees: a model-agnostic meta-learning approach", NeurIPS 2020).

The server is FedAvg's: sample, send the global model, average the returned models by samples.
The clients train the MAML meta-objective ``f(w − α∇f(w))`` (client callback ``"perfedavg"``,
:class:`~lightning_fedprune.callbacks.perfedavg.PerFedAvgCallback`; math in
:mod:`lightning_fedprune.core.meta`) with one of the paper's two variants:

* ``variant="fo"`` (Per-FedAvg (FO)): the outer gradient at the adapted point, Hessian dropped;
* ``variant="hf"`` (Per-FedAvg (HF)): the Hessian-vector product approximated by a difference of
  two gradients at ``w ± δ g`` on a third batch.

Each local step is one step of the client optimizer (its learning rate is the outer ``β``); the
personalized model evaluated on a client's local test split is the model after one step of size
``α`` on local data.

Choices where the paper is silent (named options):

* ``inner_fraction``: the paper draws independent batches ``D``, ``D'``, ``D''`` per step; here each
  training batch is cut into them (``D`` takes ``inner_fraction`` of it, default 1/2 for FO and 1/3
  for HF, the rest is split evenly), so a local step consumes one batch as in FedAvg. The clock
  charges one gradient per example, plus, for HF, the two gradients on ``D''`` of the
  Hessian-vector product.
* ``adapt_from``: ``"received"`` (default) personalizes the received global model, as the paper's
  evaluation does; ``"trained"`` the client's locally trained model.
* ``delta``: the finite-difference step of the Hessian-free variant (default 1e-3).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_fedprune.core.contract import PERFEDAVG
from lightning_fedprune.core.meta import VARIANTS
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.fedavg import FedAvg
from lightning_fedprune.strategies.registry import register_strategy

__all__ = ["PerFedAvg", "ADAPT_FROM"]

ADAPT_FROM = ("received", "trained")


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"`{name}` must be a number > 0, got {value!r}")
    return float(value)


@register_strategy("perfedavg")
class PerFedAvg(FedAvg):
    """Per-FedAvg's server and client settings (see the module docstring).

    Args:
        variant: ``"fo"`` (first-order) or ``"hf"`` (Hessian-free).
        alpha: the inner (and personalization) step size ``α``.
        delta: the Hessian-free variant's finite-difference step ``δ``.
        inner_fraction: the fraction of each batch used for the inner step (``None``: equal parts).
        adapt_from: ``"received"`` or ``"trained"``: the model the evaluation's one step starts from.
        **kwargs: :class:`~lightning_fedprune.strategies.FedAvg` options (``local_steps``: MAML steps).

    Raises:
        ConfigError: an unknown variant or ``adapt_from``, a non-positive ``alpha`` / ``delta``, an
            ``inner_fraction`` outside ``(0, 1)``.
    """

    client_callbacks = ("perfedavg",)

    def __init__(
        self,
        *,
        variant: str = "fo",
        alpha: float = 0.01,
        delta: float = 1e-3,
        inner_fraction: float | None = None,
        adapt_from: str = "received",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ConfigError(f"`variant` can be {', '.join(VARIANTS)}, got {variant!r}")
        if adapt_from not in ADAPT_FROM:
            raise ConfigError(f"`adapt_from` can be {', '.join(ADAPT_FROM)}, got {adapt_from!r}")
        if inner_fraction is not None and (
            isinstance(inner_fraction, bool) or not isinstance(inner_fraction, (int, float)) or not 0.0 < inner_fraction < 1.0
        ):
            raise ConfigError(f"`inner_fraction` must be null or a number in (0, 1), got {inner_fraction!r}")
        self.variant = variant
        self.alpha = _positive("alpha", alpha)
        self.delta = _positive("delta", delta)
        self.inner_fraction = float(inner_fraction) if inner_fraction is not None else None
        self.adapt_from = adapt_from

    def task_config(self, rnd: int, client_id: int) -> dict[str, Any]:
        return {
            PERFEDAVG: {
                "variant": self.variant,
                "alpha": self.alpha,
                "delta": self.delta,
                "inner_fraction": self.inner_fraction,
                "adapt_from": self.adapt_from,
            }
        }

    def __repr__(self) -> str:
        return f"PerFedAvg(variant={self.variant!r}, alpha={self.alpha})"
