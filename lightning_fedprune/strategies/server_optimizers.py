"""Server optimizers around any strategy's aggregation (Reddi et al., ICLR 2021; Hsu et al., 2019).

Each wrapper lets the inner strategy aggregate as usual, then treats ``g = x - a`` (the global model
before the round minus the inner strategy's new model) as a pseudo-gradient and takes one server
optimizer step from ``x`` (the math is :mod:`lightning_fedprune.core.server_optimizers`)::

    strategy = FedAdam(FedMP(seed=0), server_lr=0.01, tau=1e-3)

In a recipe::

    strategy:
      name: fedmp
      wrappers: [{name: fedadam, options: {server_lr: 0.01, tau: 0.001}}]

Only the trainable floating tensors take the step; buffers (BatchNorm statistics, counters) are the
inner strategy's. Only positions the round trained take it too
(:meth:`~lightning_fedprune.strategies.Strategy.trained_positions`): positions no client's
sub-model covered (FedMP, UP-FL) or pruned weights (PruneFL) keep the inner strategy's values, and
their moments stay as they were. PruneFL's pruned weights stay zero.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.messages import ClientFailure, ClientResult
from lightning_fedprune.core.server_optimizers import adaptive_step, check_server_options, initial_second_moment, momentum_step
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.base import ModelSpec, Strategy
from lightning_fedprune.strategies.registry import register_wrapper
from lightning_fedprune.strategies.wrappers import StrategyWrapper

__all__ = ["ServerOptimizer", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi"]


class ServerOptimizer(StrategyWrapper):
    """Base of the server optimizer wrappers: keeps ``x`` and the trained positions, steps after
    the inner aggregation. Subclasses implement :meth:`step` and list their moments in ``moments``.

    Args:
        inner: the wrapped strategy.
        server_lr: the server learning rate ``eta`` (> 0).
        masked: update only the positions the round trained (default); ``False`` steps every
            position of the trainable tensors.

    Raises:
        ConfigError: an option out of range, or PruneFL with ``reinitialize`` (rewinding
            replaces the model, which is not an update to step on).
    """

    moments: tuple[str, ...] = ()

    def __init__(self, inner: Strategy, *, server_lr: float = 1.0, masked: bool = True) -> None:
        super().__init__(inner)
        self._check(lr=server_lr)
        self.server_lr = float(server_lr)
        self.masked = bool(masked)
        self._state: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.moments}
        self._keys: tuple[str, ...] = ()
        self._before: dict[str, torch.Tensor] | None = None
        self._mask: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _check(**options: Any) -> None:
        try:
            check_server_options(**options)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def on_initialize(self, spec: ModelSpec) -> None:
        if getattr(self.innermost, "reinitialize", False):
            raise ConfigError(f"{type(self).__name__} cannot wrap a strategy with `reinitialize: true` (its rewound model is no update to step on)")
        state = self.global_state
        self._keys = tuple(k for k in spec.trainable if k in state and state[k].is_floating_point())
        self._state = {m: {k: self.initial_moment(m, state[k]) for k in self._keys} for m in self.moments}

    @property
    def trainable_keys(self) -> tuple[str, ...]:
        """The tensors that take the server step (trainable, floating)."""
        return self._keys

    def moment(self, name: str) -> dict[str, torch.Tensor]:
        """The optimizer moment ``name`` (``"m"``, ``"v"``) of every tensor in :attr:`trainable_keys`."""
        return self._state[name]

    def initial_moment(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The moment ``name`` at the start (zeros)."""
        return torch.zeros_like(x)

    def before_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> Sequence[ClientResult]:
        state = self.global_state
        self._before = {k: state[k].clone() for k in self._keys}
        self._mask = self.inner.trained_positions(results) if (self.masked and results) else None
        return results

    def after_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        before, self._before = self._before, None
        if not results or before is None:
            return {}
        new = dict(self.global_state)
        sq = 0.0
        for k in self._keys:
            mask = self._mask.get(k) if self._mask is not None else None
            x, a = before[k], new[k]
            moments = {m: self._state[m][k] for m in self.moments}
            x_new, moments = self.step(x, a, moments, mask=mask)
            for m in self.moments:
                self._state[m][k] = moments[m]
            new[k] = x_new.to(a.dtype)
            g = (x - a) if mask is None else (x - a) * mask
            sq += float((g.double() ** 2).sum())
        self._mask = None
        self.set_global_state(new)
        return {"pseudo_grad_norm": sq**0.5}

    @abc.abstractmethod
    def step(
        self, x: torch.Tensor, a: torch.Tensor, moments: Mapping[str, torch.Tensor], *, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One server step on one tensor: ``(new x, new moments)`` (each optimizer defines it)."""

    def wrapper_state(self) -> dict[str, Any]:
        return {m: dict(self._state[m]) for m in self.moments}

    def load_wrapper_state(self, state: Mapping[str, Any]) -> None:
        for m in self.moments:
            if m in state:
                self._state[m] = {k: v.clone() for k, v in state[m].items()}
        if self.moments and self.moments[0] in state:
            self._keys = tuple(state[self.moments[0]])  # also when restored without initialize()


@register_wrapper("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum (FedAvgM, Hsu et al. 2019): ``m = momentum * m + g``, ``x = x - server_lr * m``.

    Args:
        inner: the wrapped strategy.
        server_lr: server learning rate (1.0 with ``momentum=0`` is the inner strategy itself).
        momentum: the server momentum in [0, 1).
        masked: see :class:`ServerOptimizer`.
    """

    moments = ("m",)

    def __init__(self, inner: Strategy, *, server_lr: float = 1.0, momentum: float = 0.9, masked: bool = True) -> None:
        super().__init__(inner, server_lr=server_lr, masked=masked)
        self._check(lr=server_lr, beta1=momentum)
        self.momentum = float(momentum)

    def step(self, x, a, moments, *, mask):
        x_new, m = momentum_step(x, a, moments["m"], lr=self.server_lr, momentum=self.momentum, mask=mask)
        return x_new, {"m": m}

    def __repr__(self) -> str:
        return f"FedAvgM({self.inner!r}, server_lr={self.server_lr}, momentum={self.momentum})"


class _Adaptive(ServerOptimizer):
    rule = ""
    moments = ("m", "v")

    def __init__(
        self, inner: Strategy, *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, masked: bool = True
    ) -> None:
        super().__init__(inner, server_lr=server_lr, masked=masked)
        self._check(lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def initial_moment(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return initial_second_moment(x, self.tau) if name == "v" else torch.zeros_like(x)

    def step(self, x, a, moments, *, mask):
        x_new, m, v = adaptive_step(
            x, a, moments["m"], moments["v"], rule=self.rule, lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau, mask=mask
        )
        return x_new, {"m": m, "v": v}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, server_lr={self.server_lr}, beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"


_ADAPTIVE_ARGS = """
    Args:
        inner: the wrapped strategy.
        server_lr: server learning rate ``eta`` (the paper tunes it in 10^-3 .. 1).
        beta1: first-moment decay.
        beta2: second-moment decay (unused by FedAdagrad).
        tau: adaptivity ``tau`` (> 0); the second moment starts at ``tau^2``.
        masked: see :class:`ServerOptimizer`.
"""


@register_wrapper("fedadagrad")
class FedAdagrad(_Adaptive):
    __doc__ = "FedAdagrad: ``v = v + g^2``; ``x = x - eta * m / (sqrt(v) + tau)``.\n" + _ADAPTIVE_ARGS
    rule = "adagrad"


@register_wrapper("fedadam")
class FedAdam(_Adaptive):
    __doc__ = "FedAdam: ``v = beta2 * v + (1 - beta2) * g^2``; ``x = x - eta * m / (sqrt(v) + tau)``.\n" + _ADAPTIVE_ARGS
    rule = "adam"


@register_wrapper("fedyogi")
class FedYogi(_Adaptive):
    __doc__ = "FedYogi: ``v = v - (1 - beta2) * g^2 * sign(v - g^2)``; ``x = x - eta * m / (sqrt(v) + tau)``.\n" + _ADAPTIVE_ARGS
    rule = "yogi"
