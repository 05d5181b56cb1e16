"""Learning-rate schedules of a client's local work (plain functions).

A schedule gives the factor applied to the optimizer's learning rate in local epoch ``epoch``
(0-based) of ``epochs``; it restarts with every task (every round):

* ``"constant"``: 1.
* ``"cosine"``: ``(1 + cos(pi * epoch / epochs)) / 2``: the learning rate decays by a cosine over
  the local epochs, stepped once per epoch (FedDP, Section V-A: "for each training round, there
  are 10 epochs of local updates and in each epoch, the cosine learning rate decay is applied";
  ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped per epoch gives
  the same values). The first epoch runs at the full rate, the last at
  ``(1 + cos(pi * (E - 1) / E)) / 2`` of it (never 0).
"""

from __future__ import annotations

import math

from lightning_fedprune.errors import ConfigError

__all__ = ["LR_SCHEDULES", "check_lr_schedule", "lr_factor"]

#: the local learning-rate schedules
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(schedule: object, key: str = "lr_schedule") -> str:
    """``schedule`` if it names a schedule of :data:`LR_SCHEDULES`.

    Raises:
        ConfigError: another value (naming ``key`` and the valid schedules).
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"`{key}` can be {', '.join(LR_SCHEDULES)}; got {schedule!r}")
    return str(schedule)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The factor of the base learning rate in local epoch ``epoch`` of ``epochs`` (see module docstring).

    Raises:
        ConfigError: an unknown schedule, ``epochs < 1`` or ``epoch`` outside ``[0, epochs)``.
    """
    check_lr_schedule(schedule)
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ConfigError(f"local epoch {epoch} of {epochs}: need 0 <= epoch < epochs")
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
