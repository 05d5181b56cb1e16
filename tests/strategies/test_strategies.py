"""Server strategies as pure objects: sampling, task building, aggregation, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.core.messages import ClientMetrics, ClientResult, decode_task, encode_task
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.strategies import STRATEGIES, FedAvg, FedNova, FedProx, ModelSpec, Scaffold, sample_clients

f64 = torch.float64


def _spec() -> ModelSpec:
    return ModelSpec(
        state={"w": torch.tensor([1.0, 2.0], dtype=f64), "n": torch.tensor(10, dtype=torch.int64)},
        trainable=("w",),
    )


def _result(cid: int, w: list[float], n: int, *, samples: int, steps: int = 1, rnd: int = 0, extras=None, **m) -> ClientResult:
    return ClientResult(
        round=rnd,
        client_id=cid,
        weights={"w": torch.tensor(w, dtype=f64), "n": torch.tensor(n, dtype=torch.int64)},
        metrics=ClientMetrics(num_samples=samples, num_steps=steps, **m),
        extras=extras or {},
    )


# ----------------------------------------------------------------------------- sampling


def test_sample_clients_is_deterministic_per_seed_and_round():
    avail = list(range(20))
    a = sample_clients(avail, fraction=0.25, min_clients=1, seed=7, rnd=3)
    assert a == sample_clients(list(reversed(avail)), fraction=0.25, min_clients=1, seed=7, rnd=3)
    assert len(a) == 5 and a == sorted(a) and len(set(a)) == 5
    others = [sample_clients(avail, fraction=0.25, min_clients=1, seed=s, rnd=r) for s, r in ((8, 3), (7, 4), (7, 5))]
    assert any(o != a for o in others)


def test_sample_clients_fraction_and_min_clients():
    avail = [3, 9, 12, 40, 41, 50, 51, 52, 60, 77]
    picked = sample_clients(avail, fraction=0.3, min_clients=1, seed=0, rnd=0)
    assert len(picked) == 3 and set(picked) <= set(avail) and picked == sorted(picked)
    assert len(sample_clients(avail, fraction=0.1, min_clients=4, seed=0, rnd=0)) == 4
    assert sample_clients(avail, fraction=1.0, min_clients=1, seed=0, rnd=0) == avail
    assert sample_clients([5, 1, 3], fraction=0.1, min_clients=10, seed=0, rnd=0) == [1, 3, 5]
    assert sample_clients([], fraction=0.5, min_clients=2, seed=0, rnd=0) == []


# ----------------------------------------------------------------------------- lifecycle / tasks


def test_global_state_needs_initialize():
    with pytest.raises(RuntimeError, match="FedAvg is not initialized: call initialize"):
        FedAvg().global_state


def test_initialize_copies_the_state_and_checks_num_clients():
    spec = _spec()
    s = FedAvg()
    s.initialize(spec, num_clients=4)
    spec.state["w"] += 100
    assert torch.equal(s.global_state["w"], torch.tensor([1.0, 2.0], dtype=f64))
    with pytest.raises(ConfigError, match="num_clients must be >= 1, got 0"):
        FedAvg().initialize(_spec(), num_clients=0)


def test_model_spec_rejects_unknown_trainable_names():
    with pytest.raises(ConfigError, match=r"trainable names \['nope'\] are not in the model state"):
        ModelSpec(state={"w": torch.zeros(1)}, trainable=("w", "nope"))


def test_configure_round_builds_one_task_per_sampled_client():
    s = FedAvg(fraction_fit=0.5, seed=3, local_epochs=2)
    s.initialize(_spec(), num_clients=6)
    tasks = s.configure_round(4, [0, 1, 2, 3, 4, 5])
    assert [t.client_id for t in tasks] == s.sample(4, range(6))
    assert len(tasks) == 3
    for t in tasks:
        assert t.round == 4 and t.local_epochs == 2 and t.local_steps is None
        assert torch.equal(t.weights["w"], s.global_state["w"]) and t.extras == {} and t.config == {}


def test_local_steps_replace_epochs():
    s = FedAvg(local_steps=7)
    s.initialize(_spec(), num_clients=1)
    (t,) = s.configure_round(0, [0])
    assert (t.local_epochs, t.local_steps) == (None, 7)


def test_local_epochs_range_draws_seeded_epochs_in_range():
    s = FedAvg(local_epochs_range=(1, 4), seed=1)
    s.initialize(_spec(), num_clients=30)
    epochs = [t.local_epochs for t in s.configure_round(2, range(30))]
    assert set(epochs) <= {1, 2, 3, 4} and len(set(epochs)) > 1
    assert epochs == [t.local_epochs for t in s.configure_round(2, range(30))]


# ----------------------------------------------------------------------------- FedAvg.aggregate


def test_fedavg_aggregate_is_the_sample_weighted_average():
    # Prepare
    s = FedAvg()
    s.initialize(_spec(), num_clients=2)
    results = [
        _result(0, [1.0, 2.0], 11, samples=10, loss_before=2.0, loss_after=1.0),
        _result(1, [5.0, 6.0], 15, samples=30, loss_before=4.0, loss_after=float("nan")),
    ]
    # Execute
    metrics = s.aggregate(0, results, [])
    # Assert: p = (10/40, 30/40) -> [0.25 + 3.75, 0.5 + 4.5] = [4, 5]; n: 2.75 + 11.25 = 14
    assert torch.equal(s.global_state["w"], torch.tensor([4.0, 5.0], dtype=f64))
    assert s.global_state["n"].item() == 14 and s.global_state["n"].dtype == torch.int64
    assert metrics["num_results"] == 2.0
    assert metrics["train_loss_before"] == pytest.approx(0.25 * 2.0 + 0.75 * 4.0)
    assert metrics["train_loss_after"] == pytest.approx(1.0)  # the NaN loss is left out


def test_fedavg_unweighted_averages_equally():
    s = FedAvg(weighted=False)
    s.initialize(_spec(), num_clients=2)
    s.aggregate(0, [_result(0, [1.0, 2.0], 10, samples=10), _result(1, [5.0, 6.0], 10, samples=30)], [])
    assert torch.equal(s.global_state["w"], torch.tensor([3.0, 4.0], dtype=f64))


def test_aggregate_without_results_leaves_the_state_unchanged():
    for s in (FedAvg(), FedNova(), Scaffold()):
        s.initialize(_spec(), num_clients=3)
        before = {k: v.clone() for k, v in s.global_state.items()}
        assert s.aggregate(0, [], []) == {"num_results": 0.0}
        assert all(torch.equal(before[k], s.global_state[k]) for k in before)


# ----------------------------------------------------------------------------- FedProx


def test_fedprox_tasks_carry_mu_and_ask_for_the_callback():
    s = FedProx(mu=0.05, fraction_fit=1.0)
    s.initialize(_spec(), num_clients=3)
    tasks = s.configure_round(0, [0, 1, 2])
    assert [t.config for t in tasks] == [{"prox_mu": 0.05}] * 3
    assert FedProx.client_callbacks == ("fedprox",)


# ----------------------------------------------------------------------------- FedNova


def test_fednova_aggregate_and_tau_eff_by_hand():
    # Prepare: the scalar case of test_fednova_aggregate_scalar_by_hand, through the strategy
    s = FedNova()
    s.initialize(ModelSpec(state={"w": torch.tensor([1.0], dtype=f64)}, trainable=("w",)), num_clients=3)
    results = [
        ClientResult(0, 0, {"w": torch.tensor([0.6], dtype=f64)}, ClientMetrics(num_samples=10, num_steps=2)),
        ClientResult(0, 1, {"w": torch.tensor([0.0], dtype=f64)}, ClientMetrics(num_samples=30, num_steps=4)),
        ClientResult(0, 2, {"w": torch.tensor([-9.0], dtype=f64)}, ClientMetrics(num_samples=30, num_steps=0)),
    ]
    # Execute
    metrics = s.aggregate(0, results, [])
    # Assert: tau_eff = 0.25*2 + 0.75*4 = 3.5, x_new = 1 - 3.5 * 0.2375 = 0.16875 (client 2 did no step)
    assert metrics["tau_eff"] == pytest.approx(3.5)
    assert metrics["num_results"] == 2.0
    assert s.global_state["w"].item() == pytest.approx(0.16875, abs=1e-12)


def test_fednova_tau_eff_with_momentum():
    s = FedNova(momentum=0.9)
    s.initialize(ModelSpec(state={"w": torch.tensor([1.0], dtype=f64)}, trainable=("w",)), num_clients=1)
    metrics = s.aggregate(0, [ClientResult(0, 0, {"w": torch.tensor([0.5], dtype=f64)}, ClientMetrics(num_samples=4, num_steps=5))], [])
    assert metrics["tau_eff"] == pytest.approx(13.1441)
    # one client: x - tau_eff * (x - y) / a = y whatever a is
    assert s.global_state["w"].item() == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------- SCAFFOLD


def _scaffold(num_clients: int = 4) -> Scaffold:
    s = Scaffold(seed=0)
    s.initialize(_spec(), num_clients=num_clients)
    return s


def test_scaffold_sends_control_for_trainable_tensors_only():
    s = _scaffold()
    (task,) = s.configure_round(0, [2])
    assert set(task.extras) == {"scaffold.c/w"}
    assert torch.equal(task.extras["scaffold.c/w"], torch.zeros(2, dtype=f64))
    w_spec, x_spec = s.expected_result(task)
    assert w_spec == {"w": ((2,), f64), "n": ((), torch.int64)}
    assert x_spec == {"scaffold.dc/w": ((2,), f64)}
    assert Scaffold.client_callbacks == ("scaffold",)


def test_scaffold_aggregate_by_hand():
    # Prepare: x = [1, 2], c = 0, N = 4, two participants
    s = _scaffold(num_clients=4)
    results = [
        _result(0, [1.2, 1.6], 12, samples=1, extras={"scaffold.dc/w": torch.tensor([0.8, 0.4], dtype=f64)}),
        _result(1, [1.4, 2.0], 14, samples=99, extras={"scaffold.dc/w": torch.tensor([-0.4, 1.2], dtype=f64)}),
    ]
    # Execute
    metrics = s.aggregate(0, results, [])
    # Assert: x + mean(dy) = [1.3, 1.8] (equal weights, sample counts ignored); c = [0.4, 1.6] / 4
    torch.testing.assert_close(s.global_state["w"], torch.tensor([1.3, 1.8], dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.control["w"], torch.tensor([0.1, 0.4], dtype=f64), rtol=0, atol=1e-12)
    assert metrics["control_norm"] == pytest.approx(math.sqrt(0.1**2 + 0.4**2))
    # integer buffers are averaged like FedAvg with equal weights: (12 + 14) / 2 = 13
    assert s.global_state["n"].item() == 13
    # the next tasks carry the new control variate
    (task,) = s.configure_round(1, [3])
    assert torch.equal(task.extras["scaffold.c/w"], s.control["w"])


def test_scaffold_state_dict_round_trip_into_a_fresh_strategy():
    # Prepare
    s = _scaffold(num_clients=4)
    s.aggregate(0, [_result(0, [0.5, 0.5], 20, samples=1, extras={"scaffold.dc/w": torch.tensor([2.0, -2.0], dtype=f64)})], [])
    # Execute: through bytes, as a checkpoint would
    fresh = Scaffold(seed=0)
    fresh.initialize(ModelSpec(state={"w": torch.zeros(2, dtype=f64), "n": torch.tensor(0)}, trainable=("w",)), num_clients=4)
    fresh.load_state_dict(loads_state(dumps_state(s.state_dict())))
    # Assert
    for k in s.global_state:
        assert torch.equal(fresh.global_state[k], s.global_state[k])
    assert torch.equal(fresh.control["w"], torch.tensor([0.5, -0.5], dtype=f64))
    assert fresh.num_clients == 4 and fresh._trainable == ("w",)
    t_old, t_new = s.configure_round(1, [0, 1, 2, 3]), fresh.configure_round(1, [0, 1, 2, 3])
    assert [t.client_id for t in t_old] == [t.client_id for t in t_new]
    assert all(torch.equal(a.extras["scaffold.c/w"], b.extras["scaffold.c/w"]) for a, b in zip(t_old, t_new))


def test_fedavg_state_dict_round_trip():
    s = FedAvg()
    s.initialize(_spec(), num_clients=5)
    s.aggregate(0, [_result(0, [7.0, 8.0], 3, samples=1)], [])
    fresh = FedAvg()
    fresh.load_state_dict(loads_state(dumps_state(s.state_dict())))
    assert torch.equal(fresh.global_state["w"], torch.tensor([7.0, 8.0], dtype=f64))
    assert fresh.global_state["n"].item() == 3 and fresh.num_clients == 5


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: FedAvg(fraction_fit=0.0), r"`fraction_fit` must be in \(0, 1\], got 0.0"),
        (lambda: FedAvg(fraction_fit=1.5), r"`fraction_fit` must be in \(0, 1\], got 1.5"),
        (lambda: FedAvg(min_fit_clients=0), "`min_fit_clients` must be >= 1, got 0"),
        (lambda: FedAvg(local_epochs=0), "`local_epochs` must be a positive int, got 0"),
        (lambda: FedAvg(local_epochs=None), "set exactly one of `local_epochs` and `local_steps`"),
        (lambda: FedAvg(local_steps=0), "`local_steps` must be a positive int, got 0"),
        (lambda: FedAvg(local_epochs=1.5), "`local_epochs` must be a positive int, got 1.5"),
        (lambda: FedAvg(local_epochs=True), "`local_epochs` must be a positive int, got True"),
        (lambda: FedAvg(local_epochs_range=(3, 2)), r"`local_epochs_range` must be \(lo, hi\) with 1 <= lo <= hi, got \(3, 2\)"),
        (lambda: FedAvg(local_epochs_range=(0, 2)), "`local_epochs_range` must be"),
        (lambda: FedProx(mu=-0.1), "`mu` must be a finite number >= 0, got -0.1"),
        (lambda: FedProx(mu=float("nan")), "`mu` must be a finite number >= 0, got nan"),
        (lambda: FedProx(mu=0.1, fraction_fit=2.0), "`fraction_fit`"),
        (lambda: FedNova(momentum=1.0), r"`momentum` must be in \[0, 1\), got 1.0"),
        (lambda: FedNova(server_lr=0.0), "`server_lr` must be > 0, got 0.0"),
        (lambda: Scaffold(server_lr=-1.0), "`server_lr` must be > 0, got -1.0"),
    ],
)
def test_invalid_arguments_raise_config_error(factory, message):
    with pytest.raises(ConfigError, match=message):
        factory()


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        FedAvg(fraction_fit=0.0)


def test_strategy_registry_names():
    from lightning_fedprune.strategies import FedMP, FlexCom, UniformPruning

    expected = {"fedavg": FedAvg, "fedprox": FedProx, "fednova": FedNova, "scaffold": Scaffold,
                "fedmp": FedMP, "upfl": UniformPruning, "flexcom": FlexCom}
    assert {k: v for k, v in STRATEGIES.items() if k in expected} == expected


def test_fedprox_tasks_survive_the_wire_with_their_local_work_and_mu():
    s = FedProx(mu=0.25, local_steps=3)
    s.initialize(_spec(), num_clients=2)
    for t in s.configure_round(0, [0, 1]):
        back = decode_task(encode_task(t), expect_round=0, expect_client=t.client_id)
        assert (back.local_epochs, back.local_steps, back.config) == (None, 3, {"prox_mu": 0.25})
        assert all(torch.equal(back.weights[k], v) for k, v in t.weights.items())
