"""The client side of FedProx and SCAFFOLD (Lightning callbacks run by the client runtime)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedprune.callbacks import ClientContext, FedProxCallback, ScaffoldCallback, make_client_callbacks
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientTask
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.strategies import FedAvg, FedProx, ModelSpec, Scaffold

LR = 0.1


def _init(strategy, module, num_clients: int = 3):
    strategy.initialize(
        ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names()),
        num_clients=num_clients,
    )
    return strategy


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    return float(sum(((a[n] - b[n]) ** 2).sum() for n in names)) ** 0.5


# ----------------------------------------------------------------------------- FedProx


def test_fedprox_pulls_the_local_model_toward_the_global_one(tiny_module, tiny_data):
    # Prepare: same module, seeds and data; only mu differs
    module = tiny_module(lr=LR)
    names = module.trainable_names()
    outs = {}
    for mu in (0.0, 1.0):
        strategy = _init(FedProx(mu=mu, local_epochs=3), module)
        rt = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=strategy.client_callbacks)
        tasks = strategy.configure_round(0, [0, 1, 2])
        # Execute
        outs[mu] = (tasks, rt.run_many(tasks, ClientStore()))
    # Assert: every client ends strictly closer to the global weights with the proximal term
    for (t0, r0), (t1, r1) in zip(zip(*outs[0.0]), zip(*outs[1.0])):
        d0 = _distance(r0.weights, t0.weights, names)
        d1 = _distance(r1.weights, t1.weights, names)
        assert 0.0 < d1 < d0


def test_fedprox_with_mu_zero_equals_fedavg_bit_for_bit(tiny_module, tiny_data):
    module = tiny_module(lr=LR)
    prox = _init(FedProx(mu=0.0, local_epochs=2), module)
    avg = _init(FedAvg(local_epochs=2), module)
    r_prox = ClientRuntime(module, data=tiny_data, seed=4, client_callbacks=("fedprox",)).run_many(prox.configure_round(0, [0, 1, 2]), ClientStore())
    r_avg = ClientRuntime(module, data=tiny_data, seed=4).run_many(avg.configure_round(0, [0, 1, 2]), ClientStore())
    for a, b in zip(r_prox, r_avg):
        for k in a.weights:
            assert torch.equal(a.weights[k], b.weights[k]), k


def test_fedprox_gradient_term_by_hand(tiny_module):
    # Prepare: the module holds the global weights when the client starts
    module = tiny_module()
    cb = FedProxCallback()
    task = ClientTask(round=0, client_id=0, weights={}, config={"prox_mu": 0.5})
    cb.on_client_start(None, module, ClientContext(task=task, state={}))
    w0 = module.body.bias.detach().clone()
    with torch.no_grad():
        module.body.bias += 2.0  # a local step moved the bias by +2
    module.body.bias.grad = torch.ones_like(module.body.bias)
    module.classifier.bias.grad = None  # parameters without a gradient are skipped
    # Execute
    cb.on_before_optimizer_step(None, module, None)
    # Assert: grad + mu * (w - w0) = 1 + 0.5 * 2 = 2
    torch.testing.assert_close(module.body.bias.grad, torch.full_like(w0, 2.0))
    assert module.classifier.bias.grad is None


def test_fedprox_fixed_mu_overrides_the_task_and_is_checked(tiny_module):
    module = tiny_module()
    cb = FedProxCallback(mu=0.25)
    cb.on_client_start(None, module, ClientContext(task=ClientTask(0, 0, {}, config={"prox_mu": 9.0}), state={}))
    assert cb._mu_now == 0.25
    with pytest.raises(ConfigError, match="`mu` must be >= 0, got -1"):
        FedProxCallback(mu=-1)


def test_make_client_callbacks_by_name():
    cbs = make_client_callbacks(["fedprox", "scaffold"])
    assert [type(c) for c in cbs] == [FedProxCallback, ScaffoldCallback]
    with pytest.raises(ConfigError, match=r"unknown client callback\(s\) \['fedma'\]"):
        make_client_callbacks(["fedma"])


# ----------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_round_stores_c_i_and_returns_the_delta(tiny_module, tiny_data):
    # Prepare
    module = tiny_module(lr=LR)
    strategy = _init(Scaffold(local_epochs=2), module)
    names = module.trainable_names()
    store = ClientStore()
    rt = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=("scaffold",))
    tasks = strategy.configure_round(0, [0, 1, 2])
    # Execute
    results = rt.run_many(tasks, store)
    # Assert
    assert store.client_ids() == [0, 1, 2]
    for task, res in zip(tasks, results):
        c_i = store.get(res.client_id)["scaffold.c_i"]
        assert set(c_i) == set(names)
        assert set(res.extras) == {f"scaffold.dc/{n}" for n in names}
        for n in names:
            # c = c_i = 0: c_i+ = (x - y) / (K * lr), and the delta sent is c_i+ - 0
            expected = (task.weights[n] - res.weights[n]) / (res.metrics.num_steps * LR)
            torch.testing.assert_close(c_i[n], expected, rtol=1e-5, atol=1e-6)
            assert torch.equal(res.extras[f"scaffold.dc/{n}"], c_i[n])
    # the server accepts the result as SCAFFOLD expects it
    _, x_spec = strategy.expected_result(tasks[0])
    assert {k: (tuple(v.shape), v.dtype) for k, v in results[0].extras.items()} == x_spec


def test_scaffold_round_zero_equals_fedavg_and_later_rounds_differ(tiny_module, tiny_data):
    # Prepare
    module = tiny_module(lr=LR)
    scaffold = _init(Scaffold(local_epochs=2), module)
    avg = _init(FedAvg(local_epochs=2, weighted=False), module)
    rt_s = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=("scaffold",))
    rt_a = ClientRuntime(module, data=tiny_data, seed=0)
    store_s, store_a = ClientStore(), ClientStore()
    # Execute: round 0, c = c_i = 0
    res_s = rt_s.run_many(scaffold.configure_round(0, [0, 1, 2]), store_s)
    res_a = rt_a.run_many(avg.configure_round(0, [0, 1, 2]), store_a)
    # Assert: the local models are equal, and so are the aggregates (N = S, server_lr = 1)
    for a, b in zip(res_s, res_a):
        for k in a.weights:
            assert torch.equal(a.weights[k], b.weights[k]), k
    scaffold.aggregate(0, res_s, [])
    avg.aggregate(0, res_a, [])
    for k in avg.global_state:
        torch.testing.assert_close(scaffold.global_state[k], avg.global_state[k], rtol=1e-6, atol=1e-7)
    assert float(sum(c.abs().sum() for c in scaffold.control.values())) > 0
    # round 1: the control variates correct the gradients, so SCAFFOLD now trains differently
    avg.load_state_dict({**avg.state_dict(), "global": dict(scaffold.global_state)})
    res_s1 = rt_s.run_many(scaffold.configure_round(1, [0, 1, 2]), store_s)
    res_a1 = rt_a.run_many(avg.configure_round(1, [0, 1, 2]), store_a)
    assert not torch.equal(res_s1[0].weights["body.weight"], res_a1[0].weights["body.weight"])


def test_scaffold_uses_the_stored_c_i(tiny_module, tiny_data):
    # Prepare: the same task, once with c_i = 0 and once with a stored c_i
    module = tiny_module(lr=LR)
    strategy = _init(Scaffold(), module)
    (task,) = strategy.configure_round(0, [0])
    rt = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=("scaffold",))
    c_i = {n: torch.full_like(p, 0.3) for n, p in module.named_parameters()}
    fresh, primed = ClientStore(), ClientStore()
    primed.put(0, {"scaffold.c_i": c_i})
    # Execute
    r_fresh = rt.run(task, fresh)
    r_primed = rt.run(task, primed)
    # Assert: correction c - c_i = -0.3 changes training, and the delta is relative to the old c_i
    assert not torch.equal(r_fresh.weights["body.weight"], r_primed.weights["body.weight"])
    new_ci = primed.get(0)["scaffold.c_i"]
    for n in c_i:
        torch.testing.assert_close(r_primed.extras[f"scaffold.dc/{n}"], new_ci[n] - c_i[n])
        # option II by hand: c_i+ = c_i - c + (x - y) / (K lr) with c = 0
        expected = c_i[n] + (task.weights[n] - r_primed.weights[n]) / (r_primed.metrics.num_steps * LR)
        torch.testing.assert_close(new_ci[n], expected, rtol=1e-5, atol=1e-6)


def test_scaffold_gradient_correction_by_hand(tiny_module):
    # Prepare: c = 0.5 for body.bias only, stored c_i = 0.2 -> correction c - c_i = 0.3
    module = tiny_module()
    bias = module.body.bias
    task = ClientTask(round=0, client_id=0, weights={}, extras={"scaffold.c/body.bias": torch.full_like(bias, 0.5)})
    state = {"scaffold.c_i": {"body.bias": torch.full_like(bias, 0.2)}}
    cb = ScaffoldCallback()
    cb.on_client_start(None, module, ClientContext(task=task, state=state))
    bias.grad = torch.ones_like(bias)
    module.body.weight.grad = torch.ones_like(module.body.weight)
    # Execute
    cb.on_before_optimizer_step(None, module, None)
    # Assert: grad + c - c_i = 1.3; tensors without a control variate are not corrected
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 1.3))
    assert torch.equal(module.body.weight.grad, torch.ones_like(module.body.weight))
