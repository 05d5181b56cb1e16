"""FedMP, UP-FL and FlexCom: sub-model tasks, R2SP / BSP by hand, bandit feedback, resume."""

from __future__ import annotations

import dataclasses
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.core.messages import ClientFailure, ClientMetrics, ClientResult, encode_task
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.runtime import ClientRuntime, build_planner
from lightning_fedprune.simulation import DeviceProfile, SimulationEngine, make_devices
from lightning_fedprune.strategies import FedMP, FedProx, FlexCom, ModelSpec, UniformPruning, capability_local_steps


class Hidden3(FederatedModuleMixin, pl.LightningModule):
    """Linear 2 -> 3 -> ReLU -> classifier 3 -> 2: one prunable group of 3 hidden units."""

    federated_example_input_shape = (2,)

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 3)
        self.classifier = nn.Linear(3, 2)
        with torch.no_grad():
            # hidden unit scores (L1 of each body row): unit 0: 3, unit 1: 1, unit 2: 2
            self.body.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -0.5], [-1.0, 1.0]]))
            self.body.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
            self.classifier.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
            self.classifier.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _spec(module) -> ModelSpec:
    return ModelSpec(
        state={k: v.clone() for k, v in module.federated_state().items()},
        trainable=module.trainable_names(),
        planner=build_planner(module),
    )


def _result(task, delta: float, *, samples: int = 10, before: float = 1.0, after: float = 0.5, time: float = 1.0) -> ClientResult:
    """A client 'trained' by adding ``delta`` to every float tensor of its sub-model."""
    weights = {k: v + delta if v.is_floating_point() else v.clone() for k, v in task.weights.items()}
    metrics = ClientMetrics(num_samples=samples, num_steps=1, num_examples=samples, loss_before=before, loss_after=after, compute_seconds=0.1)
    return ClientResult(task.round, task.client_id, weights, metrics, completion_time=time)


# ----------------------------------------------------------------------------- R2SP / BSP by hand


@pytest.mark.parametrize("aggregation", ["r2sp", "bsp"])
def test_submodel_tasks_and_aggregation_by_hand(aggregation):
    # Prepare: client 0 keeps 2 of 3 hidden units (int(3 * (1 - 1/3)) = 2 -> units 0 and 2, the
    # highest L1 scores), client 1 keeps all three
    module = Hidden3()
    strategy = FedMP(fixed_ratios={0: 1 / 3, 1: 0.0}, aggregation=aggregation)
    strategy.initialize(_spec(module), num_clients=2)
    g = {k: v.clone() for k, v in strategy.global_state.items()}
    # Execute
    t0, t1 = strategy.configure_round(0, [0, 1])
    # Assert: the sub-model of client 0 is the index-sliced global model
    assert t0.config["weights_format"] == "submodel" and t0.config["pruning_ratio"] == pytest.approx(1 / 3)
    assert torch.equal(t0.weights["body.weight"], g["body.weight"][[0, 2]])
    assert torch.equal(t0.weights["body.bias"], g["body.bias"][[0, 2]])
    assert torch.equal(t0.weights["classifier.weight"], g["classifier.weight"][:, [0, 2]])
    assert torch.equal(t0.weights["classifier.bias"], g["classifier.bias"])
    assert t1.weights["body.weight"].shape == (3, 2)
    # Execute: both clients add a constant, equal sample counts
    strategy.aggregate(0, [_result(t0, 1.0), _result(t1, 3.0)], [])
    new = strategy.global_state
    # Assert: kept-by-both positions: mean of the trained values; unit 1 only trained by client 1
    pruned_value = g["body.weight"][1] if aggregation == "r2sp" else torch.zeros(2)
    torch.testing.assert_close(new["body.weight"][[0, 2]], g["body.weight"][[0, 2]] + 2.0)
    torch.testing.assert_close(new["body.weight"][1], (pruned_value + g["body.weight"][1] + 3.0) / 2)
    torch.testing.assert_close(new["classifier.bias"], g["classifier.bias"] + 2.0)
    pruned_col = g["classifier.weight"][:, 1] if aggregation == "r2sp" else torch.zeros(2)
    torch.testing.assert_close(new["classifier.weight"][:, 1], (pruned_col + g["classifier.weight"][:, 1] + 3.0) / 2)
    assert strategy._plans == {}


