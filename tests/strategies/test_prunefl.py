"""The PruneFL strategy: initial pruning, packed tasks, masked averaging, federated pruning, resume."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.callbacks.masking import MaskingCallback
from lightning_fedprune.core.masks import MaskSet, init_prune, kept_after_levels, magnitude_prune, random_prune
from lightning_fedprune.core.messages import ClientMetrics, ClientResult, tensor_spec
from lightning_fedprune.core.seeding import derive_seed
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.core.sparse import COO_INDICES, MASK_BITS, pack_state, unpack_state
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import FedAvg, ModelSpec
from lightning_fedprune.strategies.prunefl import PruneFL

KEYS = ("w1.weight", "w1.bias", "w2.weight", "w2.bias")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w1.weight": torch.randn(20, 30, generator=gen),
        "w1.bias": torch.randn(20, generator=gen),
        "w2.weight": torch.randn(4, 20, generator=gen),
        "w2.bias": torch.randn(4, generator=gen),
    }


def _init(strategy: PruneFL, state: dict[str, torch.Tensor] | None = None, num_clients: int = 3) -> PruneFL:
    state = state if state is not None else _state()
    strategy.initialize(ModelSpec(state={k: v.clone() for k, v in state.items()}, trainable=KEYS), num_clients=num_clients)
    return strategy


def _result(strategy: PruneFL, rnd: int, cid: int, state: dict[str, torch.Tensor], n: int, masks: MaskSet | None = None) -> ClientResult:
    masks = masks if masks is not None else strategy.masks
    return ClientResult(round=rnd, client_id=cid, weights=pack_state(state, masks), metrics=ClientMetrics(num_samples=n, num_steps=1))


RATES = {"fc_rates": (0.3, 0.2)}


# ----------------------------------------------------------------------------- initial pruning


@pytest.mark.parametrize("method", ["init", "random"])
def test_sample_less_initial_pruning(method):
    s = _init(PruneFL(initial_pruning=method, initial_level=3, seed=7, **RATES))
    state = _state()
    rates = {"w1.weight": 0.3, "w2.weight": 0.2}
    expected = init_prune(state, rates, 3) if method == "init" else random_prune(state, rates, seed=derive_seed(7, "prunefl-random"), levels=3)
    assert s.rates == rates
    assert s.masks.equal(expected)
    assert s.masks.num_kept("w1.weight") == kept_after_levels(600, 0.3, 3)[-1]
    g = s.global_state
    assert torch.equal(g["w1.weight"], state["w1.weight"] * expected.masks["w1.weight"])
    assert torch.equal(g["w1.bias"], state["w1.bias"])  # biases are never pruned
    kept = expected.num_kept() + 24
    assert s.params_remaining() == pytest.approx(kept / 704)


def test_sample_based_masks_are_taken_and_validated():
    masks = magnitude_prune(_state(1), {"w1.weight": 0.5}, levels=2)
    s = _init(PruneFL(initial_pruning="sample", initial_masks=masks.to_json(), **RATES))
    assert s.level == 2 and s.initial_level == 2
    assert torch.equal(s.masks.masks["w1.weight"], masks.masks["w1.weight"])
    assert bool(s.masks.masks["w2.weight"].all())  # a layer the masks leave out starts unpruned
    bad = MaskSet({"w1.weight": torch.ones(20, 31, dtype=torch.bool)}, 1)
    with pytest.raises(ConfigError, match=r"mask of layer 'w1.weight' has shape \(20, 31\), the model's weight has shape \(20, 30\)"):
        _init(PruneFL(initial_pruning="sample", initial_masks=bad, **RATES))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_pruning": "magnitude"}, r"`initial_pruning` can be none, sample, init, random; got 'magnitude'"),
        ({"initial_pruning": "sample"}, r"needs `initial_masks` \(the masks of the server-side pruning\) or the `initial_level`.*HINT"),
        ({"initial_pruning": "sample", "initial_level": 2, "sample_size": 0}, r"`sample_size` must be an int >= 1"),
        ({"initial_pruning": "none", "initial_level": 3}, r"`initial_level` is 3 but `initial_pruning` is 'none'"),
        ({"initial_pruning": "init", "initial_level": 5, "target_level": 2}, r"`target_level` must be an int >= initial_level \(5\)"),
        ({"fc_rates": (0.2, 1.0)}, r"pruning rate of layer 'fc_rates\[1\]' must be a number in \[0, 1\), got 1.0"),
        ({"rates": {"w1.weight": -0.5}}, r"pruning rate of layer 'w1.weight'"),
        ({"prune_every": 0}, r"`prune_every` must be an int >= 1"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneFL(**kwargs)


def test_sample_based_without_server_pruning_fails_at_initialize():
    s = PruneFL(initial_pruning="sample", initial_level=2, **RATES)
    assert s.needs_server_pruning
    with pytest.raises(ConfigError, match=r"no server-side pruning has run.*HINT: call .*run_server_pruning"):
        _init(s)
    with pytest.raises(ConfigError, match=r"`initial_level` is 2 but the masks are at level 1"):
        PruneFL(initial_pruning="sample", initial_level=2, **RATES).set_initial_masks(magnitude_prune(_state(), {"w1.weight": 0.5}))
    with pytest.raises(ConfigError, match=r"initial masks are for initial_pruning='sample'"):
        PruneFL(initial_pruning="init", initial_level=1, **RATES).set_initial_masks(magnitude_prune(_state(), {"w1.weight": 0.5}))


def test_impossible_levels_and_unknown_layers_fail_at_initialize_naming_the_layer():
    with pytest.raises(ConfigError, match=r"would remove every weight of layer 'w2.weight'"):
        _init(PruneFL(initial_pruning="init", initial_level=1, target_level=40, fc_rates=(0.1, 0.6)))
    with pytest.raises(ConfigError, match=r"`rates` names layer 'w3.weight'"):
        _init(PruneFL(rates={"w3.weight": 0.1}, **RATES))
    with pytest.raises(ConfigError, match=r"`fc_rates` has 3 values but the model has 2 fully connected layers"):
        _init(PruneFL(initial_pruning="init", initial_level=1))


# ----------------------------------------------------------------------------- rounds


def test_tasks_carry_the_packed_model_and_results_must_match_it():
    s = _init(PruneFL(initial_pruning="init", initial_level=4, **RATES))
    tasks = s.configure_round(0, [0, 1, 2])
    assert [t.client_id for t in tasks] == [0, 1, 2]
    t = tasks[0]
    assert t.config == {"weights_format": "coo", "prunefl_level": 4}
    # w1 (24% kept, b = 8): COO; w2 (41% kept, b = 8: 1.5 * 0.41 < 1): COO as well
    assert "w1.weight" + COO_INDICES in t.weights and "w2.weight" + COO_INDICES in t.weights
    assert "w1.weight" not in t.weights
    full = unpack_state(t.weights, {k: v.shape for k, v in s.global_state.items()})
    for k, v in s.global_state.items():
        assert torch.equal(full[k], v), k
    assert s.expected_result(t) == (tensor_spec(t.weights), None)
    # without sparse payloads every pruned layer goes dense with a bit mask
    d = _init(PruneFL(initial_pruning="init", initial_level=4, sparse_payload=False, **RATES))
    assert "w1.weight" + MASK_BITS in d.configure_round(0, [0])[0].weights


def test_aggregation_averages_unpruned_positions_and_rejects_foreign_masks():
    # Prepare
    s = _init(PruneFL(initial_pruning="init", initial_level=2, **RATES))
    m = s.masks
    a = {k: v + 1.0 for k, v in s.global_state.items()}
    b = {k: v - 3.0 for k, v in s.global_state.items()}
    other = MaskSet({k: torch.roll(v, 1, dims=1) for k, v in m.masks.items()}, 2)
    # Execute: weights 1 and 3; a third client kept other positions
    metrics = s.aggregate(0, [_result(s, 0, 0, a, 1), _result(s, 0, 1, b, 3), _result(s, 0, 2, a, 5, masks=other)], [])
    # Assert: (1*(g+1) + 3*(g-3))/4 = g - 2 at kept positions, exactly 0 at pruned ones
    g0 = m.apply(_state())
    for k in KEYS:
        want = g0[k] - 2.0
        if k in m.masks:
            want = want * m.masks[k]
        assert torch.allclose(s.global_state[k], want, atol=1e-6), k
        if k in m.masks:
            assert bool((s.global_state[k][~m.masks[k]] == 0).all())
    assert metrics["num_results"] == 2 and metrics["num_rejected"] == 1
    assert metrics["level"] == 2 and metrics["density"] == pytest.approx(m.density())


def test_federated_pruning_every_x_rounds_until_the_target_level():
    s = _init(PruneFL(initial_pruning="init", initial_level=1, target_level=3, prune_every=2, **RATES))
    levels = []
    for rnd in range(6):
        before = s.masks
        st = {k: v * 1.5 for k, v in s.global_state.items()}  # the clients' "training"
        s.aggregate(rnd, [_result(s, rnd, 0, st, 10)], [])
        if s.level > before.level:
            # pruned from the AGGREGATED model
            assert s.masks.equal(magnitude_prune(before.apply(st), s.rates, masks=before, levels=1))
        levels.append(s.level)
    assert levels == [1, 2, 2, 3, 3, 3]
    assert s.state_dict()["prunefl"]["prune_rounds"] == [1, 3]


def test_reinitialize_resets_remaining_weights_to_their_initial_values():
    init = _state(5)
    trained = _state(6)
    s = _init(PruneFL(initial_pruning="init", initial_level=1, target_level=2, prune_every=1, reinitialize=True, init_state=init, **RATES), trained)
    # the initial pruning already resets to `init_state` (the untrained values)
    assert torch.equal(s.global_state["w1.weight"], init["w1.weight"] * s.masks.masks["w1.weight"])
    st = {k: v * 2.0 for k, v in s.global_state.items()}
    s.aggregate(0, [_result(s, 0, 0, st, 1)], [])
    assert s.level == 2
    for k in KEYS:
        want = init[k] * s.masks.masks[k] if k in s.masks.masks else init[k]
        assert torch.equal(s.global_state[k], want), k
    # without reinitialize the trained values stay
    n = _init(PruneFL(initial_pruning="init", initial_level=1, target_level=2, prune_every=1, **RATES), trained)
    st = {k: v * 2.0 for k, v in n.global_state.items()}
    n.aggregate(0, [_result(n, 0, 0, st, 1)], [])
    assert torch.equal(n.global_state["w1.bias"], trained["w1.bias"] * 2.0)


def test_state_dict_round_trip_resumes_exactly():
    a = _init(PruneFL(initial_pruning="random", initial_level=1, target_level=3, prune_every=1, reinitialize=True, seed=2, **RATES))
    a.aggregate(0, [_result(a, 0, 0, {k: v + 1 for k, v in a.global_state.items()}, 1)], [])
    blob = dumps_state(a.state_dict())
    b = _init(PruneFL(initial_pruning="random", initial_level=1, target_level=3, prune_every=1, reinitialize=True, seed=2, **RATES))
    b.load_state_dict(loads_state(blob))
    assert b.masks.equal(a.masks) and b.level == 2
    for s in (a, b):
        s.aggregate(1, [_result(s, 1, 0, {k: v * 0.5 for k, v in s.global_state.items()}, 1)], [])
    assert a.masks.equal(b.masks) and a.level == b.level == 3
    for k in KEYS:
        assert torch.equal(a.global_state[k], b.global_state[k])


# ----------------------------------------------------------------------------- with the runtime and the engine


def _engine(tiny_module, data, strategy, run_dir=None, sparse=0.5):
    module = tiny_module(lr=0.1, momentum=0.5, seed=0)
    runtime = ClientRuntime(module, data=data, seed=3, callbacks=[MaskingCallback(sparse_fc_max_density=sparse, sparse_fc_min_weights=0)])
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(data.num_clients, seed=0), seed=1, run_dir=run_dir)


def test_engine_runs_prunefl_with_sparse_payloads_both_ways(tiny_module, tiny_data):
    # Prepare: TinyNet 8 -> 16 -> 4, every layer at 50% per level, pruned from level 1 to 3
    strategy = PruneFL(initial_pruning="init", initial_level=1, target_level=3, prune_every=2, fc_rates=0.5, seed=0)
    engine = _engine(tiny_module, tiny_data, strategy)
    dense = _engine(tiny_module, tiny_data, FedAvg(seed=0))
    # Execute
    summary = engine.run(5)
    dense.run(1)
    # Assert: every result was accepted (its packed layout matched the task's exactly)
    assert summary["total_failures"] == 0
    assert [r["agg/level"] for r in engine.history] == [1, 2, 2, 3, 3]
    assert all(r["agg/num_rejected"] == 0 for r in engine.history)
    g = strategy.global_state
    for k, m in strategy.masks.masks.items():
        assert bool((g[k][~m] == 0).all()), k
    # the messages shrink as the level rises, below FedAvg's dense ones (a tiny model: headers weigh)
    for key in ("bytes_down", "bytes_up"):
        assert engine.history[-1][key] < min(engine.history[0][key], dense.history[0][key])
    assert math.isfinite(engine.history[-1]["test_accuracy"])


def test_engine_resume_is_bit_identical(tiny_module, tiny_data, tmp_path):
    def make():
        return PruneFL(initial_pruning="random", initial_level=1, target_level=3, prune_every=1, fc_rates=0.3, seed=4)

    a = _engine(tiny_module, tiny_data, make(), run_dir=tmp_path / "a")
    a.run(4)
    b1 = _engine(tiny_module, tiny_data, make(), run_dir=tmp_path / "b")
    b1.run(2)
    b2 = _engine(tiny_module, tiny_data, make(), run_dir=tmp_path / "b")
    b2.run(4, resume=True)
    assert a.strategy.masks.equal(b2.strategy.masks)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(v, b2.strategy.global_state[k]), k
    assert [r["test_accuracy"] for r in a.history] == [r["test_accuracy"] for r in b2.history]
