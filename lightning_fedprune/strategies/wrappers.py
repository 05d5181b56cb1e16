"""Add behaviour to any strategy by wrapping it.

A :class:`StrategyWrapper` holds an ``inner`` strategy and is a strategy itself, so wrappers stack.
It can add client callbacks (``client_callbacks``), task fields and extras
(:meth:`StrategyWrapper.wrap_task`), checks of what results must hold
(:meth:`StrategyWrapper.expected_result`) and aggregation steps before or after the inner rule
(:meth:`StrategyWrapper.before_aggregate` / :meth:`StrategyWrapper.after_aggregate`), with its own
checkpointed state (:meth:`StrategyWrapper.wrapper_state`). Everything else is the inner
strategy's: its global model, its sampling, its aggregation, its attributes (read through)::

    strategy = Proximal(FedMP(theta=0.05, seed=0), mu=0.01)     # FedMP's sub-models, FedProx's clients

In a recipe::

    strategy:
      name: fedmp
      wrappers: [{name: fedprox, options: {mu: 0.01}}]

:class:`FedProx` is FedAvg wrapped by :class:`Proximal`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_fedprune.core.contract import PROX_MU
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, TensorSpec
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.base import ModelSpec, Strategy
from lightning_fedprune.strategies.fedavg import FedAvg
from lightning_fedprune.strategies.registry import combine_callbacks, register_strategy, register_wrapper

__all__ = ["StrategyWrapper", "Proximal", "FedProx"]


class StrategyWrapper(Strategy):
    """A strategy around an ``inner`` strategy (see the module docstring).

    Class attributes:
        client_callbacks: client callbacks this wrapper adds to the inner strategy's (the
            instance's ``client_callbacks`` holds both, the inner ones first).

    Args:
        inner: the wrapped strategy (initialized or not).
    """

    client_callbacks: tuple[str, ...] = ()

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise ConfigError(f"{type(self).__name__} wraps a Strategy, got {type(inner).__name__}")
        self.inner = inner
        self.client_callbacks = combine_callbacks(inner.client_callbacks, type(self).client_callbacks)

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the wrapper lacks: read the inner strategy's
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ the inner strategy's
    @property
    def requires_planner(self) -> bool:  # type: ignore[override]
        return bool(self.inner.requires_planner)

    @property
    def initialized(self) -> bool:
        return self.inner.initialized

    @property
    def global_state(self) -> dict[str, Any]:
        return self.inner.global_state

    @property
    def num_clients(self) -> int:  # type: ignore[override]
        return self.inner.num_clients

    @property
    def innermost(self) -> Strategy:
        """The base strategy under every wrapper."""
        s: Strategy = self.inner
        while isinstance(s, StrategyWrapper):
            s = s.inner
        return s

    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        self.inner.initialize(spec, num_clients=num_clients)
        self.on_initialize(spec)

    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        return [self.wrap_task(t) for t in self.inner.configure_round(rnd, available)]

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        return self.inner.expected_result(task)

    def trained_positions(self, results: Sequence[ClientResult]) -> dict[str, Any] | None:
        return self.inner.trained_positions(results)

    def set_global_state(self, state: Mapping[str, Any]) -> None:
        self.inner.set_global_state(state)

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        results = list(self.before_aggregate(rnd, results, failures))
        metrics = dict(self.inner.aggregate(rnd, results, failures))
        metrics.update(self.after_aggregate(rnd, results, failures))
        return metrics

    # ------------------------------------------------------------------ what wrappers override
    def on_initialize(self, spec: ModelSpec) -> None:
        """Called after the inner strategy took the initial model."""

    def wrap_task(self, task: ClientTask) -> ClientTask:
        """The task as the wrapper sends it (add config fields or extras with ``dataclasses.replace``)."""
        return task

    def before_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> Sequence[ClientResult]:
        """The results the inner strategy aggregates (e.g. with wrapper-only extras removed)."""
        return results

    def after_aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        """A step after the inner aggregation (the new global model is ``self.global_state``); metrics."""
        return {}

    def wrapper_state(self) -> dict[str, Any]:
        """The wrapper's own state (tensors and JSON values)."""
        return {}

    def load_wrapper_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`wrapper_state`."""

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "wrapper": self.wrapper_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.load_wrapper_state(state.get("wrapper", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


@register_wrapper("fedprox")
class Proximal(StrategyWrapper):
    """FedProx's client side for any strategy: clients add ``mu/2 * ||w - w_global||^2``.

    The proximal gradient is added on the client by the ``"fedprox"`` callback
    (:class:`lightning_fedprune.callbacks.FedProxCallback`), which reads ``mu`` from the task, so
    ``training_step`` stays unchanged. FedProx also lets workers do different amounts of local
    work according to their capabilities (the baseline of FedMP's evaluation): with
    ``client_local_steps`` (e.g. from :func:`~lightning_fedprune.strategies.capability_local_steps`)
    each listed client runs that many local iterations.

    Args:
        inner: the wrapped strategy.
        mu: proximal coefficient (>= 0).
        client_local_steps: client id -> local optimizer steps per round (clients not listed keep
            the inner strategy's local work).
    """

    client_callbacks = ("fedprox",)

    def __init__(self, inner: Strategy, *, mu: float = 0.01, client_local_steps: Mapping[int, int] | None = None) -> None:
        super().__init__(inner)
        if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
            raise ConfigError(f"`mu` must be a finite number >= 0, got {mu}")
        self.mu = float(mu)
        steps = {}
        for c, v in (client_local_steps or {}).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"`client_local_steps[{c}]` must be a positive int, got {v!r}")
            steps[int(c)] = v
        self.client_local_steps = steps

    def local_work(self, rnd: int, client_id: int) -> dict[str, int | None]:
        """``{"local_epochs": .., "local_steps": ..}`` of one client this round."""
        if client_id in self.client_local_steps:
            return {"local_epochs": None, "local_steps": self.client_local_steps[client_id]}
        return self.inner.local_work(rnd, client_id)

    def wrap_task(self, task: ClientTask) -> ClientTask:
        work = {}
        if task.client_id in self.client_local_steps:
            work = {"local_epochs": None, "local_steps": self.client_local_steps[task.client_id]}
        return dataclasses.replace(task, config={**task.config, PROX_MU: self.mu}, **work)

    def __repr__(self) -> str:
        return f"Proximal({self.inner!r}, mu={self.mu})"


@register_strategy("fedprox")
class FedProx(Proximal):
    """FedProx (Li et al., 2020): :class:`~lightning_fedprune.strategies.FedAvg` wrapped by :class:`Proximal`.

    Args:
        mu: proximal coefficient (>= 0).
        client_local_steps: client id -> local optimizer steps per round.
        **fedavg_kwargs: as :class:`~lightning_fedprune.strategies.FedAvg`.
    """

    def __init__(self, *, mu: float = 0.01, client_local_steps: Mapping[int, int] | None = None, **fedavg_kwargs: Any) -> None:
        super().__init__(FedAvg(**fedavg_kwargs), mu=mu, client_local_steps=client_local_steps)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()  # FedProx's server state is FedAvg's

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"
