"""The server side of the round contract.

A :class:`Strategy` is a pure object: it never imports Lightning, FedML or the simulation engine.
A transport (the simulation engine or the FedML server) drives it::

    strategy.initialize(ModelSpec.from_state(global_state, trainable=names), num_clients=N)
    for rnd in range(R):
        tasks = strategy.configure_round(rnd, available_clients)
        ... send tasks, run them on clients, receive results / failures ...
        metrics = strategy.aggregate(rnd, results, failures)
        strategy.global_state  # the new global model

Everything the strategy holds is returned by :meth:`Strategy.state_dict` (tensors and JSON
values, serializable without pickle) so a server resumes exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, TensorSpec, tensor_spec
from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError

__all__ = ["Strategy", "ModelSpec", "sample_clients"]


@dataclass(frozen=True)
class ModelSpec:
    """What a strategy knows about the model.

    Attributes:
        state: the communicated tensors of the initial global model.
        trainable: names of the trainable parameters among them.
        planner: a :class:`~lightning_fedprune.core.plans.Planner` built once on the model's
            dependency graph, for strategies that send structured sub-models
            (``Strategy.requires_planner``); transports build it, strategies only use it.
    """

    state: dict[str, torch.Tensor]
    trainable: tuple[str, ...]
    planner: Any = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.trainable if n not in self.state]
        if unknown:
            raise ConfigError(f"trainable names {unknown[:5]} are not in the model state")


def sample_clients(
    available: Sequence[int], *, fraction: float, min_clients: int, seed: int, rnd: int
) -> list[int]:
    """Choose ``max(min_clients, round(fraction * len(available)))`` clients, seeded by (seed, round).

    Returns the chosen ids sorted ascending (or all available ids when there are fewer).
    """
    avail = sorted(int(c) for c in available)
    if not avail:
        return []
    k = max(int(min_clients), int(round(fraction * len(avail))))
    if k >= len(avail):
        return avail
    rng = rng_for(seed, "sample", rnd)
    return sorted(int(c) for c in rng.choice(avail, size=k, replace=False))


class Strategy(abc.ABC):
    """Base class of all server strategies.

    Subclasses implement :meth:`configure_round` and :meth:`aggregate` and extend
    :meth:`state_dict` / :meth:`load_state_dict` with whatever else they hold.

    Attributes:
        client_callbacks: names of the client-side callbacks this strategy needs (resolved by the
            client runtime, e.g. ``("scaffold",)``); plain data so it crosses process boundaries.
            The class attribute is the default; each instance holds its own tuple (a
            :class:`~lightning_fedprune.strategies.StrategyWrapper` adds to its inner strategy's).
        requires_planner: the transport must pass a pruning planner in :class:`ModelSpec`.
    """

    client_callbacks: tuple[str, ...] = ()
    #: whether :meth:`initialize` needs ``ModelSpec.planner`` (structured sub-model strategies)
    requires_planner: bool = False

    def __init__(self) -> None:
        self.client_callbacks = tuple(type(self).client_callbacks)  # per instance: wrappers add to it
        self._global: dict[str, torch.Tensor] | None = None
        self._trainable: tuple[str, ...] = ()
        self.num_clients: int = 0

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        """Take the initial global model. Called once by the transport before round 0."""
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        self._global = {k: v.detach().clone() for k, v in spec.state.items()}
        self._trainable = tuple(spec.trainable)
        self.num_clients = int(num_clients)

    @property
    def initialized(self) -> bool:
        """Whether :meth:`initialize` (or :meth:`load_state_dict`) gave the strategy a global model."""
        return self._global is not None

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The current global model (communicated tensors only)."""
        if self._global is None:
            raise RuntimeError(f"{type(self).__name__} is not initialized: call initialize() first")
        return self._global

    @abc.abstractmethod
    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        """Choose clients among ``available`` and build one task per chosen client."""

    @abc.abstractmethod
    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        """Fold the round's results into the global state; return metrics to report.

        The global state must be replaced as a whole (never left half-updated): build the new
        state first and assign it last. Called with an empty ``results`` only by transports that
        tolerate it; the state then stays as it was.
        """

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        """``(weights_spec, extras_spec)`` a valid result of ``task`` must match.

        Default: the same weights as sent, any extras. Transports check received results with it.
        """
        return tensor_spec(task.weights), None

    def trained_positions(self, results: Sequence[ClientResult]) -> dict[str, torch.Tensor] | None:
        """The positions of the global model that ``results`` trained, before :meth:`aggregate`.

        ``None``: every position. Otherwise a bool tensor of a global tensor's shape per key (a key
        not listed: every position). Sub-model strategies return the union of the results' kept
        positions, PruneFL its masks. Server optimizers update only these positions.
        """
        return None

    def set_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the global model as a whole (a strategy with structural constraints, such as
        PruneFL's masks, applies them here)."""
        self._global = dict(state)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "global": dict(self.global_state),
            "trainable": list(self._trainable),
            "num_clients": self.num_clients,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._global = {k: v.clone() for k, v in state["global"].items()}
        self._trainable = tuple(state.get("trainable", ()))
        self.num_clients = int(state.get("num_clients", self.num_clients))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