def test_a_result_that_does_not_fit_its_plan_leaves_the_global_model_unchanged():
    module = Hidden3()
    strategy = FedMP(fixed_ratios={0: 1 / 3, 1: 0.0})
    strategy.initialize(_spec(module), num_clients=2)
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    t0, t1 = strategy.configure_round(0, [0, 1])
    good = _result(t0, 1.0)
    bad = _result(t1, 1.0)
    bad.weights["body.weight"] = torch.zeros(2, 2)
    with pytest.raises(PayloadError, match="body.weight"):
        strategy.aggregate(0, [good, bad], [])
    for k, v in before.items():
        assert torch.equal(strategy.global_state[k], v), k
    stranger = ClientResult(0, 7, {}, good.metrics)
    with pytest.raises(PayloadError, match="client 7"):
        strategy.aggregate(0, [stranger], [])


@pytest.mark.parametrize("ratio", [1.0, -0.1, math.nan])
def test_ratios_outside_the_unit_interval_are_refused(ratio):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        FedMP(fixed_ratios={0: ratio})
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        UniformPruning(ratio=ratio)


def test_structured_strategies_need_a_planner():
    module = Hidden3()
    with pytest.raises(ConfigError, match="planner"):
        FedMP().initialize(ModelSpec(state=module.federated_state(), trainable=module.trainable_names()), num_clients=2)


# ----------------------------------------------------------------------------- E-UCB feedback


@pytest.mark.parametrize(
    "reward, progress, expected",
    [
        # printed Eq. 8: 0.5 / |1 - 2| = 0.5 and 0.2 / |3 - 2| = 0.2
        ("printed", None, 0.35),
        # bounded: progress shares 0.5/0.5 = 1 and 0.2/0.5 = 0.4; relative gaps 0.5, fit 0.05/0.5 = 0.1
        ("bounded", "loss_decrease", (1.0 * 0.1 + 0.4 * 0.1) / 2),
        # bounded, the default progress: final losses 0.5 and 0.8 -> shares 1 and 0.5/0.8
        ("bounded", None, (1.0 * 0.1 + 0.625 * 0.1) / 2),
    ],
)
def test_fedmp_rewards_each_worker_and_forgets_failed_ones(reward, progress, expected):
    module = Hidden3()
    strategy = FedMP(seed=3, reward=reward, progress=progress)
    strategy.initialize(_spec(module), num_clients=3)
    tasks = strategy.configure_round(0, [0, 1, 2])
    ratios = {t.client_id: t.config["pruning_ratio"] for t in tasks}
    assert all(0.0 <= r < 1.0 for r in ratios.values())
    # client 2 fails; 0 and 1 report times 1 s and 3 s (mean 2 s) and loss drops 0.5 and 0.2
    results = [_result(tasks[0], 0.1, before=1.0, after=0.5, time=1.0), _result(tasks[1], 0.1, before=1.0, after=0.8, time=3.0)]
    metrics = strategy.aggregate(0, results, [ClientFailure(0, 2, "dropout", "gone")])
    assert metrics["reward_mean"] == pytest.approx(expected)
    assert metrics["time_mean"] == pytest.approx(2.0)
    assert metrics["ratio/0"] == ratios[0] and metrics["ratio/1"] == ratios[1] and "ratio/2" not in metrics
    assert strategy.bandit.agent(2).pending == {}
    assert all(not leaf.obs for leaf in strategy.bandit.agent(2)._leaves)  # a dropout teaches nothing
    # the next round's decisions are made with the observed rewards; state round-trips exactly
    state = strategy.state_dict()
    clone = FedMP(seed=3, reward=reward, progress=progress)
    clone.initialize(_spec(Hidden3()), num_clients=3)
    clone.load_state_dict(state)
    a = [t.config["pruning_ratio"] for t in strategy.configure_round(1, [0, 1, 2])]
    b = [t.config["pruning_ratio"] for t in clone.configure_round(1, [0, 1, 2])]
    assert a == b


