"""FedDP (Yu, Nguyen, Anwar and Jannesari): client-local dynamic channel gates over any strategy.

:class:`DynamicGates` wraps any base strategy: each task carries the gates' keep ratio and lasso
lambda (``gate_keep_ratio``, ``gate_lasso``) and the client callback ``"gates"``
(:class:`lightning_fedprune.callbacks.GateCallback`) inserts the client's own gates, trains them
with the network and keeps them in the client's persistent state. The server never sees a gate:
it aggregates the backbone with the base strategy's rule. :class:`FedDP` is the paper's default,
SCAFFOLD wrapped by :class:`DynamicGates`::

    FedDP(keep_ratio=0.5, lasso=1e-4)                           # SCAFFOLD + gates (Algorithm 1)
    DynamicGates(FedNova(momentum=0.0), keep_ratio=0.5)         # FedNova + gates
    DynamicGates(FedProx(mu=0.01), keep_ratio=0.5)              # FedProx + gates
    DynamicGates(FedMP(theta=0.05), keep_ratio=0.5)             # gated FedMP sub-models (beyond the paper)

In a recipe: ``strategy: {name: fedavg, wrappers: [{name: feddp, options: {keep_ratio: 0.5}}]}``.

Departures from the paper (Algorithm 1) and readings of it:

* The server step is SCAFFOLD's, as Section IV-D says ("exactly the same as the SCAFFOLD"):
  ``x += server_lr * mean_i(dy_i)`` over the participants and ``c += sum_i(dc_i) / N``.
  Algorithm 1's listing weights the model update by ``n_k / n`` instead; with FedAvg as the base,
  :class:`DynamicGates` averages by sample counts.
* The client's option II update divides by ``K * eta`` with ``K`` the local optimizer steps, as
  SCAFFOLD does; Algorithm 1 writes ``E * eta`` with ``E`` the local epochs, which with ``B``
  batches per epoch scales the correction ``B`` times.
* The control variates cover the backbone only (the gates are never on the server).
* The paper's hyper-parameter "alpha = 5e-3" is read as the lasso's lambda, but the default here is
  1e-4 (:data:`lightning_fedprune.core.gates.DEFAULT_LASSO`): the lasso sums over every gated
  channel, and at 5e-3 it is about half of VGG-11's loss in its first steps and collapses even a small gated
  CNN's training (measured; see there).
* Gated FLOPs: see :mod:`lightning_fedprune.core.gates` (training masks a dense computation; the
  saving is realized at inference).
* Composition with physically pruned sub-models (beyond the paper): ``DynamicGates(FedMP(...))``
  sends each client its FedMP sub-model plus the task's kept channels (``config["kept"]``, a few
  bytes); the client gates the sub-model's convolutions (each gate keeps ``keep_ratio`` of the
  sub-model's channels) and keeps its gate state at the full model's width, sliced by the kept
  channels before training and scattered back after it, so positions outside this round's
  sub-model keep their values (:func:`lightning_fedprune.core.gates.slice_gate_state`). The server
  aggregates the sub-models with FedMP's rule (R2SP / BSP) and never sees a gate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lightning_fedprune.core.contract import GATE_KEEP_RATIO, GATE_LASSO, KEPT, SUBMODEL, WEIGHTS_FORMAT, encode_kept_groups
from lightning_fedprune.core.gates import DEFAULT_LASSO, check_keep_ratio, check_lasso
from lightning_fedprune.core.messages import ClientTask
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.base import Strategy
from lightning_fedprune.strategies.fedavg import Scaffold
from lightning_fedprune.strategies.registry import register_strategy, register_wrapper
from lightning_fedprune.strategies.wrappers import StrategyWrapper

__all__ = ["DynamicGates", "FedDP"]


@register_wrapper("feddp")
class DynamicGates(StrategyWrapper):
    """FedDP's client-local dynamic channel gates around any strategy (see the module docstring).

    Args:
        inner: the base strategy (FedAvg, FedProx, FedNova, SCAFFOLD, ...).
        keep_ratio: fraction of each gated convolution's output channels kept per sample, in (0, 1]
            (0.5 in the paper).
        lasso: lambda of ``lambda * sum_k E||linear(s_k)||_1`` added to the clients' loss (>= 0;
            default :data:`~lightning_fedprune.core.gates.DEFAULT_LASSO`, 1e-4).

    Raises:
        ConfigError: ``keep_ratio`` outside (0, 1] or ``lasso`` < 0.
    """

    client_callbacks = ("gates",)

    def __init__(self, inner: Strategy, *, keep_ratio: float = 0.5, lasso: float = DEFAULT_LASSO) -> None:
        super().__init__(inner)
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.lasso = check_lasso(lasso)
        if self.requires_planner and not callable(getattr(self.innermost, "plan_of", None)):
            raise ConfigError(
                f"the 'feddp' wrapper cannot wrap {type(self.innermost).__name__}: it sends sub-models without a "
                "`plan_of(round, client)` to tell the clients their kept channels"
            )

    def wrap_task(self, task: ClientTask) -> ClientTask:
        config = {**task.config, GATE_KEEP_RATIO: self.keep_ratio, GATE_LASSO: self.lasso}
        if config.get(WEIGHTS_FORMAT) == SUBMODEL and KEPT not in config:
            # the client lines its full-width gates up with the sub-model's channels
            plan = self.innermost.plan_of(task.round, task.client_id)  # type: ignore[attr-defined]
            if plan is None:
                raise ConfigError(f"no plan for client {task.client_id}'s sub-model task of round {task.round}")
            config[KEPT] = encode_kept_groups(plan)
        return dataclasses.replace(task, config=config)

    def __repr__(self) -> str:
        return f"DynamicGates({self.inner!r}, keep_ratio={self.keep_ratio}, lasso={self.lasso})"


@register_strategy("feddp")
class FedDP(DynamicGates):
    """FedDP as in the paper: :class:`~lightning_fedprune.strategies.Scaffold` wrapped by :class:`DynamicGates`.

    Args:
        keep_ratio: fraction of output channels each gate keeps, in (0, 1].
        lasso: lambda of the gates' lasso (>= 0).
        server_lr: SCAFFOLD's global step size.
        **fedavg_kwargs: as :class:`~lightning_fedprune.strategies.FedAvg`.
    """

    #: what a client process builds without the strategy: SCAFFOLD's callback and the gates
    client_callbacks = ("scaffold", "gates")

    def __init__(self, *, keep_ratio: float = 0.5, lasso: float = DEFAULT_LASSO, server_lr: float = 1.0, **fedavg_kwargs: Any) -> None:
        super().__init__(Scaffold(server_lr=server_lr, **fedavg_kwargs), keep_ratio=keep_ratio, lasso=lasso)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()  # the server state is SCAFFOLD's (gates live on the clients)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"FedDP(keep_ratio={self.keep_ratio}, lasso={self.lasso})"
