"""Aggregation rules as plain functions: tensors in, tensors out.

Conventions:
    * a *state* is a ``{name: tensor}`` dict keyed like a model's ``state_dict``;
    * floating tensors are combined in their own dtype, in the order the clients are given, so
      results are reproducible bit for bit; integer tensors (e.g. BatchNorm's
      ``num_batches_tracked``) are combined in float64 and rounded back;
    * weights need not be normalized; they must be finite, non-negative and not all zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "normalize_weights",
    "weighted_average",
    "fednova_coefficient",
    "fednova_aggregate",
    "scaffold_update",
    "state_sub",
    "state_add",
    "overlap_average",
]

State = Mapping[str, torch.Tensor]


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Return ``weights / sum(weights)`` after checking they are usable."""
    ws = [float(w) for w in weights]
    if not ws:
        raise ValueError("cannot aggregate zero clients")
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {ws}")
    total = sum(ws)
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; at least one must be positive")
    return [w / total for w in ws]


def weighted_average(states: Sequence[State], weights: Sequence[float], *, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of several states: ``sum_i p_i * x_i`` with ``p = normalize(weights)``.

    Args:
        states: one state per client, all with the same keys and shapes.
        weights: one weight per client (e.g. sample counts for FedAvg).
        keys: restrict to these names (default: the first state's keys).
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    ps = normalize_weights(weights)
    names = list(keys) if keys is not None else list(states[0].keys())
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = states[0][name]
        if first.is_floating_point():
            acc = states[0][name] * ps[0]
            for state, p in zip(states[1:], ps[1:]):
                acc = acc + state[name] * p
            out[name] = acc
        else:
            acc64 = sum(state[name].to(torch.float64) * p for state, p in zip(states, ps))
            out[name] = torch.round(acc64).to(first.dtype)
    return out


def state_sub(a: State, b: State) -> dict[str, torch.Tensor]:
    """``a - b`` for every floating tensor of ``a`` (others are copied from ``a``)."""
    return {k: (v - b[k]) if v.is_floating_point() else v.clone() for k, v in a.items()}


def state_add(a: State, b: State, *, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """``a + alpha * b`` for every floating tensor of ``a`` present in ``b``."""
    return {k: (v + b[k] * alpha) if (v.is_floating_point() and k in b) else v.clone() for k, v in a.items()}


def overlap_average(
    global_state: State,
    states: Sequence[State],
    masks: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Average each position only over the clients that hold it (HeteroFL's and Hermes' rule).

    Every position of every tensor becomes ``sum_i w_i m_i x_i / sum_i w_i m_i`` over the clients
    ``i`` whose mask ``m_i`` contains it; a position no client holds keeps ``global_state``'s value.
    Computed in float64 and cast back (integer tensors rounded).

    Args:
        global_state: the current global model (full shapes).
        states: per client, its trained model at full shape (positions it does not hold are ignored).
        masks: per client, a bool tensor of the full shape per key (a key it lacks: every position).
        weights: one weight per client (e.g. sample counts, or 1 each).
    """
    if not (len(states) == len(masks) == len(weights)):
        raise ValueError(f"{len(states)} states, {len(masks)} masks and {len(weights)} weights")
    ws = normalize_weights(weights)  # checks them; the mean below renormalizes per position
    out: dict[str, torch.Tensor] = {}
    for name, g in global_state.items():
        num = torch.zeros(g.shape, dtype=torch.float64)
        den = torch.zeros(g.shape, dtype=torch.float64)
        for state, mask, w in zip(states, masks, ws):
            m = mask[name] if name in mask else torch.ones(g.shape, dtype=torch.bool)
            num += torch.where(m, state[name].to(torch.float64) * w, 0.0)
            den += m.to(torch.float64) * w
        held = den > 0
        avg = torch.where(held, num / torch.where(held, den, 1.0), g.to(torch.float64))
        out[name] = avg.to(g.dtype) if g.is_floating_point() else torch.round(avg).to(g.dtype)
        out[name][~held] = g[~held]  # untouched positions: bit-identical
    return out


def fednova_coefficient(num_steps: int, momentum: float = 0.0) -> float:
    """FedNova's ``a_i``: the L1 norm of the local-update coefficient vector.

    Plain SGD gives ``a_i = tau_i``; SGD with momentum ``rho`` gives
    ``a_i = (tau_i - rho * (1 - rho**tau_i) / (1 - rho)) / (1 - rho)`` (Wang et al., 2020, Sec. 4).
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum == 0.0:
        return float(num_steps)
    rho = momentum
    return (num_steps - rho * (1.0 - rho**num_steps) / (1.0 - rho)) / (1.0 - rho)


def fednova_aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    coefficients: Sequence[float],
    *,
    server_lr: float = 1.0,
) -> dict[str, torch.Tensor]:
    """FedNova (Wang et al., 2020): normalized averaging of heterogeneous local work.

    With ``p_i`` the normalized weights, ``d_i = (x - y_i) / a_i`` the normalized update of
    client ``i`` and ``tau_eff = sum_i p_i a_i``::

        x_new = x - server_lr * tau_eff * sum_i p_i d_i

    Non-floating tensors are sample-weighted averages (as FedAvg).
    Clients with ``a_i == 0`` (no local step) are left out of the sum.
    """
    if not (len(client_states) == len(weights) == len(coefficients)):
        raise ValueError("client_states, weights and coefficients must have the same length")
    keep = [i for i, a in enumerate(coefficients) if a > 0]
    if not keep:
        raise ValueError("FedNova needs at least one client with local steps > 0")
    ps = normalize_weights([weights[i] for i in keep])
    tau_eff = sum(p * coefficients[i] for p, i in zip(ps, keep))
    out: dict[str, torch.Tensor] = {}
    for name, x in global_state.items():
        if not x.is_floating_point():
            acc64 = sum(client_states[i][name].to(torch.float64) * p for p, i in zip(ps, keep))
            out[name] = torch.round(acc64).to(x.dtype)
            continue
        direction = None
        for p, i in zip(ps, keep):
            d = (x - client_states[i][name]) * (p / coefficients[i])
            direction = d if direction is None else direction + d
        out[name] = x - direction * (server_lr * tau_eff)
    return out


def scaffold_update(
    global_state: State,
    control: State,
    weight_deltas: Sequence[State],
    control_deltas: Sequence[State],
    *,
    num_clients_total: int,
    server_lr: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD's server step (Karimireddy et al., 2020, Alg. 1 lines 16-17).

    ``x <- x + server_lr * mean_i(dy_i)`` and ``c <- c + (1 / N) * sum_i(dc_i)`` where the mean
    runs over the ``S`` participating clients and ``N = num_clients_total``. Non-floating
    tensors of the model are averaged from ``x + dy_i`` like FedAvg with equal weights.
    """
    s = len(weight_deltas)
    if s == 0 or s != len(control_deltas):
        raise ValueError("SCAFFOLD needs one weight delta and one control delta per participating client")
    if num_clients_total < s:
        raise ValueError(f"num_clients_total ({num_clients_total}) is smaller than the participants ({s})")
    new_x: dict[str, torch.Tensor] = {}
    for name, x in global_state.items():
        if x.is_floating_point():
            acc = weight_deltas[0][name]
            for d in weight_deltas[1:]:
                acc = acc + d[name]
            new_x[name] = x + acc * (server_lr / s)
        else:
            new_x[name] = torch.round(sum((x.to(torch.float64) + d[name].to(torch.float64)) for d in weight_deltas) / s).to(x.dtype)
    new_c: dict[str, torch.Tensor] = {}
    for name, c in control.items():
        acc = control_deltas[0][name]
        for d in control_deltas[1:]:
            acc = acc + d[name]
        new_c[name] = c + acc * (1.0 / num_clients_total)
    return new_x, new_c
