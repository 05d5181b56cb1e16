"""Aggregation math on small cases computed by hand (Prepare / Execute / Assert)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedprune.core.aggregation import (
    fednova_aggregate,
    fednova_coefficient,
    normalize_weights,
    scaffold_update,
    state_add,
    state_sub,
    weighted_average,
)
from lightning_fedprune.core.control_variates import scaffold_client_update

f64 = torch.float64


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=f64)


# ----------------------------------------------------------------------------- normalize_weights


def test_normalize_weights_by_hand():
    assert normalize_weights([1, 3]) == [0.25, 0.75]
    assert normalize_weights([0, 2]) == [0.0, 1.0]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([], "cannot aggregate zero clients"),
        ([1.0, -1.0], r"must be finite and >= 0, got \[1.0, -1.0\]"),
        ([1.0, float("nan")], "must be finite and >= 0"),
        ([float("inf")], "must be finite and >= 0"),
        ([0, 0], "sum to 0.0; at least one must be positive"),
    ],
)
def test_normalize_weights_errors(weights, message):
    with pytest.raises(ValueError, match=message):
        normalize_weights(weights)


# ----------------------------------------------------------------------------- weighted_average


def test_weighted_average_two_clients_weights_1_and_3():
    # Prepare: p = (1/4, 3/4)
    a = {"w": _t(1.0, 2.0), "n": torch.tensor([1, 4], dtype=torch.int64)}
    b = {"w": _t(5.0, 10.0), "n": torch.tensor([2, 8], dtype=torch.int64)}
    # Execute
    out = weighted_average([a, b], [1, 3])
    # Assert: w = 0.25*[1, 2] + 0.75*[5, 10] = [0.25 + 3.75, 0.5 + 7.5] = [4, 8]
    assert torch.equal(out["w"], _t(4.0, 8.0))
    # int buffer: 0.25*1 + 0.75*2 = 1.75 -> 2 ; 0.25*4 + 0.75*8 = 7 -> 7, dtype kept
    assert out["n"].dtype == torch.int64
    assert torch.equal(out["n"], torch.tensor([2, 7]))


def test_weighted_average_keeps_float_dtype_and_restricts_keys():
    a = {"w": torch.tensor([2.0], dtype=torch.float32), "skip": torch.zeros(1)}
    b = {"w": torch.tensor([4.0], dtype=torch.float32), "skip": torch.zeros(1)}
    out = weighted_average([a, b], [1, 1], keys=["w"])
    assert list(out) == ["w"]
    assert out["w"].dtype == torch.float32 and out["w"].item() == 3.0


def test_weighted_average_does_not_modify_inputs():
    a, b = {"w": _t(1.0)}, {"w": _t(3.0)}
    weighted_average([a, b], [1, 1])
    assert a["w"].item() == 1.0 and b["w"].item() == 3.0


def test_weighted_average_length_mismatch():
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        weighted_average([{"w": _t(1.0)}, {"w": _t(2.0)}], [1])


# ----------------------------------------------------------------------------- state_sub / add


def test_state_sub_and_add_by_hand():
    a = {"w": _t(3.0, 5.0), "n": torch.tensor(4)}
    b = {"w": _t(1.0, 1.0), "n": torch.tensor(1)}
    diff = state_sub(a, b)
    assert torch.equal(diff["w"], _t(2.0, 4.0))
    assert diff["n"].item() == 4  # non-floating tensors are copied from a
    summed = state_add(a, {"w": _t(1.0, 2.0)}, alpha=-2.0)
    assert torch.equal(summed["w"], _t(1.0, 1.0))
    assert summed["n"].item() == 4


# ----------------------------------------------------------------------------- FedNova


def test_fednova_coefficient_plain_sgd_is_tau():
    assert fednova_coefficient(5, 0.0) == 5.0
    assert fednova_coefficient(0) == 0.0


def test_fednova_coefficient_with_momentum_by_hand():
    # a = sum_{j=1..5} (1 - 0.9**j) / 0.1 = 1 + 1.9 + 2.71 + 3.439 + 4.0951 = 13.1441
    assert fednova_coefficient(5, 0.9) == pytest.approx(13.1441, abs=1e-12)
    # closed form (5 - 0.9 * (1 - 0.59049) / 0.1) / 0.1 = (5 - 3.68559) / 0.1
    assert fednova_coefficient(5, 0.9) == pytest.approx((5 - 3.68559) / 0.1, abs=1e-12)


@pytest.mark.parametrize(
    ("steps", "momentum", "message"),
    [(-1, 0.0, "num_steps must be >= 0, got -1"), (3, 1.0, r"momentum must be in \[0, 1\), got 1.0"), (3, -0.1, "momentum")],
)
def test_fednova_coefficient_errors(steps, momentum, message):
    with pytest.raises(ValueError, match=message):
        fednova_coefficient(steps, momentum)


def test_fednova_aggregate_scalar_by_hand():
    # Prepare: x = 1; client A: tau 2, y = 0.6, weight 1; client B: tau 4, y = 0.0, weight 3
    x = {"w": _t(1.0)}
    ys = [{"w": _t(0.6)}, {"w": _t(0.0)}]
    # Execute
    out = fednova_aggregate(x, ys, [1, 3], [2.0, 4.0])
    half = fednova_aggregate(x, ys, [1, 3], [2.0, 4.0], server_lr=0.5)
    # Assert: p = (0.25, 0.75); d_A = 0.4 / 2 = 0.2; d_B = 1.0 / 4 = 0.25
    # tau_eff = 0.25*2 + 0.75*4 = 3.5; sum p d = 0.05 + 0.1875 = 0.2375
    # x_new = 1 - 3.5 * 0.2375 = 0.16875 (FedAvg would give 0.15)
    assert out["w"].item() == pytest.approx(0.16875, abs=1e-12)
    assert half["w"].item() == pytest.approx(1 - 0.5 * 0.83125, abs=1e-12)


def test_fednova_leaves_out_clients_without_steps():
    x = {"w": _t(1.0)}
    ys = [{"w": _t(0.6)}, {"w": _t(0.0)}, {"w": _t(-100.0)}]
    out = fednova_aggregate(x, ys, [1, 3, 50], [2.0, 4.0, 0.0])
    assert out["w"].item() == pytest.approx(0.16875, abs=1e-12)
    with pytest.raises(ValueError, match="at least one client with local steps > 0"):
        fednova_aggregate(x, ys[:1], [1], [0.0])
    with pytest.raises(ValueError, match="same length"):
        fednova_aggregate(x, ys, [1, 3], [2.0, 4.0, 1.0])


def test_fednova_with_equal_tau_equals_fedavg():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(4, 3, generator=gen, dtype=f64), "n": torch.tensor(10)}
    ys = [{"w": torch.randn(4, 3, generator=gen, dtype=f64), "n": torch.tensor(10 + k)} for k in (2, 4, 9)]
    weights = [10, 20, 45]
    # Execute
    nova = fednova_aggregate(x, ys, weights, [3.0, 3.0, 3.0])
    avg = weighted_average(ys, weights)
    # Assert
    torch.testing.assert_close(nova["w"], avg["w"], rtol=0, atol=1e-12)
    assert torch.equal(nova["n"], avg["n"])  # (12*10 + 14*20 + 19*45)/75 = 16.73 -> 17
    assert nova["n"].item() == 17


# ----------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_update_by_hand_two_of_four_clients():
    # Prepare
    x = {"w": _t(1.0, 2.0), "n": torch.tensor(10)}
    c = {"w": _t(0.1, -0.1)}
    dys = [{"w": _t(0.2, -0.4), "n": torch.tensor(2)}, {"w": _t(0.4, 0.0), "n": torch.tensor(4)}]
    dcs = [{"w": _t(0.8, 0.4)}, {"w": _t(-0.4, 1.2)}]
    # Execute
    new_x, new_c = scaffold_update(x, c, dys, dcs, num_clients_total=4)
    new_x_half, _ = scaffold_update(x, c, dys, dcs, num_clients_total=4, server_lr=0.5)
    # Assert: x + mean(dy) = [1 + 0.3, 2 - 0.2]; c + sum(dc) / N = [0.1 + 0.4/4, -0.1 + 1.6/4]
    torch.testing.assert_close(new_x["w"], _t(1.3, 1.8), rtol=0, atol=1e-12)
    torch.testing.assert_close(new_c["w"], _t(0.2, 0.3), rtol=0, atol=1e-12)
    torch.testing.assert_close(new_x_half["w"], _t(1.15, 1.9), rtol=0, atol=1e-12)
    # integer tensors: mean of x + dy_i = (12 + 14) / 2 = 13
    assert new_x["n"].dtype == torch.int64 and new_x["n"].item() == 13
    # inputs untouched
    assert torch.equal(x["w"], _t(1.0, 2.0)) and torch.equal(c["w"], _t(0.1, -0.1))


def test_scaffold_update_errors():
    x, c = {"w": _t(1.0)}, {"w": _t(0.0)}
    with pytest.raises(ValueError, match="one weight delta and one control delta per participating client"):
        scaffold_update(x, c, [], [], num_clients_total=4)
    with pytest.raises(ValueError, match="one weight delta and one control delta"):
        scaffold_update(x, c, [x], [c, c], num_clients_total=4)
    with pytest.raises(ValueError, match=r"num_clients_total \(1\) is smaller than the participants \(2\)"):
        scaffold_update(x, c, [x, x], [c, c], num_clients_total=1)


def test_scaffold_client_update_by_hand():
    # c_i+ = c_i - c + (x - y) / (K * lr) = 0.5 - 0.2 + 0.4 / (4 * 0.1) = 1.3
    out = scaffold_client_update(_t(0.5), _t(0.2), _t(1.0), _t(0.6), num_steps=4, lr=0.1)
    assert out.item() == pytest.approx(1.3, abs=1e-12)


@pytest.mark.parametrize(("steps", "lr"), [(0, 0.1), (4, 0.0)])
def test_scaffold_client_update_without_steps_keeps_c_i(steps, lr):
    c_i = _t(0.5, -1.0)
    out = scaffold_client_update(c_i, _t(0.2, 0.2), _t(1.0, 1.0), _t(0.6, 0.6), num_steps=steps, lr=lr)
    assert torch.equal(out, c_i) and out is not c_i
