"""Client hooks the pruning methods build on: a module transform before the optimizer is built,
extra loss terms through autograd, kept channels carried by a task, and weight-format codecs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.callbacks import ClientContext, FederatedCallback
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.contract import KEPT, WEIGHTS_FORMATS, decode_kept_groups, encode_kept_groups, register_weights_format
from lightning_fedprune.core.messages import ClientTask
from lightning_fedprune.errors import PayloadError
from lightning_fedprune.runtime import ClientError, ClientRuntime, build_planner
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import FedAvg, FedMP, ModelSpec


def _task(module, *, client_id=0, steps=1, config=None, weights=None):
    w = weights if weights is not None else {k: v.clone() for k, v in module.federated_state().items()}
    return ClientTask(round=0, client_id=client_id, weights=w, local_epochs=None, local_steps=steps, config=config or {})


# ----------------------------------------------------------------------------- (a) module transform
class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.s


class InsertScale(FederatedCallback):
    """Wraps ``body`` with a trainable scale while a client trains; keeps the scale per client."""

    def __init__(self) -> None:
        self.in_optimizer: list[bool] = []

    def transform_module(self, trainer, pl_module, ctx: ClientContext) -> None:
        scale = Scale()
        if "scale" in ctx.state:
            scale.s.data.fill_(float(ctx.state["scale"]))
        self._orig = pl_module.body
        pl_module.body = nn.Sequential(self._orig, scale)

    def on_client_start(self, trainer, pl_module, ctx) -> None:
        scale = pl_module.body[1].s
        self.in_optimizer.append(any(p is scale for g in trainer.optimizers[0].param_groups for p in g["params"]))

    def on_client_end(self, trainer, pl_module, ctx) -> None:
        ctx.state["scale"] = pl_module.body[1].s.detach().clone()
        pl_module.body = self._orig


def test_a_module_inserted_before_the_optimizer_is_trained_and_stays_on_the_client(tiny_module, tiny_data):
    cb = InsertScale()
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0, callbacks=[cb])
    store = ClientStore()
    keys = set(runtime.module.federated_state())
    res = runtime.run(_task(runtime.module, steps=3), store)
    assert cb.in_optimizer == [True]
    scale = float(store.get(0)["scale"])
    assert scale != 1.0  # trained
    assert set(res.weights) == keys  # the inserted module never travels
    # the next round starts from the client's own scale
    runtime.run(_task(runtime.module, steps=1), store)
    assert float(store.get(0)["scale"]) != scale


# ----------------------------------------------------------------------------- (b) extra loss terms
class Lasso(FederatedCallback):
    def __init__(self, lam: float) -> None:
        self.lam = lam

    def extra_loss(self, trainer, pl_module, ctx):
        return self.lam * pl_module.body.weight.abs().sum()


def _by_hand(module, batch, *, lam, lr):
    """One SGD step on cross-entropy + lam * ||body.weight||_1, computed without the runtime."""
    m = copy.deepcopy(module)
    x, y = batch
    F.cross_entropy(m(x), y).backward()
    g = m.body.weight.grad
    return module.body.weight.detach() - lr * (g + lam * torch.sign(module.body.weight.detach()))


def test_a_callbacks_extra_loss_term_joins_the_gradient(tiny_module, tiny_data):
    lam, lr = 0.05, 0.1
    module = tiny_module(lr=lr)
    before = copy.deepcopy(module)
    runtime = ClientRuntime(module, data=tiny_data, seed=3, callbacks=[Lasso(lam)])
    task = _task(module, client_id=1, steps=1)
    batch = next(iter(tiny_data.train_steps(1, 1, run_seed=3, rnd=0)))
    res = runtime.run(task)
    expected = _by_hand(before, batch, lam=lam, lr=lr)
    assert torch.allclose(res.weights["body.weight"], expected, atol=1e-6)
    # without the term the step differs by exactly lr * lam * sign(w)
    plain = ClientRuntime(copy.deepcopy(before), data=tiny_data, seed=3).run(task)
    diff = plain.weights["body.weight"] - res.weights["body.weight"]
    assert torch.allclose(diff, lr * lam * torch.sign(before.body.weight.detach()), atol=1e-6)


def test_a_modules_own_extra_loss_term_joins_the_gradient(tiny_module, tiny_data):
    lam, lr = 0.02, 0.1

    class Regularized(tiny_module):
        def federated_extra_loss(self):
            return lam * self.body.weight.abs().sum()

    module = Regularized(lr=lr)
    before = copy.deepcopy(module)
    batch = next(iter(tiny_data.train_steps(2, 1, run_seed=0, rnd=0)))
    res = ClientRuntime(module, data=tiny_data, seed=0).run(_task(module, client_id=2, steps=1))
    assert torch.allclose(res.weights["body.weight"], _by_hand(before, batch, lam=lam, lr=lr), atol=1e-6)
    # the module's training_step is its own again after training
    assert "training_step" not in vars(module)


# ----------------------------------------------------------------------------- (c) kept channels
class RecordPlan(FederatedCallback):
    def __init__(self) -> None:
        self.seen: list[tuple[ClientTask, object, dict]] = []

    def on_client_start(self, trainer, pl_module, ctx) -> None:
        shapes = {k: tuple(v.shape) for k, v in pl_module.state_dict().items()}
        self.seen.append((ctx.task, ctx.plan, shapes))


def test_a_task_carries_its_kept_channels_and_the_client_lines_up_its_full_tensors(tiny_module, tiny_data):
    rec = RecordPlan()
    module = tiny_module()
    initial = {k: v.clone() for k, v in module.federated_state().items()}
    strategy = FedMP(seed=1, fixed_ratios={0: 0.25, 1: 0.5, 2: 0.75}, send_kept=True)
    runtime = ClientRuntime(module, data=tiny_data, seed=0, callbacks=[rec], client_callbacks=strategy.client_callbacks)
    engine = SimulationEngine(strategy=strategy, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0))
    engine.run_round(0)
    assert len(rec.seen) == 3
    for task, plan, shapes in rec.seen:
        assert plan is not None and plan.ratio == task.config["pruning_ratio"]
        assert plan.sub_shapes() == {k: s for k, s in shapes.items() if k in plan.sub_shapes()}
        sub = plan.extract(initial)  # the client's own full-size tensors, lined up
        assert all(torch.equal(sub[k], task.weights[k]) for k in task.weights)
    # a few bytes: the fingerprint, the hex mask of the 1 group and the ratio (measured: 70 characters),
    # not the layout a full plan carries
    kept = rec.seen[0][0].config[KEPT]
    assert set(kept) == {"fingerprint", "kept", "ratio"} and len(kept["kept"]) == 1 and len(kept["kept"][0]) == 4
    assert len(str(kept)) <= 72


def test_kept_channels_of_another_architecture_are_refused(tiny_module, tiny_data):
    module = tiny_module()
    theirs = build_planner(module, torch.zeros(1, 8))
    plan = theirs.plan(module.state_dict(), 0.5)
    data = encode_kept_groups(plan)
    assert decode_kept_groups(data, theirs.layout) == plan
    bad = dict(data, fingerprint="0" * 16)
    with pytest.raises(PayloadError, match="kept groups are for architecture"):
        decode_kept_groups(bad, theirs.layout)
    runtime = ClientRuntime(module, data=tiny_data, seed=0)
    with pytest.raises(ClientError, match="`kept`"):
        runtime.run(_task(module, config={KEPT: bad}))


# ----------------------------------------------------------------------------- weight formats
def test_weights_are_decoded_by_the_registered_codec(tiny_module, tiny_data, monkeypatch):
    monkeypatch.delitem(WEIGHTS_FORMATS, "halved", raising=False)

    def doubled(weights, shapes):
        return {k: v * 2 if v.is_floating_point() else v for k, v in weights.items()}

    register_weights_format("halved")(doubled)
    module = tiny_module()
    seen = []

    class Peek(FederatedCallback):
        def on_client_start(self, trainer, pl_module, ctx):
            seen.append(pl_module.body.weight.detach().clone())

    full = {k: v.clone() for k, v in module.federated_state().items()}
    halved = {k: v / 2 if v.is_floating_point() else v for k, v in full.items()}
    ClientRuntime(module, data=tiny_data, seed=0, callbacks=[Peek()]).run(
        _task(module, weights=halved, config={"weights_format": "halved"})
    )
    assert torch.equal(seen[0], full["body.weight"])
    monkeypatch.delitem(WEIGHTS_FORMATS, "halved")


def test_an_unknown_weights_format_fails_the_client_with_the_known_ones(tiny_module, tiny_data):
    module = tiny_module()
    runtime = ClientRuntime(module, data=tiny_data, seed=0)
    with pytest.raises(ClientError, match=r"unknown weights_format 'zip'; known: .*coo.*dense.*submodel"):
        runtime.run(_task(module, config={"weights_format": "zip"}))


def test_a_task_that_changes_shapes_needs_a_reshaping_format(tiny_module, tiny_data):
    module = tiny_module()
    w = {k: v.clone() for k, v in module.federated_state().items()}
    w["body.weight"] = torch.zeros(4, 8)
    with pytest.raises(ClientError, match="only weights_format='submodel' tasks may change shapes"):
        ClientRuntime(module, data=tiny_data, seed=0).run(_task(module, weights=w))


def test_strategy_initialization_is_a_public_function(tiny_module):
    from lightning_fedprune.runtime import initialize_strategy

    module = tiny_module()
    s = FedMP(seed=0)
    assert not s.initialized
    initialize_strategy(s, module, num_clients=3)
    assert s.initialized and s.planner is not None
    assert all(torch.equal(s.global_state[k], v) for k, v in module.federated_state().items())
    plain = FedAvg()
    plain.initialize(ModelSpec(state=dict(module.federated_state()), trainable=module.trainable_names()), num_clients=3)
    assert plain.initialized
