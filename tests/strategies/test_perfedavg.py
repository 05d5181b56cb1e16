"""Per-FedAvg: one MAML step checked by hand, both variants, personalized evaluation, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.contract import PERFEDAVG
from lightning_fedprune.core.messages import ClientFailure, ClientTask
from lightning_fedprune.core.meta import part_sizes, split_batch
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import PerFedAvg


class LinearRegression(FederatedModuleMixin, pl.LightningModule):
    """``y = w·x`` (no bias), loss ``0.5 (w·x − y)²`` averaged over the batch, plain SGD."""

    federated_example_input_shape = (2,)

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        self.lr = lr

    def forward(self, x):
        return self.lin(x)

    def federated_evaluate_batch(self, batch):
        x, y = batch
        return 0.5 * ((self(x) - y) ** 2).sum(), None, None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class OneBatch:
    """Client data: the same single batch at every step; an optional one-batch local test split."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, test: tuple | None = None) -> None:
        self.batch = (x, y)
        self.test = test

    def num_train_samples(self, client_id: int) -> int:
        return int(self.batch[0].shape[0])

    def train_steps(self, client_id, num_steps, *, run_seed, rnd):
        return [self.batch] * num_steps

    def train_batches(self, client_id, *, run_seed, rnd, epoch):
        return [self.batch]

    def local_test_loader(self, client_id):
        return [self.test] if self.test is not None else None


# rows: D = (x [1, 0], y 0), D' = (x [0, 1], y 1), D'' = (x [1, 1], y 0)
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
Y = torch.tensor([[0.0], [1.0], [0.0]])


def _one_step(variant: str, n: int) -> torch.Tensor:
    return _run_one_step(variant, n).weights["lin.weight"].reshape(-1)


def _run_one_step(variant: str, n: int, adapt_from: str = "received", test: tuple | None = None):
    module = LinearRegression(lr=0.5)  # beta = 0.5
    settings = {"variant": variant, "alpha": 0.1, "delta": 1e-3, "inner_fraction": None, "adapt_from": adapt_from}
    data = OneBatch(X[:n], Y[:n], test)
    runtime = ClientRuntime(module, data=data, client_callbacks=("perfedavg",), evaluate_local=test is not None)
    task = ClientTask(0, 0, {k: v.clone() for k, v in module.federated_state().items()}, local_epochs=None, local_steps=1, config={PERFEDAVG: settings})
    return runtime.run(task)


def test_one_first_order_step_matches_the_hand_computation():
    # w = [1, 2]; grad on D: (w.x - y) x = [1, 0]; w~ = w - 0.1 [1, 0] = [0.9, 2]
    # grad at w~ on D': (2 - 1) [0, 1] = [0, 1]; FO: w - 0.5 [0, 1] = [1, 1.5]
    assert torch.allclose(_one_step("fo", 2), torch.tensor([1.0, 1.5]), atol=1e-6)


def test_one_hessian_free_step_matches_the_hand_computation():
    # Hessian on D'' = x x^T = [[1, 1], [1, 1]]; H g = [1, 1]; g - alpha H g = [0, 1] - 0.1 [1, 1]
    # = [-0.1, 0.9]; w - 0.5 [-0.1, 0.9] = [1.05, 1.55]
    assert torch.allclose(_one_step("hf", 3), torch.tensor([1.05, 1.55]), atol=1e-4)


def test_the_personalized_model_is_one_step_from_the_received_or_the_trained_model_by_hand():
    test = (torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]]))
    # received w = [1, 2]; one step on the whole first batch (D and D'): mean grad ([1, 0] + [0, 1]) / 2
    # = [0.5, 0.5]; w' = [0.95, 1.95]; test prediction 2.9, loss 0.5 * 2.9^2 = 4.205
    received = _run_one_step("fo", 2, test=test).metrics.extra["local_test_loss"]
    assert received == pytest.approx(4.205, abs=1e-5)
    # trained w = [1, 1.5]: mean grad ([1, 0] * 1 + [0, 1] * 0.5) / 2 = [0.5, 0.25]; w' = [0.95, 1.475]
    # test prediction 2.425, loss 0.5 * 2.425^2 = 2.9403125
    trained = _run_one_step("fo", 2, adapt_from="trained", test=test).metrics.extra["local_test_loss"]
    assert trained == pytest.approx(2.9403125, abs=1e-5)


