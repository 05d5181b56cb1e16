"""Server optimizers as plain functions (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Conventions:
    * the *pseudo-gradient* of a round is ``g = x - a``: the global model ``x`` before the round
      minus the model ``a`` the aggregation rule produced (so plain averaging is one step of SGD
      with learning rate 1 on ``g``: ``x - 1 * g = a``);
    * one function call is one server step on one tensor; it returns new tensors (inputs are
      never modified) in the dtype of ``x``;
    * ``mask`` (optional, bool, the shape of ``x``) marks the positions the round updated: elsewhere
      the returned model is ``a`` and the returned moments are the old ones, bit for bit.

Rules (``eta`` server learning rate, ``tau`` adaptivity, no bias correction, as in the paper)::

    FedAvgM:    m = beta * m + g                          x = x - eta * m
    FedAdagrad: m = beta1 * m + (1 - beta1) * g           v = v + g^2
    FedAdam:    m = beta1 * m + (1 - beta1) * g           v = beta2 * v + (1 - beta2) * g^2
    FedYogi:    m = beta1 * m + (1 - beta1) * g           v = v - (1 - beta2) * g^2 * sign(v - g^2)
    adaptive:   x = x - eta * m / (sqrt(v) + tau)

The paper starts ``v`` at ``tau^2`` (:func:`initial_second_moment`) and ``m`` at zero.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ADAPTIVE_RULES", "momentum_step", "adaptive_step", "initial_second_moment", "check_server_options"]

#: adaptive rules by name
ADAPTIVE_RULES = ("adagrad", "adam", "yogi")


def check_server_options(*, lr: float, beta1: float | None = None, beta2: float | None = None, tau: float | None = None) -> None:
    """Raise ``ValueError`` naming the option when a server optimizer setting is out of range."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`server_lr` must be a finite number > 0, got {lr!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if b is not None and not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
            raise ValueError(f"`{name}` must be in [0, 1), got {b!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"`tau` must be a finite number > 0, got {tau!r}")


def initial_second_moment(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``v_{-1} = tau^2`` everywhere (Reddi et al., Algorithm 2)."""
    return torch.full_like(x, float(tau) ** 2)


def _masked(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return new if mask is None else torch.where(mask, new, old)


def momentum_step(
    x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, *, lr: float, momentum: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvgM: ``m = momentum * m + (x - a)``, ``x = x - lr * m``. Returns ``(new x, new m)``."""
    g = x - a
    m_new = momentum * m + g
    x_new = x - lr * m_new
    return _masked(x_new, a, mask), _masked(m_new, m, mask)


def adaptive_step(
    x: torch.Tensor,
    a: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedAdagrad / FedAdam / FedYogi (``rule``: ``"adagrad"``, ``"adam"``, ``"yogi"``).

    Returns ``(new x, new m, new v)`` (see the module docstring for the rules).

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in ADAPTIVE_RULES:
        raise ValueError(f"`rule` can be {', '.join(ADAPTIVE_RULES)}, got {rule!r}")
    g = x - a
    g2 = g * g
    m_new = beta1 * m + (1.0 - beta1) * g
    if rule == "adagrad":
        v_new = v + g2
    elif rule == "adam":
        v_new = beta2 * v + (1.0 - beta2) * g2
    else:
        v_new = v - (1.0 - beta2) * g2 * torch.sign(v - g2)
    x_new = x - lr * m_new / (torch.sqrt(v_new) + tau)
    return _masked(x_new, a, mask), _masked(m_new, m, mask), _masked(v_new, v, mask)
