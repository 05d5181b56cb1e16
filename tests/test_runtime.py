"""The client runtime: many clients in one Trainer.fit, cleanly separated; metrics; failures."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.callbacks import FederatedCallback
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientError, ClientRuntime, count_flops_per_example
from lightning_fedprune.strategies import FedAvg, FedProx, ModelSpec, Scaffold


def _strategy(kind: str, module, num_clients: int = 3, **kwargs):
    cls = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold}[kind]
    if kind == "fedprox":
        kwargs.setdefault("mu", 0.5)
    s = cls(**kwargs)
    s.initialize(ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names()), num_clients=num_clients)
    return s


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class _Counter(pl.Callback):
    def __init__(self) -> None:
        self.fits = 0
        self.epochs = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fits += 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs += 1


# ----------------------------------------------------------------------------- clean client switching


@pytest.mark.parametrize("kind", ["fedavg", "fedprox", "scaffold"])
def test_run_many_in_one_fit_equals_running_each_client_alone(kind, tiny_module, tiny_data):
    # Prepare: two rounds so SCAFFOLD's c_i (client state) is non-zero in the second one; momentum
    # and dropout make leaked optimizer state or RNG state between clients visible
    module = tiny_module(momentum=0.9, dropout=0.25)
    strategy = _strategy(kind, module, local_epochs=2)
    counter = _Counter()
    together = ClientRuntime(module, data=tiny_data, seed=5, client_callbacks=strategy.client_callbacks, callbacks=[counter])
    alone_rt = ClientRuntime(tiny_module(momentum=0.9, dropout=0.25), data=tiny_data, seed=5, client_callbacks=strategy.client_callbacks)
    store_together, stores_alone = ClientStore(), {c: ClientStore() for c in range(3)}
    for rnd in range(2):
        tasks = strategy.configure_round(rnd, [0, 1, 2])
        # Execute
        many = together.run_many(tasks, store_together)
        alone = [alone_rt.run(t, stores_alone[t.client_id]) for t in tasks]
        # Assert
        for m, a in zip(many, alone):
            assert isinstance(m, ClientResult)
            _assert_same_weights(m.weights, a.weights)
            _assert_same_weights(m.extras, a.extras)
            assert (m.metrics.num_steps, m.metrics.num_examples) == (a.metrics.num_steps, a.metrics.num_examples)
            assert m.metrics.loss_before == a.metrics.loss_before and m.metrics.loss_after == a.metrics.loss_after
        for c in range(3):
            sa, sb = store_together.get(c), stores_alone[c].get(c)
            assert sa.keys() == sb.keys()
            for name, t in sa.get("scaffold.c_i", {}).items():
                assert torch.equal(t, sb["scaffold.c_i"][name])
        strategy.aggregate(rnd, many, [])
    # the three clients of each round shared ONE fit, one Lightning epoch per local epoch
    assert counter.fits == 2
    assert counter.epochs == 2 * 3 * 2
    # and the clients really trained differently (the comparison above is not vacuous)
    assert not torch.equal(many[0].weights["body.weight"], many[1].weights["body.weight"])


def test_results_do_not_depend_on_the_order_of_tasks(tiny_module, tiny_data):
    module = tiny_module()
    tasks = _strategy("fedavg", module).configure_round(0, [0, 1, 2])
    rt = ClientRuntime(module, data=tiny_data, seed=1)
    forward = rt.run_many(tasks, ClientStore())
    backward = rt.run_many(list(reversed(tasks)), ClientStore())[::-1]
    for a, b in zip(forward, backward):
        assert a.client_id == b.client_id
        _assert_same_weights(a.weights, b.weights)


def test_different_run_seeds_give_different_training(tiny_module, tiny_data):
    module = tiny_module()
    (task,) = _strategy("fedavg", module).configure_round(0, [2])
    a = ClientRuntime(module, data=tiny_data, seed=1).run(task)
    b = ClientRuntime(module, data=tiny_data, seed=2).run(task)
    assert not torch.equal(a.weights["body.weight"], b.weights["body.weight"])


# ----------------------------------------------------------------------------- local work and metrics


def test_local_steps_and_examples(tiny_module, tiny_data_factory):
    # Prepare: client 0 has 25 samples, batches of 10 -> passes of 10, 10, 5
    data = tiny_data_factory(sizes=(25, 40))
    module = tiny_module()
    rt = ClientRuntime(module, data=data, seed=0)
    weights = {k: v.clone() for k, v in module.federated_state().items()}
    # Execute
    steps = rt.run(ClientTask(round=0, client_id=0, weights=weights, local_epochs=None, local_steps=4))
    epochs = rt.run(ClientTask(round=0, client_id=0, weights=weights, local_epochs=2))
    # Assert: 4 steps cycle into the second pass: 10 + 10 + 5 + 10 examples
    assert steps.metrics.num_steps == 4 and steps.metrics.num_examples == 35
    assert epochs.metrics.num_steps == 6 and epochs.metrics.num_examples == 50
    assert steps.metrics.num_samples == epochs.metrics.num_samples == 25
    # the int64 buffer counts the training steps, on top of the value sent
    assert steps.weights["steps_seen"].item() == weights["steps_seen"].item() + 4
    assert steps.weights["steps_seen"].dtype == torch.int64


def test_metrics_are_measured(tiny_module, tiny_data):
    # Prepare
    module = tiny_module()
    (task,) = _strategy("fedavg", module, local_epochs=3).configure_round(0, [1])
    rt = ClientRuntime(module, data=tiny_data, seed=0)
    # Execute
    res = rt.run(task)
    # Assert
    m = res.metrics
    assert (res.round, res.client_id) == (0, 1)
    assert m.num_samples == 30 and m.num_steps == 9 and m.num_examples == 90
    assert torch.isfinite(torch.tensor([m.loss_before, m.loss_after])).all()
    assert m.loss_after < m.loss_before  # lr 0.1, 3 epochs: the training loss goes down
    assert m.compute_seconds >= 0.0
    per_example = count_flops_per_example(tiny_module(), torch.zeros(1, 8))
    assert per_example >= 2 * (8 * 16 + 16 * 4)  # two multiply-accumulate layers
    assert m.flops == pytest.approx(3.0 * per_example * 90)
    assert 0.0 <= m.extra["local_test_acc"] <= 1.0 and m.extra["local_test_loss"] > 0


def test_evaluate_local_can_be_switched_off(tiny_module, tiny_data):
    module = tiny_module()
    (task,) = _strategy("fedavg", module).configure_round(0, [0])
    res = ClientRuntime(module, data=tiny_data, evaluate_local=False).run(task)
    assert res.metrics.extra == {}


def test_probe_loss_is_the_first_batch_before_and_after_training(tiny_module, tiny_data):
    # Prepare: the probe must equal an independent evaluation of client 0's first batch
    import torch.nn.functional as F

    module = tiny_module(lr=0.1)
    (task,) = _strategy("fedavg", module, local_epochs=3).configure_round(0, [0])
    first = next(iter(tiny_data.train_batches(0, run_seed=0, rnd=0, epoch=0)))
    ref = tiny_module(lr=0.1)
    ref.load_federated_state(task.weights)
    ref.eval()
    with torch.no_grad():
        expected_before = float(F.cross_entropy(ref(first[0]), first[1]))
    # Execute
    res = ClientRuntime(module, data=tiny_data, seed=0, probe_loss=True).run(task)
    # Assert
    m = res.metrics.extra
    assert m["probe_loss_before"] == pytest.approx(expected_before, rel=1e-6)
    ref.load_federated_state(res.weights)
    with torch.no_grad():
        expected_after = float(F.cross_entropy(ref(first[0]), first[1]))
    assert m["probe_loss_after"] == pytest.approx(expected_after, rel=1e-6)
    assert m["probe_loss_after"] < m["probe_loss_before"]
    # a task may ask for the probe itself (FedMP does)
    asked = dataclasses.replace(task, config={**task.config, "probe_loss": True})
    assert "probe_loss_before" in ClientRuntime(tiny_module(lr=0.1), data=tiny_data, seed=0).run(asked).metrics.extra


def test_custom_forward_flops_are_used(tiny_module, tiny_data):
    class Counted(type(tiny_module())):
        def federated_forward_flops(self, example):
            return 1000.0

    module = Counted()
    (task,) = _strategy("fedavg", module).configure_round(0, [0])
    res = ClientRuntime(module, data=tiny_data).run(task)
    assert res.metrics.flops == 3.0 * 1000.0 * 20


def test_local_keys_stay_on_the_client(tiny_module, tiny_data):
    # Prepare: a personalised head
    class Personal(type(tiny_module())):
        federated_local_keys = ("classifier.*",)

    module = Personal()
    strategy = _strategy("fedavg", module)
    assert not any(k.startswith("classifier") for k in strategy.global_state)
    store = ClientStore()
    rt = ClientRuntime(module, data=tiny_data, seed=0)
    # Execute
    first = rt.run_many(strategy.configure_round(0, [0, 1]), store)
    # Assert: the results carry no head; each client's head is in its own state
    assert all(not any(k.startswith("classifier") for k in r.weights) for r in first)
    head0, head1 = store.get(0)["module.local"], store.get(1)["module.local"]
    assert set(head0) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(head0["classifier.weight"], head1["classifier.weight"])
    # a second round starts client 0 from ITS head (not client 1's, which trained last)
    probe = []

    class HeadProbe(FederatedCallback):
        def on_client_start(self, trainer, pl_module, ctx):
            probe.append((ctx.task.client_id, pl_module.classifier.weight.detach().clone()))

    rt2 = ClientRuntime(module, data=tiny_data, seed=0, callbacks=[HeadProbe()])
    rt2.run_many(strategy.configure_round(1, [0]), store)
    assert probe[0][0] == 0 and torch.equal(probe[0][1], head0["classifier.weight"])


# ----------------------------------------------------------------------------- failures


def test_a_failing_client_is_reported_and_the_others_still_train(tiny_module, tiny_data, client_probe):
    # Prepare
    module = tiny_module()
    module.fail_clients = frozenset({1})
    tasks = _strategy("scaffold", module).configure_round(0, [0, 1, 2])
    counter = _Counter()
    rt = ClientRuntime(module, data=tiny_data, seed=3, client_callbacks=("scaffold",), callbacks=[client_probe, counter])
    store = ClientStore()
    # reference: the healthy clients trained alone
    ref_rt = ClientRuntime(tiny_module(), data=tiny_data, seed=3, client_callbacks=("scaffold",))
    ref = {t.client_id: ref_rt.run(t) for t in tasks if t.client_id != 1}
    # Execute
    outcomes = rt.run_many(tasks, store)
    # Assert
    assert [type(o) for o in outcomes] == [ClientResult, ClientFailure, ClientResult]
    failure = outcomes[1]
    assert (failure.round, failure.client_id, failure.kind) == (0, 1, "error")
    assert "RuntimeError: injected failure for client 1" in failure.reason
    assert "conftest.py" in failure.reason  # where it happened
    for o in (outcomes[0], outcomes[2]):
        _assert_same_weights(o.weights, ref[o.client_id].weights)
        _assert_same_weights(o.extras, ref[o.client_id].extras)
    assert store.client_ids() == [0, 2]  # the failed client's state was not saved
    assert client_probe.started == [0, 1, 2]
    assert counter.fits == 2  # the fit broke at client 1; client 2 ran in a new one


def test_outcomes_are_reported_as_each_client_finishes(tiny_module, tiny_data, client_probe):
    # Prepare: client 1 fails; SCAFFOLD gives every client a state to save
    module = tiny_module()
    module.fail_clients = frozenset({1})
    tasks = _strategy("scaffold", module).configure_round(0, [0, 1, 2])
    rt = ClientRuntime(module, data=tiny_data, seed=3, client_callbacks=("scaffold",), callbacks=[client_probe])
    store = ClientStore()
    seen = []

    def on_outcome(task, outcome):
        # reported while run_many still runs, with the client's state already saved
        seen.append((task.client_id, outcome, store.client_ids()))

    # Execute
    outcomes = rt.run_many(tasks, store, on_outcome=on_outcome)
    # Assert: once per task, in the order they finished, the same objects run_many returns
    assert [(c, type(o)) for c, o, _ in seen] == [(0, ClientResult), (1, ClientFailure), (2, ClientResult)]
    assert [o for _, o, _ in seen] == outcomes
    assert [ids for _, _, ids in seen] == [[0], [0], [0, 2]]


def test_an_error_of_on_outcome_stops_run_many(tiny_module, tiny_data):
    module = tiny_module()
    tasks = _strategy("fedavg", module).configure_round(0, [0, 1, 2])

    def on_outcome(task, outcome):
        raise OSError("the pipe is gone")

    with pytest.raises(OSError, match="the pipe is gone"):
        ClientRuntime(module, data=tiny_data, seed=3).run_many(tasks, ClientStore(), on_outcome=on_outcome)


def test_more_tasks_join_the_same_fit_and_train_as_if_given_at_once(tiny_module, tiny_data):
    # Prepare
    module = tiny_module(momentum=0.9)
    strategy = _strategy("scaffold", module, local_epochs=2)
    tasks = strategy.configure_round(0, [0, 1, 2])
    counter = _Counter()
    rt = ClientRuntime(module, data=tiny_data, seed=3, client_callbacks=("scaffold",), callbacks=[counter])
    ref = ClientRuntime(tiny_module(momentum=0.9), data=tiny_data, seed=3, client_callbacks=("scaffold",)).run_many(tasks, ClientStore())
    later = list(tasks[1:])
    # Execute: one task given, two more handed out one at a time
    out = rt.run_many(tasks[:1], ClientStore(), more=lambda: later.pop(0) if later else None)
    # Assert
    assert counter.fits == 1 and counter.epochs == 6
    assert [o.client_id for o in out] == [0, 1, 2]
    for a, b in zip(out, ref):
        _assert_same_weights(a.weights, b.weights)
        _assert_same_weights(a.extras, b.extras)


def test_an_error_of_more_stops_run_many_and_is_no_client_failure(tiny_module, tiny_data):
    module = tiny_module()
    tasks = _strategy("fedavg", module).configure_round(0, [0, 1])

    def more():
        raise OSError("the pipe is gone")

    with pytest.raises(OSError, match="the pipe is gone"):
        ClientRuntime(module, data=tiny_data, seed=3).run_many(tasks, ClientStore(), more=more)


def test_run_raises_client_error_for_a_failing_client(tiny_module, tiny_data, client_probe):
    module = tiny_module()
    module.fail_clients = frozenset({0})
    (task,) = _strategy("fedavg", module).configure_round(0, [0])
    rt = ClientRuntime(module, data=tiny_data, callbacks=[client_probe])
    with pytest.raises(ClientError, match="injected failure for client 0"):
        rt.run(task)


def test_all_clients_failing_gives_only_failures(tiny_module, tiny_data, client_probe):
    module = tiny_module()
    module.fail_clients = frozenset({0, 1, 2})
    tasks = _strategy("fedavg", module).configure_round(0, [0, 1, 2])
    outcomes = ClientRuntime(module, data=tiny_data, callbacks=[client_probe]).run_many(tasks, ClientStore())
    assert [(o.client_id, o.kind) for o in outcomes] == [(0, "error"), (1, "error"), (2, "error")]


# ----------------------------------------------------------------------------- arguments


class _PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_non_federatable_module_is_refused(tiny_data):
    match = r"_PlainModule is not federatable: add FederatedModuleMixin.*class _PlainModule\(FederatedModuleMixin, LightningModule\)"
    with pytest.raises(ConfigError, match=match):
        ClientRuntime(_PlainModule(), data=tiny_data)


@pytest.mark.parametrize("key", ["max_epochs", "min_epochs", "max_steps", "min_steps", "callbacks", "max_time"])
def test_reserved_trainer_kwargs_are_refused(key, tiny_module, tiny_data):
    with pytest.raises(ConfigError, match=rf"trainer_kwargs may not set \['{key}'\]: the runtime sets local work"):
        ClientRuntime(tiny_module(), data=tiny_data, trainer_kwargs={key: 1, "gradient_clip_val": 1.0})


def test_other_trainer_kwargs_are_passed_on(tiny_module, tiny_data):
    # gradient clipping at a tiny norm changes the update
    module = tiny_module(lr=1.0)
    (task,) = _strategy("fedavg", module).configure_round(0, [0])
    free = ClientRuntime(module, data=tiny_data).run(task)
    clipped = ClientRuntime(module, data=tiny_data, trainer_kwargs={"gradient_clip_val": 1e-3}).run(task)
    moved = lambda r: float((r.weights["body.weight"] - task.weights["body.weight"]).norm())  # noqa: E731
    assert moved(clipped) < moved(free)


def test_unknown_client_callback_is_refused(tiny_module, tiny_data):
    from lightning_fedprune.callbacks import CLIENT_CALLBACKS

    assert {"fedprox", "masks", "scaffold", "topk_upload"} <= set(CLIENT_CALLBACKS)
    with pytest.raises(ConfigError, match=r"unknown client callback\(s\) \['nope'\]; valid: " + ", ".join(sorted(CLIENT_CALLBACKS))):
        ClientRuntime(tiny_module(), data=tiny_data, client_callbacks=("nope",))


def test_duplicate_clients_in_one_call_are_refused(tiny_module, tiny_data):
    module = tiny_module()
    (task,) = _strategy("fedavg", module).configure_round(0, [0])
    with pytest.raises(ConfigError, match=r"duplicate client ids in \[0, 0\]"):
        ClientRuntime(module, data=tiny_data).run_many([task, task], ClientStore())


def test_run_many_of_nothing_is_nothing(tiny_module, tiny_data):
    assert ClientRuntime(tiny_module(), data=tiny_data).run_many([], ClientStore()) == []


# ----------------------------------------------------------------------------- local learning-rate schedule
class _LrRecorder(FederatedCallback):
    def __init__(self) -> None:
        self.lrs: list[tuple[int, float]] = []
        self.client = -1

    def on_client_start(self, trainer, pl_module, ctx) -> None:
        self.client = ctx.task.client_id

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append((self.client, trainer.optimizers[0].param_groups[0]["lr"]))


def test_cosine_lr_schedule_decays_per_local_epoch_and_restarts_for_each_client(tiny_module, tiny_data):
    # Prepare: lr 0.1, 4 local epochs; clients 0 and 1 hold 20 and 30 samples (2 and 3 batches of 10)
    module = tiny_module(lr=0.1)
    strategy = _strategy("fedavg", module, local_epochs=4)
    rec = _LrRecorder()
    runtime = ClientRuntime(module, data=tiny_data, seed=0, callbacks=[rec], lr_schedule="cosine")
    # Execute: both clients in one fit
    runtime.run_many(strategy.configure_round(0, [0, 1]), ClientStore())
    # Assert: by hand, 0.1 * (1 + cos(pi * e / 4)) / 2 = 0.1, 0.0853553..., 0.05, 0.0146446... per epoch
    per_epoch = [0.1, 0.08535533905932738, 0.05, 0.014644660940672627]
    expected = [(0, lr) for lr in per_epoch for _ in range(2)] + [(1, lr) for lr in per_epoch for _ in range(3)]
    assert [c for c, _ in rec.lrs] == [c for c, _ in expected]
    assert [lr for _, lr in rec.lrs] == pytest.approx([lr for _, lr in expected], rel=1e-12)
    # the constant schedule leaves the rate alone
    rec2 = _LrRecorder()
    ClientRuntime(tiny_module(lr=0.1), data=tiny_data, seed=0, callbacks=[rec2]).run(strategy.configure_round(0, [0])[0])
    assert {lr for _, lr in rec2.lrs} == {0.1}


def test_scaffold_with_a_cosine_schedule_divides_by_the_sum_of_the_step_sizes(tiny_module, tiny_data):
    # Prepare: round 0 (c = c_i = 0): option II gives c_i+ = (x - y) / sum_k lr_k
    module = tiny_module(lr=0.1)
    strategy = _strategy("scaffold", module, local_epochs=3)
    x = {k: v.clone() for k, v in strategy.global_state.items()}
    rec = _LrRecorder()
    runtime = ClientRuntime(module, data=tiny_data, seed=0, client_callbacks=strategy.client_callbacks, callbacks=[rec], lr_schedule="cosine")
    # Execute
    res = runtime.run(strategy.configure_round(0, [0])[0])
    # Assert: 2 steps per epoch at 0.1, 0.075, 0.025: the sum is 0.4 (not 6 x the last rate, 0.15)
    lrs = [lr for _, lr in rec.lrs]
    assert lrs == pytest.approx([0.1, 0.1, 0.075, 0.075, 0.025, 0.025], rel=1e-12)
    for name in ("body.weight", "classifier.bias"):
        expected = (x[name] - res.weights[name]) / sum(lrs)
        assert torch.allclose(res.extras[f"scaffold.dc/{name}"], expected, rtol=1e-5, atol=1e-7)


def test_an_lr_schedule_with_the_modules_own_scheduler_or_an_unknown_name_is_refused(tiny_module, tiny_data):
    class WithScheduler(type(tiny_module())):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    module = WithScheduler()
    strategy = _strategy("fedavg", module, local_epochs=2)
    runtime = ClientRuntime(module, data=tiny_data, seed=0, lr_schedule="cosine")
    with pytest.raises(ConfigError, match="`lr_schedule` 'cosine' sets the local learning rate, but WithScheduler.configure_optimizers"):
        runtime.run(strategy.configure_round(0, [0])[0])
    with pytest.raises(ConfigError, match="`lr_schedule` can be constant, cosine; got 'linear'"):
        ClientRuntime(tiny_module(), data=tiny_data, lr_schedule="linear")
