"""Server optimizer steps against hand computations (Reddi et al., Algorithm 2; FedAvgM)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.core.server_optimizers import adaptive_step, check_server_options, initial_second_moment, momentum_step


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_momentum_two_rounds_by_hand():
    # Prepare: x = [1, 2], the aggregate a = [0.5, 3]: g = x - a = [0.5, -1]
    x, a, m = _t(1.0, 2.0), _t(0.5, 3.0), _t(0.0, 0.0)
    # Execute: round 1 with lr 0.5, momentum 0.9
    x1, m1 = momentum_step(x, a, m, lr=0.5, momentum=0.9)
    # Assert: m = [0.5, -1]; x = [1 - 0.25, 2 + 0.5]
    assert m1.tolist() == [0.5, -1.0]
    assert x1.tolist() == [0.75, 2.5]
    # round 2: a = [0.25, 3.5]: g = [0.5, -1]; m = 0.9 * [0.5, -1] + [0.5, -1] = [0.95, -1.9]
    x2, m2 = momentum_step(x1, _t(0.25, 3.5), m1, lr=0.5, momentum=0.9)
    assert m2.tolist() == pytest.approx([0.95, -1.9], abs=1e-15)
    assert x2.tolist() == pytest.approx([0.75 - 0.475, 2.5 + 0.95], abs=1e-15)


def test_momentum_zero_and_lr_one_is_the_aggregate():
    x, a = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x1, _ = momentum_step(x, a, torch.zeros(5, dtype=torch.float64), lr=1.0, momentum=0.0)
    assert torch.allclose(x1, a, atol=1e-15)


# x = [1, 0], a = [0, 2]: g = [1, -2]; beta1 0.9, beta2 0.99, tau 0.1, eta 0.1; m0 = 0, v0 = tau^2 = 0.01
G = (1.0, -2.0)
M1 = (0.1 * 1.0, 0.1 * -2.0)  # (1 - beta1) * g
V1 = {
    "adagrad": (0.01 + 1.0, 0.01 + 4.0),
    "adam": (0.99 * 0.01 + 0.01 * 1.0, 0.99 * 0.01 + 0.01 * 4.0),
    # yogi: v - (1 - beta2) g^2 sign(v - g^2), and v < g^2: v + 0.01 g^2
    "yogi": (0.01 + 0.01 * 1.0, 0.01 + 0.01 * 4.0),
}


@pytest.mark.parametrize("rule", ["adagrad", "adam", "yogi"])
def test_adaptive_first_round_by_hand(rule):
    x, a = _t(1.0, 0.0), _t(0.0, 2.0)
    v0 = initial_second_moment(x, 0.1)
    assert v0.tolist() == pytest.approx([0.01, 0.01])
    x1, m1, v1 = adaptive_step(x, a, torch.zeros_like(x), v0, rule=rule, lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    assert m1.tolist() == pytest.approx(M1, abs=1e-15)
    assert v1.tolist() == pytest.approx(V1[rule], abs=1e-15)
    expected = [xi - 0.1 * mi / (math.sqrt(vi) + 0.1) for xi, mi, vi in zip((1.0, 0.0), M1, V1[rule])]
    assert x1.tolist() == pytest.approx(expected, abs=1e-14)


def test_yogi_decreases_v_where_it_exceeds_g_squared():
    # v = 5 > g^2 = 1: v - 0.01 * 1 * sign(4) = 4.99 (Adam would give 0.99*5 + 0.01 = 4.96)
    _, _, v = adaptive_step(_t(1.0), _t(0.0), _t(0.0), _t(5.0), rule="yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    assert v.tolist() == pytest.approx([4.99], abs=1e-15)


def test_a_mask_leaves_the_aggregate_and_the_moments_of_untrained_positions():
    x, a = _t(1.0, 1.0), _t(0.0, 7.0)
    m, v = _t(0.3, 0.4), _t(0.5, 0.6)
    mask = torch.tensor([True, False])
    x1, m1, v1 = adaptive_step(x, a, m, v, rule="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1, mask=mask)
    assert x1[1].item() == 7.0 and m1[1].item() == 0.4 and v1[1].item() == 0.6
    assert m1[0].item() == pytest.approx(0.9 * 0.3 + 0.1 * 1.0)
    x2, m2 = momentum_step(x, a, m, lr=1.0, momentum=0.5, mask=mask)
    assert x2[1].item() == 7.0 and m2[1].item() == 0.4
    assert x2[0].item() == pytest.approx(1.0 - (0.15 + 1.0))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="`server_lr` must be"):
        check_server_options(lr=0.0)
    with pytest.raises(ValueError, match="`beta2` must be in"):
        check_server_options(lr=1.0, beta2=1.0)
    with pytest.raises(ValueError, match="`tau` must be"):
        check_server_options(lr=1.0, tau=0)
    with pytest.raises(ValueError, match="`rule` can be adagrad, adam, yogi"):
        adaptive_step(_t(1.0), _t(0.0), _t(0.0), _t(1.0), rule="sgd", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
