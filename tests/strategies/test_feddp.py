"""FedDP: client-local gates over SCAFFOLD / FedAvg / FedProx / FedNova, never on the wire."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch import nn

from lightning_fedprune.callbacks import DynamicGating, GateCallback
from lightning_fedprune.callbacks.base import ClientContext
from lightning_fedprune.callbacks.gates import GATE_STATE_KEY
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.contract import GATE_KEEP_RATIO, GATE_LASSO, KEPT, SUBMODEL, WEIGHTS_FORMAT, decode_kept_groups, encode_kept_groups
from lightning_fedprune.core.control_variates import SCAFFOLD_CONTROL
from lightning_fedprune.core.gates import DEFAULT_LASSO, GATE_ATTR
from lightning_fedprune.core.messages import ClientFailure, ClientTask
from lightning_fedprune.core.plans import Plan
from lightning_fedprune.errors import ConfigError, ModelError
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import STRATEGIES, WRAPPERS, DynamicGates, FedAvg, FedDP, FedMP, FedNova, FedProx, Scaffold

torch.set_num_threads(1)


class TinyCNN(FederatedModuleMixin, pl.LightningModule):
    """8-vectors seen as 1x2x4 images: conv 1->6 (+BN) -> conv 6->4 -> mean -> linear 4->4."""

    federated_example_input_shape = (8,)

    def __init__(self, *, lr: float = 0.1, seed: int = 0, bn: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.classifier = nn.Linear(4, 4)
        self.lr = lr

    def forward(self, x):
        x = x.view(-1, 1, 2, 4)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.classifier(x.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Tiny1(TinyCNN):
    """One conv 1 -> 4 (no BN) -> relu -> mean -> linear 4 -> 4: one gate, for by-hand checks."""

    def __init__(self, *, lr: float = 0.1, seed: int = 0) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.classifier = nn.Linear(4, 4)
        self.lr = lr

    def forward(self, x):
        return self.classifier(torch.relu(self.conv1(x.view(-1, 1, 2, 4))).mean(dim=(2, 3)))


def _engine(strategy, data, module=None, **kw):
    module = module or TinyCNN()
    runtime = ClientRuntime(module, data=data, seed=0, client_callbacks=strategy.client_callbacks)
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=make_devices(data.num_clients, seed=0), seed=0, **kw)


# ----------------------------------------------------------------------------- the wire
def test_gates_never_cross_the_wire_and_persist_on_each_client(tiny_data, monkeypatch):
    import lightning_fedprune.simulation.engine as engine_mod

    blobs: list[bytes] = []
    for name in ("encode_task", "encode_result"):
        real = getattr(engine_mod, name)
        monkeypatch.setattr(engine_mod, name, lambda m, _real=real: blobs.append(_real(m)) or blobs[-1])
    eng = _engine(FedDP(keep_ratio=0.5, lasso=0.01, local_steps=2, seed=0), tiny_data)
    backbone = set(TinyCNN().state_dict())
    # Execute: round 0, then keep round 0's gates to see round 1 start from them
    eng.run(1)
    after0 = {c: eng.store.get(c)[GATE_STATE_KEY] for c in range(3)}
    eng.run(2, resume=False)
    after1 = {c: eng.store.get(c)[GATE_STATE_KEY] for c in range(3)}
    # Assert: 3 tasks + 3 results per round, each holding only backbone tensors and control variates
    assert len(blobs) == 12
    gate_values = [v for c in range(3) for st in (after0[c], after1[c]) for v in st.values()]
    for blob in blobs:
        tensors = st_load(blob)
        for key, t in tensors.items():
            assert GATE_ATTR not in key and "gate" not in key
            name = key.split("/", 1)[1]
            assert name in backbone or name.split("/", 1)[1] in backbone
            assert not any(t.shape == g.shape and torch.equal(t, g) for g in gate_values)
    # every client keeps gates for both convolutions (conv1: 1 -> 6, conv2: 6 -> 4), trained in each round
    assert set(after0[0]) == {"conv1/linear.weight", "conv1/linear.bias", "conv2/linear.weight", "conv2/linear.bias"}
    assert after0[0]["conv2/linear.weight"].shape == (4, 6)
    assert all(not torch.equal(after0[c]["conv2/linear.weight"], after1[c]["conv2/linear.weight"]) for c in range(3))
    # clients have their own gates
    assert not torch.equal(after1[0]["conv1/linear.weight"], after1[1]["conv1/linear.weight"])
    # the server's model and control variates are the backbone's only
    assert set(eng.strategy.global_state) == backbone
    assert set(eng.strategy.control) == {n for n, _ in TinyCNN().named_parameters()}


# ----------------------------------------------------------------------------- SCAFFOLD + gates by hand
def test_scaffold_with_gates_one_round_by_hand(tiny_data):
    # Prepare: a client whose stored gate is set by hand; keep 2 of 4 channels; lambda 0.05; one SGD step
    lr, lam, seed = 0.1, 0.05, 0
    module = Tiny1(lr=lr)
    x0 = {k: v.clone() for k, v in module.state_dict().items()}
    wg = torch.tensor([[0.5], [-1.0], [2.0], [0.1]])
    bg = torch.tensor([0.2, 0.3, -0.4, 0.0])
    store = ClientStore()
    store.put(1, {GATE_STATE_KEY: {"conv1/linear.weight": wg, "conv1/linear.bias": bg}})
    strategy = FedDP(keep_ratio=0.5, lasso=lam, local_steps=1, fraction_fit=1.0, seed=0)
    initialize_strategy(strategy, module, num_clients=3)
    task = [t for t in strategy.configure_round(0, [1])][0]
    assert task.config[GATE_KEEP_RATIO] == 0.5 and task.config[GATE_LASSO] == lam
    runtime = ClientRuntime(module, data=tiny_data, seed=seed, client_callbacks=strategy.client_callbacks)
    # Execute
    res = runtime.run(task, store)
    strategy.aggregate(0, [res], [])
    # Assert: Algorithm 1 by hand, without the library's gate helpers
    x, y = next(iter(tiny_data.train_steps(1, 1, run_seed=seed, rnd=0)))
    params = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    w_g, b_g = wg.clone().requires_grad_(True), bg.clone().requires_grad_(True)
    img = x.view(-1, 1, 2, 4)
    s = img.mean(dim=(2, 3))  # avgpool of the conv's input
    z = s @ w_g.T + b_g
    sal = torch.sigmoid(z)
    mask = torch.zeros_like(sal).scatter(1, sal.topk(2, dim=1).indices, 1.0)
    h = F.conv2d(img, params["conv1.weight"], params["conv1.bias"], padding=1) * (sal * mask)[:, :, None, None]
    logits = torch.relu(h).mean(dim=(2, 3)) @ params["classifier.weight"].T + params["classifier.bias"]
    loss = F.cross_entropy(logits, y) + lam * z.abs().sum(dim=1).mean()
    loss.backward()
    n_total = 3
    for k in x0:
        g = params[k].grad  # c = c_i = 0 in round 0: no correction
        y_k = x0[k] - lr * g
        torch.testing.assert_close(res.weights[k], y_k, rtol=1e-5, atol=1e-6)
        # c_i+ = c_i - c + (x - y) / (K * lr) = g;  server: x <- x + mean(dy), c <- c + sum(dc) / N
        torch.testing.assert_close(res.extras["scaffold.dc/" + k], g, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(strategy.global_state[k], y_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(strategy.control[k], g / n_total, rtol=1e-4, atol=1e-6)
    # the gate took a plain SGD step on the same loss (no control variate) and stayed on the client
    gates = store.get(1)[GATE_STATE_KEY]
    torch.testing.assert_close(gates["conv1/linear.weight"], wg - lr * w_g.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gates["conv1/linear.bias"], bg - lr * b_g.grad, rtol=1e-5, atol=1e-6)
    assert (b_g.grad != 0).all()  # the lasso reaches every logit; the kept ones also get the task's gradient
    # round 1's task carries c, over the backbone only
    task1 = strategy.configure_round(1, [1])[0]
    assert set(k[len(SCAFFOLD_CONTROL):] for k in task1.extras) == {n for n, _ in Tiny1().named_parameters()}


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize(
    "make",
    [
        lambda: DynamicGates(FedAvg(local_steps=2, seed=0), keep_ratio=0.5, lasso=0.01),
        lambda: DynamicGates(FedProx(mu=0.01, local_steps=2, seed=0), keep_ratio=0.5, lasso=0.01),
        lambda: DynamicGates(FedNova(local_steps=2, seed=0), keep_ratio=0.5, lasso=0.01),
        lambda: DynamicGates(Scaffold(local_steps=2, seed=0), keep_ratio=0.5, lasso=0.01),
    ],
    ids=["fedavg", "fedprox", "fednova", "scaffold"],
)
def test_gates_compose_with_each_base_strategy(make, tiny_data):
    strategy = make()
    assert strategy.client_callbacks[-1] == "gates"
    eng = _engine(strategy, tiny_data)
    before = {k: v.clone() for k, v in strategy.global_state.items()}
    eng.run(1)
    assert set(strategy.global_state) == set(before)
    assert any(not torch.equal(before[k], strategy.global_state[k]) for k in before)
    assert all(GATE_STATE_KEY in eng.store.get(c) for c in range(3))
    if isinstance(strategy.inner, FedProx):
        assert "fedprox" in strategy.client_callbacks


def test_the_gated_run_differs_from_the_plain_base(tiny_data):
    plain = _engine(Scaffold(local_steps=2, seed=0), tiny_data)
    gated = _engine(FedDP(keep_ratio=0.5, lasso=0.0, local_steps=2, seed=0), tiny_data)
    plain.run(1)
    gated.run(1)
    a, b = plain.strategy.global_state, gated.strategy.global_state
    diff = max((a[k] - b[k]).abs().max().item() for k in a if k != "bn1.num_batches_tracked")
    assert diff > 1e-4
    assert STRATEGIES["feddp"] is FedDP and WRAPPERS["feddp"] is DynamicGates


def test_one_default_lambda_for_every_entry_point():
    # 1e-4, not the paper's 5e-3 (see core.gates.DEFAULT_LASSO for the measurement)
    assert DEFAULT_LASSO == 1e-4
    assert FedDP().lasso == DynamicGates(FedAvg()).lasso == DynamicGating().lasso == DEFAULT_LASSO
    task = DynamicGates(FedAvg(local_steps=1)).wrap_task(ClientTask(round=0, client_id=0, weights={}, local_epochs=1))
    assert task.config[GATE_LASSO] == DEFAULT_LASSO


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="`keep_ratio` must be a number in \\(0, 1\\].*got 0"):
        FedDP(keep_ratio=0)
    with pytest.raises(ConfigError, match="`keep_ratio`.*got 1.2"):
        DynamicGates(FedAvg(), keep_ratio=1.2)
    with pytest.raises(ConfigError, match="`lasso`.*got -0.1"):
        FedDP(lasso=-0.1)

    class SubModels(FedAvg):
        requires_planner = True  # sends sub-models, but cannot tell their kept channels

    with pytest.raises(ConfigError, match="the 'feddp' wrapper cannot wrap SubModels: it sends sub-models without a `plan_of"):
        DynamicGates(SubModels())


def test_a_module_without_conv_layers_fails_the_client_naming_the_model(tiny_module, tiny_data):
    strategy = FedDP(local_steps=1, seed=0)
    eng = _engine(strategy, tiny_data, module=tiny_module())
    runtime = eng.runtime
    task = strategy.configure_round(0, [0])[0]
    with pytest.raises(Exception, match="TinyNet has no gateable layer"):
        runtime.run(task, ClientStore())


def test_gate_state_of_another_architecture_is_refused_on_resume(tiny_data):
    strategy = FedDP(local_steps=1, seed=0)
    module = TinyCNN()
    initialize_strategy(strategy, module, num_clients=3)
    store = ClientStore()
    store.put(0, {GATE_STATE_KEY: {"conv1/linear.weight": torch.zeros(5, 1), "conv1/linear.bias": torch.zeros(5),
                                   "conv2/linear.weight": torch.zeros(4, 6), "conv2/linear.bias": torch.zeros(4)}})
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=strategy.client_callbacks)
    with pytest.raises(Exception, match="gate state key 'conv1/linear.weight' has shape \\(5, 1\\)"):
        runtime.run(strategy.configure_round(0, [0])[0], store)
    # the failed client left no gate in the module: the next client trains normally
    assert not any(GATE_ATTR in n for n, _ in module.named_parameters())
    res = runtime.run(strategy.configure_round(0, [1])[0], ClientStore())
    assert set(res.weights) == set(module.state_dict())


def test_a_resumed_run_ends_with_the_same_gates_and_model(tiny_data, tmp_path):
    # Prepare: uninterrupted 3 rounds vs 2 rounds + a fresh engine resuming from the checkpoint
    full = _engine(FedDP(keep_ratio=0.5, lasso=0.01, local_steps=2, seed=0), tiny_data)
    full.run(3)
    a = _engine(FedDP(keep_ratio=0.5, lasso=0.01, local_steps=2, seed=0), tiny_data, run_dir=tmp_path / "r")
    a.run(2)
    b = _engine(FedDP(keep_ratio=0.5, lasso=0.01, local_steps=2, seed=0), tiny_data, run_dir=tmp_path / "r")
    b.run(3, resume=True)
    for k, v in full.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    for c in range(3):
        ga, gb = full.store.get(c)[GATE_STATE_KEY], b.store.get(c)[GATE_STATE_KEY]
        assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_the_gates_callback_needs_the_wrappers_task_fields(tiny_data):
    module = TinyCNN()
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=("gates",))
    strategy = FedAvg(local_steps=1)
    initialize_strategy(strategy, module, num_clients=3)
    with pytest.raises(Exception, match="needs `gate_keep_ratio` in the task config"):
        runtime.run(strategy.configure_round(0, [0])[0])
    assert isinstance(runtime.callbacks[0], GateCallback)


# ----------------------------------------------------------------------------- FedMP's sub-models + gates
def _gated_fedmp(ratios):
    return DynamicGates(FedMP(fixed_ratios=ratios, local_steps=2, seed=0), keep_ratio=0.5, lasso=0.01)


def test_gates_on_fedmp_sub_models_keep_full_width_state_across_width_changes(tiny_data, monkeypatch):
    import lightning_fedprune.simulation.engine as engine_mod

    blobs: list[bytes] = []
    for name in ("encode_task", "encode_result"):
        real = getattr(engine_mod, name)
        monkeypatch.setattr(engine_mod, name, lambda m, _real=real: blobs.append(_real(m)) or blobs[-1])
    strategy = _gated_fedmp({0: 0.5, 1: 0.25})
    eng = _engine(strategy, tiny_data)
    # Execute: round 0 at ratios 0.5 / 0.25 / 0; round 1 with client 0 widened to 0.25 and client 2 at 0.5
    eng.run(1)
    g0 = {c: eng.store.get(c)[GATE_STATE_KEY] for c in range(3)}
    strategy.fixed_ratios.update({0: 0.25, 2: 0.5})
    tasks = {t.client_id: t for t in strategy.configure_round(1, [0, 1, 2])}
    plans = {c: strategy.plan_of(1, c) for c in range(3)}
    strategy.drop_failed([ClientFailure(1, c, "dropout", "") for c in range(3)])  # the engine re-plans round 1 itself
    eng.run(2, resume=False)
    g1 = {c: eng.store.get(c)[GATE_STATE_KEY] for c in range(3)}
    # Assert: the tasks are sub-models of the expected widths and carry their kept channels
    assert tasks[0].weights["conv1.weight"].shape[0] == 4 and tasks[2].weights["conv1.weight"].shape[0] == 3
    assert all(KEPT in t.config and t.config[GATE_KEEP_RATIO] == 0.5 for t in tasks.values())
    # every client's gate state stays at the full width (conv1: 1 -> 6, conv2: 6 -> 4)
    full_shapes = {"conv1/linear.weight": (6, 1), "conv1/linear.bias": (6,), "conv2/linear.weight": (4, 6), "conv2/linear.bias": (4,)}
    for c in range(3):
        assert {k: tuple(v.shape) for k, v in g1[c].items()} == full_shapes
    # round 1 changed exactly the positions its sub-model kept; the others are bit-identical
    for c in range(3):
        plan = plans[c]
        for conv in ("conv1", "conv2"):
            out_idx, in_idx = plan.indices(f"{conv}.weight")[:2]
            rows = torch.zeros(g0[c][f"{conv}/linear.bias"].shape[0], dtype=torch.bool)
            rows[out_idx if out_idx is not None else slice(None)] = True
            cols = torch.zeros(g0[c][f"{conv}/linear.weight"].shape[1], dtype=torch.bool)
            cols[in_idx if in_idx is not None else slice(None)] = True
            kept = rows[:, None] & cols[None, :]
            w0, w1 = g0[c][f"{conv}/linear.weight"], g1[c][f"{conv}/linear.weight"]
            assert torch.equal(w0[~kept], w1[~kept]), (c, conv)
            assert not torch.equal(w0[kept], w1[kept]), (c, conv)
            b0, b1 = g0[c][f"{conv}/linear.bias"], g1[c][f"{conv}/linear.bias"]
            assert torch.equal(b0[~rows], b1[~rows]) and not torch.equal(b0[rows], b1[rows])
    # nothing gate-related on the wire: 3 tasks + 3 results per round, backbone tensors only
    backbone = set(TinyCNN().state_dict())
    assert len(blobs) == 12
    for blob in blobs:
        for key in st_load(blob):
            assert "gate" not in key and key.split("/", 1)[1] in backbone
    assert set(strategy.global_state) == backbone


def test_a_sub_models_gates_are_the_hand_sliced_full_width_state(tiny_data):
    # Prepare: a hand-made plan keeping conv1's channels [1, 2, 5] (and conv2's inputs) and conv2's [0, 3]
    strategy = _gated_fedmp({0: 0.5})
    module = TinyCNN()
    initialize_strategy(strategy, module, num_clients=3)
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=strategy.client_callbacks)
    layout = runtime.layout()
    assert layout.group_names == ("conv2", "conv1")
    plan = Plan(layout, [torch.tensor([0, 3]), torch.tensor([1, 2, 5])])
    config = {WEIGHTS_FORMAT: SUBMODEL, KEPT: encode_kept_groups(plan), GATE_KEEP_RATIO: 0.5, GATE_LASSO: 0.01}
    task = ClientTask(round=0, client_id=0, weights=plan.extract(strategy.global_state), config=config, local_epochs=None, local_steps=2)
    full = {
        "conv1/linear.weight": torch.arange(6.0).view(6, 1),
        "conv1/linear.bias": torch.arange(6.0) + 100,
        "conv2/linear.weight": torch.arange(24.0).view(4, 6),
        "conv2/linear.bias": torch.arange(4.0) + 200,
    }
    state = {GATE_STATE_KEY: {k: v.clone() for k, v in full.items()}}
    cb = GateCallback()
    runtime.load_task(module, task, state)
    ctx = ClientContext(task=task, state=state, plan=decode_kept_groups(task.config[KEPT], layout))
    # Execute: insert the gates into the received sub-model
    cb.transform_module(None, module, ctx)
    # Assert: the attached gates are the full state at the kept channels, by hand
    sub = cb.gates.gate_state()
    assert torch.equal(sub["conv1/linear.weight"], torch.tensor([[1.0], [2.0], [5.0]]))
    assert torch.equal(sub["conv2/linear.weight"], torch.tensor([[1.0, 2.0, 5.0], [19.0, 20.0, 23.0]]))
    assert torch.equal(sub["conv2/linear.bias"], torch.tensor([200.0, 203.0]))
    assert cb.gates.gate("conv2").k == 1 and cb.gates.gate("conv1").k == 2  # ceil(0.5 * the sub-model's channels)
    with torch.no_grad():
        for g in cb.gates.gates.values():
            g.linear.weight.mul_(-1)
    cb.on_client_end(None, module, ctx)
    back = state[GATE_STATE_KEY]
    w = torch.arange(24.0).view(4, 6)
    w[0, [1, 2, 5]], w[3, [1, 2, 5]] = torch.tensor([-1.0, -2.0, -5.0]), torch.tensor([-19.0, -20.0, -23.0])
    assert torch.equal(back["conv2/linear.weight"], w)
    assert torch.equal(back["conv1/linear.weight"].flatten(), torch.tensor([0.0, -1.0, -2.0, 3.0, 4.0, -5.0]))
    assert torch.equal(back["conv1/linear.bias"], full["conv1/linear.bias"])
    assert not any(GATE_ATTR in n for n, _ in module.named_parameters())
    # the whole client run on that task trains the gates at the kept positions only
    store = ClientStore()
    store.put(0, {GATE_STATE_KEY: {k: v.clone() for k, v in full.items()}})
    res = runtime.run(task, store)
    trained = store.get(0)[GATE_STATE_KEY]
    assert res.weights["conv1.weight"].shape == (3, 1, 3, 3)
    assert torch.equal(trained["conv2/linear.weight"][[1, 2]], full["conv2/linear.weight"][[1, 2]])
    assert torch.equal(trained["conv2/linear.weight"][:, [0, 3, 4]], full["conv2/linear.weight"][:, [0, 3, 4]])
    assert not torch.equal(trained["conv2/linear.weight"][[0, 3]][:, [1, 2, 5]], full["conv2/linear.weight"][[0, 3]][:, [1, 2, 5]])


def test_a_resumed_gated_fedmp_run_is_bit_identical(tiny_data, tmp_path):
    full = _engine(_gated_fedmp({0: 0.5, 1: 0.25}), tiny_data)
    full.run(3)
    a = _engine(_gated_fedmp({0: 0.5, 1: 0.25}), tiny_data, run_dir=tmp_path / "r")
    a.run(2)
    b = _engine(_gated_fedmp({0: 0.5, 1: 0.25}), tiny_data, run_dir=tmp_path / "r")
    b.run(3, resume=True)
    for k, v in full.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    for c in range(3):
        ga, gb = full.store.get(c)[GATE_STATE_KEY], b.store.get(c)[GATE_STATE_KEY]
        assert set(ga) == set(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)


# ----------------------------------------------------------------------------- centralized training
def _digits_cnn_data():
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)
    tr, te = idx[:1400], idx[1400:]
    return DataLoader(TensorDataset(x[tr], y[tr]), batch_size=50, shuffle=True, generator=g), (x[te], y[te])


class DigitsCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(cb, epochs=8):
    loader, (xt, yt) = _digits_cnn_data()
    model = DigitsCNN()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb] if cb else [], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
        logits_l1 = cb.gates.lasso(1.0).item() if cb else None
    return acc, logits_l1, model, trainer


def test_gates_in_a_plain_trainer_lasso_drives_the_gate_outputs_down_and_accuracy_stays():
    dense_acc, _, _, _ = _fit(None)
    plain = DynamicGating(keep_ratio=0.5, lasso=0.0)
    acc0, l1_0, _, _ = _fit(plain)
    lassoed = DynamicGating(keep_ratio=0.5, lasso=3e-3)
    acc1, l1_1, model, _ = _fit(lassoed)
    # measured (8 epochs): test accuracy dense 0.86, gated 0.81 without and 0.89 with the lasso;
    # E||z||_1 summed over both gates 49.1 without the lasso, 20.9 with it
    assert dense_acc > 0.8 and acc0 > 0.75 and acc1 > dense_acc - 0.05
    assert l1_1 < 0.6 * l1_0
    assert len(lassoed.lasso_history) == 8 * 28 and not plain.lasso_history
    # the gates live inside the model until removed; the backbone names are unchanged after
    assert any(GATE_ATTR in n for n, _ in model.named_parameters())
    lassoed.remove()
    assert set(model.state_dict()) == set(DigitsCNN().state_dict())


def test_dynamic_gating_state_save_then_resume():
    cb = DynamicGating(keep_ratio=0.5, lasso=0.01)
    _fit(cb, epochs=1)
    saved = copy.deepcopy(cb.state_dict())
    fresh = DynamicGating(keep_ratio=0.5, lasso=0.01)
    fresh.load_state_dict(saved)
    model = DigitsCNN()
    fresh.setup(None, model, "validate")  # loads the pending gates once they exist
    for k, v in saved["gates"].items():
        assert torch.equal(fresh.gates.gate_state()[k], v)
    with pytest.raises(ConfigError, match="`keep_ratio`"):
        DynamicGating(keep_ratio=2.0)
    other = DynamicGating(keep_ratio=0.5, layers=["net.0"])
    other.load_state_dict(saved)
    with pytest.raises(ModelError, match="gate state key 'net.3/linear.bias' is not a gate of this model"):
        other.setup(None, DigitsCNN(), "validate")


def test_clients_report_the_gated_models_local_accuracy_and_flops(tiny_data):
    strategy = FedDP(keep_ratio=0.5, lasso=0.01, local_steps=2, seed=0)
    module = TinyCNN()
    initialize_strategy(strategy, module, num_clients=3)
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=strategy.client_callbacks)
    res = runtime.run(strategy.configure_round(0, [2])[0])
    extra = res.metrics.extra
    # dense, by hand on a 1x2x4 input: conv1 2*6*1*9*8 + conv2 2*4*6*9*8 + classifier 2*4*4
    assert extra["dense_flops"] == 864 + 3456 + 32
    # gated: conv1 keeps 3 of 6 (2*3*1*9*8 = 432, gate 1*8 + 2*1*6 = 20); conv2 keeps 2 of 4 from at
    # most 3 non-zero inputs (<= 2*2*3*9*8 = 864, gate 6*8 + 2*6*4 = 96); classifier <= 2*2*4 = 16
    assert 432 + 20 + 96 < extra["gated_flops"] <= 432 + 20 + 864 + 96 + 16
    assert 0.0 <= extra["local_test_acc"] <= 1.0 and extra["local_test_loss"] > 0


def test_a_client_process_builds_scaffolds_and_the_gates_callbacks_from_the_names():
    from lightning_fedprune.strategies.registry import declared_client_callbacks

    assert declared_client_callbacks("feddp") == ("scaffold", "gates") == FedDP().client_callbacks
    assert declared_client_callbacks("fednova", ["feddp"]) == ("gates",)
    assert declared_client_callbacks("fedavg", ["fedprox", "feddp"]) == ("fedprox", "gates")