@pytest.mark.parametrize("late_reward", [0.0, -0.5])
def test_fedmp_penalizes_a_late_workers_decision(late_reward):
    strategy = FedMP(seed=3, late_reward=late_reward)
    strategy.initialize(_spec(Hidden3()), num_clients=3)
    tasks = strategy.configure_round(0, [0, 1, 2])
    ratios = {t.client_id: t.config["pruning_ratio"] for t in tasks}
    results = [_result(tasks[0], 0.1, time=1.0), _result(tasks[1], 0.1, time=1.0)]
    metrics = strategy.aggregate(0, results, [ClientFailure(0, 2, "deadline", "arrived at 9 s, after the deadline 1.5 s")])
    agent = strategy.bandit.agent(2)
    assert agent.pending == {}
    assert [o for leaf in agent._leaves for o in leaf.obs] == [(0, ratios[2], late_reward)]
    assert metrics["ratio/2"] == ratios[2]  # the late decision's ratio is on the round record
    # both on-time workers fit the mean exactly and made the same progress: reward 1 each
    assert metrics["reward_mean"] == pytest.approx(1.0)


def test_start_low_is_a_recipe_key_and_round_zero_trains_unpruned_models():
    from pathlib import Path

    from lightning_fedprune.config import RecipeConfig
    from lightning_fedprune.config.build import build_strategy

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "fedmp" / "cnn_mnist.yaml"
    cfg = RecipeConfig.from_yaml(recipe)
    assert build_strategy(cfg).bandit.start_low is False  # the recipe's default: Algorithm 1 as printed
    strategy = build_strategy(cfg.apply_overrides(["strategy.options.start_low=true"]))
    strategy.initialize(_spec(Hidden3()), num_clients=3)
    assert [t.config["pruning_ratio"] for t in strategy.configure_round(0, [0, 1, 2])] == [0.0, 0.0, 0.0]


def test_fedmp_options_are_checked():
    with pytest.raises(ConfigError, match="`reward` can be bounded, printed"):
        FedMP(reward="eq8")
    with pytest.raises(ConfigError, match="`gap_floor`"):
        FedMP(gap_floor=0.0)
    with pytest.raises(ConfigError, match="`late_reward` must be a finite number"):
        FedMP(late_reward=float("nan"))


def test_uniform_pruning_gives_every_worker_the_same_ratio():
    module = Hidden3()
    fixed = UniformPruning(ratio=1 / 3)
    fixed.initialize(_spec(module), num_clients=3)
    assert [t.config["pruning_ratio"] for t in fixed.configure_round(0, [0, 1, 2])] == pytest.approx([1 / 3] * 3)
    adaptive = UniformPruning(seed=1)
    adaptive.initialize(_spec(Hidden3()), num_clients=3)
    tasks = adaptive.configure_round(0, [0, 1, 2])
    assert len({t.config["pruning_ratio"] for t in tasks}) == 1
    m = adaptive.aggregate(0, [_result(t, 0.0, before=1.0, after=0.6, time=2.0) for t in tasks], [])
    assert m["reward_mean"] == pytest.approx(0.4 / 2.0)  # mean loss decrease per second of round time


# ----------------------------------------------------------------------------- through the engine


@pytest.fixture
def tiny(tiny_module, tiny_data_factory):
    return tiny_module, tiny_data_factory


def _tiny_engine(tiny, strategy, *, run_dir=None, devices=None, **kw):
    tiny_module, tiny_data_factory = tiny
    data = tiny_data_factory(sizes=(20, 30, 40, 25))
    module = tiny_module(lr=0.1, seed=0)
    runtime = ClientRuntime(module, data=data, seed=4, client_callbacks=strategy.client_callbacks)
    devices = devices or make_devices(4, seed=2)
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=devices, seed=6, run_dir=run_dir, **kw)