def test_the_clock_charges_the_hessian_free_variant_its_two_extra_gradients():
    fo, hf = _run_one_step("fo", 3).metrics, _run_one_step("hf", 3).metrics
    assert fo.num_examples == hf.num_examples == 3
    assert hf.flops / fo.flops == pytest.approx(5 / 3)  # 3 examples + 2 gradients on the 1-example D''


def test_batches_are_cut_into_independent_parts():
    assert part_sizes(10, "fo") == [5, 5] and part_sizes(10, "hf") == [3, 4, 3] and part_sizes(10, "fo", 0.2) == [2, 8]
    assert part_sizes(1, "fo") == [1, 1] and part_sizes(2, "hf") == [2, 2, 2]  # too small: the whole batch each time
    a, b = split_batch((torch.arange(5), torch.arange(5) * 10), [2, 3])
    assert a[1].tolist() == [0, 10] and b[0].tolist() == [2, 3, 4]


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_per_fedavg_runs_and_reports_the_one_step_personalized_accuracy(tiny_module, tiny_data, variant):
    s = PerFedAvg(variant=variant, alpha=0.05, local_steps=3, seed=0)
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=1, client_callbacks=s.client_callbacks)
    eng = SimulationEngine(strategy=s, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), seed=2)
    rec = eng.run_round(0)
    assert rec["num_results"] == 3 and 0.0 <= rec["local_acc_min"] <= rec["local_acc_mean"] <= rec["local_acc_max"] <= 1.0
    assert "training_step" not in runtime.module.__dict__  # the wrapper is gone after the client


def test_a_failing_client_leaves_the_module_unwrapped_and_the_others_train_as_usual(tiny_module, tiny_data, client_probe):
    def run(fail):
        module = tiny_module()
        module.fail_clients = frozenset(fail)
        s = PerFedAvg(variant="hf", alpha=0.05, local_steps=3, seed=0)
        runtime = ClientRuntime(module, data=tiny_data, seed=1, client_callbacks=s.client_callbacks, callbacks=[client_probe])
        initialize_strategy(s, module, num_clients=3)
        out = runtime.run_many(s.configure_round(0, [0, 1, 2]), ClientStore())
        assert "training_step" not in module.__dict__
        return out

    clean, failed = run(()), run({1})
    assert isinstance(failed[1], ClientFailure) and "injected failure for client 1" in failed[1].reason
    for c in (0, 2):  # the clients after the failure trained exactly as without it
        assert all(torch.equal(failed[c].weights[k], clean[c].weights[k]) for k in clean[c].weights)


def test_the_personalized_evaluation_starts_from_the_received_model_by_default(tiny_module, tiny_data):
    def local_acc(**kw):
        s = PerFedAvg(alpha=0.5, local_steps=4, seed=0, **kw)
        runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=1, client_callbacks=s.client_callbacks)
        eng = SimulationEngine(strategy=s, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), seed=2)
        return eng.run_round(0)["local_acc_mean"]

    assert local_acc() != local_acc(adapt_from="trained")


def test_resume_is_bit_identical(tiny_module, tiny_data, tmp_path):
    def engine(run_dir):
        s = PerFedAvg(variant="hf", alpha=0.05, local_steps=2, seed=0)
        runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=1, client_callbacks=s.client_callbacks)
        return SimulationEngine(strategy=s, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), seed=2, run_dir=run_dir)

    a = engine(tmp_path / "a")
    a.run(3)
    engine(tmp_path / "b").run(2)
    b = engine(tmp_path / "b")
    b.run(3, resume=True)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    restored = PerFedAvg(variant="hf", alpha=0.05, local_steps=2, seed=0)
    restored.load_state_dict(a.strategy.state_dict())
    assert all(torch.equal(restored.global_state[k], v) for k, v in a.strategy.global_state.items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "so"}, r"`variant` can be fo, hf, got 'so'"),
        ({"alpha": 0.0}, r"`alpha` must be a number > 0, got 0.0"),
        ({"delta": -1.0}, r"`delta` must be a number > 0"),
        ({"inner_fraction": 1.0}, r"`inner_fraction` must be null or a number in \(0, 1\), got 1.0"),
        ({"adapt_from": "global"}, r"`adapt_from` can be received, trained, got 'global'"),
    ],
)
def test_bad_settings_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PerFedAvg(**kwargs)
