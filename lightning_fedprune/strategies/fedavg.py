"""FedAvg and the strategies that only change how clients train or how updates are averaged:
FedProx (proximal term on the client), FedNova (normalized averaging) and SCAFFOLD (control
variates).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.aggregation import (
    fednova_aggregate,
    fednova_coefficient,
    scaffold_update,
    state_sub,
    weighted_average,
)
from lightning_fedprune.core.control_variates import SCAFFOLD_CONTROL, SCAFFOLD_DELTA
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, TensorSpec, tensor_spec
from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies.base import ModelSpec, Strategy, sample_clients
from lightning_fedprune.strategies.registry import register_strategy

log = logging.getLogger(__name__)

__all__ = ["FedAvg", "FedNova", "Scaffold", "capability_local_steps", "result_metrics"]


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017).

    Args:
        fraction_fit: fraction of the available clients sampled each round.
        min_fit_clients: at least this many clients per round (when available).
        local_epochs: passes over local data per round (or use ``local_steps``).
        local_steps: optimizer steps per round instead of epochs.
        local_epochs_range: ``(lo, hi)``: each client draws its epochs uniformly in [lo, hi]
            every round (seeded), to create heterogeneous local work.
        weighted: weight clients by their sample counts (True) or equally.
        seed: seeds client sampling.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        local_epochs: int | None = 1,
        local_steps: int | None = None,
        local_epochs_range: tuple[int, int] | None = None,
        weighted: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < fraction_fit <= 1.0:
            raise ConfigError(f"`fraction_fit` must be in (0, 1], got {fraction_fit}")
        if min_fit_clients < 1:
            raise ConfigError(f"`min_fit_clients` must be >= 1, got {min_fit_clients}")
        if local_steps is not None:
            local_epochs = None
        if (local_epochs is None) == (local_steps is None):
            raise ConfigError("set exactly one of `local_epochs` and `local_steps`")
        for name, v in (("local_epochs", local_epochs), ("local_steps", local_steps)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"`{name}` must be a positive int, got {v!r}")
        if local_epochs_range is not None:
            lo, hi = local_epochs_range
            if not (1 <= lo <= hi):
                raise ConfigError(f"`local_epochs_range` must be (lo, hi) with 1 <= lo <= hi, got {local_epochs_range}")
            local_epochs_range = (int(lo), int(hi))
        self.fraction_fit = float(fraction_fit)
        self.min_fit_clients = int(min_fit_clients)
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.local_epochs_range = local_epochs_range
        self.weighted = bool(weighted)
        self.seed = int(seed)

    # ------------------------------------------------------------------ round
    def sample(self, rnd: int, available: Sequence[int]) -> list[int]:
        return sample_clients(
            available, fraction=self.fraction_fit, min_clients=self.min_fit_clients, seed=self.seed, rnd=rnd
        )

    def local_work(self, rnd: int, client_id: int) -> dict[str, int | None]:
        """``{"local_epochs": .., "local_steps": ..}`` for one client this round."""
        if self.local_epochs_range is not None and self.local_steps is None:
            lo, hi = self.local_epochs_range
            return {"local_epochs": int(rng_for(self.seed, "epochs", rnd, client_id).integers(lo, hi + 1)), "local_steps": None}
        return {"local_epochs": self.local_epochs, "local_steps": self.local_steps}

    def task_config(self, rnd: int, client_id: int) -> dict[str, Any]:
        """JSON settings sent with each task (overridden by subclasses)."""
        return {}

    def task_extras(self, rnd: int, client_id: int) -> dict[str, torch.Tensor]:
        return {}

    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        state = self.global_state
        return [
            ClientTask(
                round=rnd,
                client_id=cid,
                weights=state,
                extras=self.task_extras(rnd, cid),
                config=self.task_config(rnd, cid),
                **self.local_work(rnd, cid),
            )
            for cid in self.sample(rnd, available)
        ]

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        if not results:
            return {"num_results": 0.0}
        weights = [r.metrics.num_samples if self.weighted else 1.0 for r in results]
        new_state = weighted_average([r.weights for r in results], weights, keys=list(self.global_state))
        self._global = new_state
        return result_metrics(results)


@register_strategy("fednova")
class FedNova(FedAvg):
    """FedNova (Wang et al., 2020): normalized averaging of heterogeneous local steps.

    Each client's update is divided by its number of local steps ``a_i`` (corrected for
    momentum) before averaging; the average is rescaled by ``tau_eff = sum_i p_i a_i``.

    Args:
        momentum: the clients' SGD momentum (enters ``a_i``); must match their optimizer.
        server_lr: global step size.
        **fedavg_kwargs: as :class:`FedAvg` (``local_epochs_range`` creates heterogeneity).
    """

    def __init__(self, *, momentum: float = 0.0, server_lr: float = 1.0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"`momentum` must be in [0, 1), got {momentum}")
        if not server_lr > 0:
            raise ConfigError(f"`server_lr` must be > 0, got {server_lr}")
        self.momentum = float(momentum)
        self.server_lr = float(server_lr)

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        results = [r for r in results if r.metrics.num_steps > 0]
        if not results:
            return {"num_results": 0.0}
        weights = [r.metrics.num_samples if self.weighted else 1.0 for r in results]
        coeffs = [fednova_coefficient(r.metrics.num_steps, self.momentum) for r in results]
        self._global = fednova_aggregate(
            self.global_state, [r.weights for r in results], weights, coeffs, server_lr=self.server_lr
        )
        metrics = result_metrics(results)
        metrics["tau_eff"] = float(sum(w * a for w, a in zip(weights, coeffs)) / sum(weights))
        return metrics


@register_strategy("scaffold")
class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020) with option II control-variate updates.

    The server keeps a control variate ``c`` for every trainable tensor and sends it with each task
    (extras ``scaffold.c/<name>``). The client callback ``"scaffold"``
    (:class:`lightning_fedprune.callbacks.ScaffoldCallback`) corrects every gradient by
    ``c - c_i``, keeps the client's own ``c_i`` in the client's persistent state across rounds,
    and returns ``c_i+ - c_i`` (extras ``scaffold.dc/<name>``). The server then updates
    ``x += server_lr * mean(dy)`` and ``c += sum(dc) / N``.

    Args:
        server_lr: global step size ``eta_g``.
        momentum: the clients' SGD momentum (a recipe passes ``model.momentum``). SCAFFOLD's
            control variates are estimated for plain SGD: with momentum > 0 a warning says so.
        **fedavg_kwargs: as :class:`FedAvg` (``weighted`` is ignored: SCAFFOLD averages equally).
    """

    client_callbacks = ("scaffold",)

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if not server_lr > 0:
            raise ConfigError(f"`server_lr` must be > 0, got {server_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"`momentum` must be in [0, 1), got {momentum}")
        if momentum > 0:
            log.warning(
                "SCAFFOLD with client momentum %g: its control variates are estimated for plain SGD and momentum "
                "can make training diverge; use momentum 0 (model.momentum: 0.0) and raise the learning rate instead",
                momentum,
            )
        self.momentum = float(momentum)
        self.server_lr = float(server_lr)
        self._control: dict[str, torch.Tensor] = {}

    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        super().initialize(spec, num_clients=num_clients)
        self._control = {n: torch.zeros_like(spec.state[n]) for n in self._trainable}

    @property
    def control(self) -> dict[str, torch.Tensor]:
        """The server control variate ``c``."""
        return self._control

    def task_extras(self, rnd: int, client_id: int) -> dict[str, torch.Tensor]:
        return {SCAFFOLD_CONTROL + n: c for n, c in self._control.items()}

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        return tensor_spec(task.weights), {SCAFFOLD_DELTA + n: (tuple(c.shape), c.dtype) for n, c in self._control.items()}

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        if not results:
            return {"num_results": 0.0}
        x = self.global_state
        # integer tensors (e.g. num_batches_tracked) need real deltas too: state_sub copies them,
        # and scaffold_update averages x + dy_i for them
        dys = [
            {k: d if d.is_floating_point() else r.weights[k].double() - x[k].double() for k, d in state_sub(r.weights, x).items()}
            for r in results
        ]
        dcs = [{n: r.extras[SCAFFOLD_DELTA + n] for n in self._control} for r in results]
        new_x, new_c = scaffold_update(
            x, self._control, dys, dcs, num_clients_total=self.num_clients, server_lr=self.server_lr
        )
        self._global, self._control = new_x, new_c
        metrics = result_metrics(results)
        metrics["control_norm"] = float(torch.sqrt(sum((c.double() ** 2).sum() for c in new_c.values())))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["control"] = dict(self._control)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._control = {k: v.clone() for k, v in state["control"].items()}


def result_metrics(results: Sequence[ClientResult]) -> dict[str, float]:
    """The round's result count and sample-weighted mean training losses of a round's results."""
    n = sum(r.metrics.num_samples for r in results) or 1
    out = {"num_results": float(len(results))}
    for key in ("loss_before", "loss_after"):
        vals = [(getattr(r.metrics, key), r.metrics.num_samples) for r in results if math.isfinite(getattr(r.metrics, key))]
        if vals:
            out[f"train_{key}"] = sum(v * w for v, w in vals) / (sum(w for _, w in vals) or n)
    return out


def capability_local_steps(speeds: Mapping[int, float], *, base_steps: int, min_steps: int = 1) -> dict[int, int]:
    """Local iterations proportional to each worker's speed: the fastest does ``base_steps``.

    ``speeds`` maps client ids to any positive measure of capability (e.g. FLOP/s of the device),
    so that every worker's local computation takes about the same time.
    """
    if not speeds:
        raise ConfigError("`speeds` is empty")
    if base_steps < 1 or min_steps < 1:
        raise ConfigError(f"`base_steps` and `min_steps` must be >= 1, got {base_steps}, {min_steps}")
    bad = {c: v for c, v in speeds.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ConfigError(f"speeds must be positive and finite, got {bad}")
    fastest = max(speeds.values())
    return {int(c): max(min_steps, int(round(base_steps * v / fastest))) for c, v in speeds.items()}
