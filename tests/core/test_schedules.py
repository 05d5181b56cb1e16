"""Local learning-rate schedules: the per-epoch cosine decay by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.core.schedules import LR_SCHEDULES, check_lr_schedule, lr_factor
from lightning_fedprune.errors import ConfigError


def test_cosine_factor_by_hand_and_as_torchs_cosine_annealing_stepped_per_epoch():
    # E = 4: (1 + cos(pi * e / 4)) / 2 = 1, (1 + sqrt(2)/2) / 2, 1/2, (1 - sqrt(2)/2) / 2
    r = math.sqrt(2) / 2
    expected = [1.0, (1 + r) / 2, 0.5, (1 - r) / 2]
    got = [lr_factor("cosine", e, 4) for e in range(4)]
    assert got == pytest.approx(expected, abs=1e-15)
    assert [lr_factor("constant", e, 4) for e in range(4)] == [1.0] * 4
    assert lr_factor("cosine", 0, 1) == 1.0  # one local epoch: the full rate
    # torch's CosineAnnealingLR(T_max=E, eta_min=0), stepped once per epoch, gives the same rates
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for e in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor("cosine", e, 10), rel=1e-12)
        opt.step()
        sched.step()


def test_bad_schedules_and_epochs_are_refused():
    assert LR_SCHEDULES == ("constant", "cosine") and check_lr_schedule("cosine") == "cosine"
    with pytest.raises(ConfigError, match="`lr_schedule` can be constant, cosine; got 'step'"):
        check_lr_schedule("step")
    with pytest.raises(ConfigError, match="local epoch 4 of 4"):
        lr_factor("cosine", 4, 4)