def test_fedmp_through_the_engine_trains_sub_models_of_different_sizes(tiny):
    eng = _tiny_engine(tiny, FedMP(seed=1, ratio_range=(0.0, 0.9)))
    hidden = []
    orig = eng.runtime.load_task

    def spy(module, task, state):
        orig(module, task, state)
        hidden.append(module.body.weight.shape[0])

    eng.runtime.load_task = spy
    sent = []
    run_many = eng.runtime.run_many

    def spy_many(tasks, store):
        sent.append(list(tasks))
        return run_many(tasks, store)

    eng.runtime.run_many = spy_many
    full_state = {k: v.clone() for k, v in eng.strategy.global_state.items()}
    recs = [eng.run_round(r) for r in range(3)]
    assert all(r["num_results"] == 4 for r in recs)
    assert len(set(hidden)) > 1 and max(hidden) <= 16  # clients trained physically different sub-models
    assert eng.strategy.global_state["body.weight"].shape == (16, 8)
    assert all(0.0 <= r["agg/ratio_mean"] < 1.0 for r in recs)
    assert all(math.isfinite(r["test_accuracy"]) for r in recs)
    # bytes_down counts the encoded sub-model tasks exactly, and a pruned task is smaller than the
    # same task carrying the full model
    assert recs[0]["bytes_down"] == sum(len(encode_task(t)) for t in sent[0])
    pruned = [t for r in sent for t in r if t.config["pruning_ratio"] > 0.1]
    assert pruned
    for t in pruned:
        assert len(encode_task(t)) < len(encode_task(dataclasses.replace(t, weights=full_state)))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fedmp_resume_is_bit_identical(tiny, tmp_path, mode):
    kw = {"mode": mode, "async_m": 2} if mode == "async" else {}
    a = _tiny_engine(tiny, FedMP(seed=1), run_dir=tmp_path / "a", **kw)
    a.run(4)
    b1 = _tiny_engine(tiny, FedMP(seed=1), run_dir=tmp_path / "b", **kw)
    b1.run(2)
    b2 = _tiny_engine(tiny, FedMP(seed=1), run_dir=tmp_path / "b", **kw)
    b2.run(4, resume=True)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(v, b2.strategy.global_state[k]), k
    assert [r["agg/ratio_mean"] for r in a.history] == [r["agg/ratio_mean"] for r in b2.history]
    assert a.strategy.bandit.state_dict() == b2.strategy.bandit.state_dict()


def test_flexcom_uploads_less_and_rebuilds_the_models(tiny):
    from lightning_fedprune.strategies import FedAvg

    dense = _tiny_engine(tiny, FedAvg())
    flex = _tiny_engine(tiny, FlexCom(keep_ratios={0: 0.1, 1: 0.1, 2: 0.5, 3: 1.0}))
    rd, rf = dense.run_round(0), flex.run_round(0)
    assert rf["num_results"] == 4
    assert rf["bytes_up"] < rd["bytes_up"]
    assert rf["agg/keep_mean"] == pytest.approx(0.425)
    assert math.isfinite(rf["test_accuracy"])


def test_flexcom_keep_ratios_follow_bandwidth():
    s = FlexCom(client_uplink={0: 1e6, 1: 5e5, 2: 1e4}, min_keep=0.05)
    assert s.keep_ratios[0] == 1.0
    assert s.keep_ratios[0] > s.keep_ratios[1] > s.keep_ratios[2] >= 0.05
    with pytest.raises(ConfigError, match="exactly one"):
        FlexCom()


def test_fedprox_local_work_follows_capability():
    steps = capability_local_steps({0: 4e9, 1: 2e9, 2: 1e8}, base_steps=20)
    assert steps == {0: 20, 1: 10, 2: 1}
    s = FedProx(mu=0.1, client_local_steps=steps)
    assert s.local_work(0, 1) == {"local_epochs": None, "local_steps": 10}
    assert s.local_work(0, 9) == {"local_epochs": 1, "local_steps": None}
    with pytest.raises(ConfigError, match="client_local_steps"):
        FedProx(client_local_steps={0: 0})


