"""SCAFFOLD's control variates: message keys and the client's option II update."""

from __future__ import annotations

import torch

__all__ = ["SCAFFOLD_CONTROL", "SCAFFOLD_DELTA", "scaffold_client_update"]

#: prefix of the server control variate ``c`` in a task's extras
SCAFFOLD_CONTROL = "scaffold.c/"
#: prefix of the client control-variate delta ``c_i+ - c_i`` in a result's extras
SCAFFOLD_DELTA = "scaffold.dc/"


def scaffold_client_update(
    c_i: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, num_steps: int, lr: float
) -> torch.Tensor:
    """Option II of Karimireddy et al. (2020): ``c_i+ = c_i - c + (x - y) / (K * lr)``.

    With no step taken (``num_steps == 0`` or ``lr == 0``) the variate is unchanged.
    """
    if num_steps <= 0 or lr <= 0:
        return c_i.clone()
    return c_i - c + (x - y) / (num_steps * lr)