def test_deadline_failures_release_plans_and_bandit_decisions(tiny):
    fast = DeviceProfile(flops_per_second=1e9, uplink_bytes_per_second=1e9, downlink_bytes_per_second=1e9)
    slow = DeviceProfile(flops_per_second=1e3, uplink_bytes_per_second=1e3, downlink_bytes_per_second=1e3)
    eng = _tiny_engine(tiny, FedMP(seed=1), devices=[fast, fast, fast, slow], mode="deadline", deadline_fraction=0.75)
    rec = eng.run_round(0)
    assert rec["num_late"] == 1 and rec["num_results"] == 3
    assert eng.strategy._plans == {}
    assert eng.strategy.bandit.agent(3).pending == {}


def test_fedmp_prunes_a_two_layer_lstm_language_model_end_to_end():
    # Prepare: a tiny 2-layer LSTM LM on random token streams, 3 clients at fixed ratios
    from torch.utils.data import TensorDataset

    from lightning_fedprune.config import FederatedLanguageModel
    from lightning_fedprune.data.federated import FederatedDataset

    torch.manual_seed(0)
    tokens = torch.randint(0, 30, (60, 6))
    ds = TensorDataset(tokens, torch.roll(tokens, -1, dims=1))
    data = FederatedDataset(ds, [range(0, 20), range(20, 40), range(40, 60)], test=ds, batch_size=10, eval_batch_size=30)
    module = FederatedLanguageModel("lstm_lm", lr=0.5, vocab_size=30, embed_dim=8, hidden_size=8)
    module.example_input_array = torch.zeros((1, 6), dtype=torch.long)
    strategy = FedMP(fixed_ratios={0: 0.5, 1: 0.25, 2: 0.0})
    runtime = ClientRuntime(module, data=data, seed=0, evaluate_local=False)
    eng = SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(3, seed=0), seed=0, perplexity=True)
    # Execute
    recs = [eng.run_round(r) for r in range(2)]
    # Assert: hidden units 8 -> 4 / 6 / 8 on the wire, full shape on the server, finite perplexity
    assert recs[0]["num_results"] == 3
    assert eng.strategy.global_state["model.lstm.weight_hh_l1"].shape == (32, 8)
    assert math.isfinite(recs[-1]["test_perplexity"])
    sent = eng.strategy.configure_round(2, [0, 1, 2])
    assert [t.weights["model.lstm.weight_hh_l0"].shape for t in sent] == [(16, 4), (24, 6), (32, 8)]
    assert [t.weights["model.classifier.weight"].shape for t in sent] == [(30, 4), (30, 6), (30, 8)]


def test_fedmp_final_loss_progress_prefers_the_paired_probe():
    # running losses after: 0.5 and 0.8; the probe's: 0.8 and 0.4 -> shares 0.4/0.8 and 1 (probe wins)
    strategy = FedMP(seed=3)
    strategy.initialize(_spec(Hidden3()), num_clients=3)
    tasks = strategy.configure_round(0, [0, 1])
    results = [_result(tasks[0], 0.1, after=0.5, time=1.0), _result(tasks[1], 0.1, after=0.8, time=3.0)]
    for r, probe in zip(results, (0.8, 0.4)):
        r.metrics.extra.update(probe_loss_before=1.0, probe_loss_after=probe)
    metrics = strategy.aggregate(0, results, [])
    assert metrics["reward_mean"] == pytest.approx((0.5 * 0.1 + 1.0 * 0.1) / 2)
    # a result without any finite loss gets the round's worst share (0.4 / 0.8); equal times fit fully
    tasks = strategy.configure_round(1, [0, 1, 2])
    results = [_result(t, 0.1, after=a, time=2.0) for t, a in zip(tasks, (math.nan, 0.4, 0.8))]
    assert strategy.aggregate(1, results, [])["reward_mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
