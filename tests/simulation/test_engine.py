"""The simulation engine: rounds, resume, failures, bytes and simulated time."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientResult, encode_result, encode_task
from lightning_fedprune.errors import AllClientsFailedError, ConfigError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import CHECKPOINT_NAME, DeviceProfile, SimulationEngine, make_devices
from lightning_fedprune.strategies import FedAvg, Scaffold

_NOT_REPLAYED = {"wall_time", "cpu_time"}  # measured, not simulated


class SpyRuntime(ClientRuntime):
    """A ClientRuntime that remembers what each ``run_many`` returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list] = []

    def run_many(self, tasks, store):
        out = super().run_many(tasks, store)
        self.calls.append(out)
        return out


def _build(tiny_module, data, *, strategy, run_dir=None, devices=None, callbacks=(), module=None, lr_schedule="constant", **engine_kwargs):
    module = module if module is not None else tiny_module(lr=0.1, seed=0)
    runtime = SpyRuntime(
        module, data=data, seed=11, client_callbacks=strategy.client_callbacks, callbacks=list(callbacks), lr_schedule=lr_schedule
    )
    return SimulationEngine(strategy=strategy, runtime=runtime, data=data, devices=devices, seed=5, run_dir=run_dir, **engine_kwargs)


def _same_record(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in set(a) - _NOT_REPLAYED:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "make_strategy, lr_schedule",
    [
        pytest.param(lambda: FedAvg(fraction_fit=0.5, seed=2, local_epochs_range=(1, 2)), "constant", id="fedavg"),
        pytest.param(lambda: Scaffold(fraction_fit=0.75, seed=2), "constant", id="scaffold"),
        pytest.param(lambda: Scaffold(fraction_fit=0.75, seed=2, local_epochs=3), "cosine", id="scaffold-cosine-lr"),
    ],
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(make_strategy, lr_schedule, tiny_module, tiny_data_factory, tmp_path):
    # Prepare: 4 clients, partial participation and random dropouts exercise every seeded draw
    data = tiny_data_factory(sizes=(20, 30, 40, 25))
    devices = make_devices(4, seed=1, failure_prob=0.2)
    # Execute: uninterrupted
    a = _build(tiny_module, data, strategy=make_strategy(), run_dir=tmp_path / "A", devices=devices, lr_schedule=lr_schedule)
    summary_a = a.run(4)
    # interrupted after 2 rounds, then a FRESH engine (module, strategy, runtime) resumes
    b1 = _build(tiny_module, data, strategy=make_strategy(), run_dir=tmp_path / "B", devices=devices, lr_schedule=lr_schedule)
    b1.run(2)
    assert (tmp_path / "B" / CHECKPOINT_NAME).exists()
    b2 = _build(tiny_module, data, strategy=make_strategy(), run_dir=tmp_path / "B", devices=devices, lr_schedule=lr_schedule)
    summary_b = b2.run(4, resume=True)
    # Assert
    assert b2.runtime.calls and len(b2.runtime.calls) == 2  # it really ran only rounds 2 and 3
    assert summary_a["rounds_run"] == summary_b["rounds_run"] == 4
    for k, v in a.strategy.global_state.items():
        assert torch.equal(v, b2.strategy.global_state[k]), k
    assert [r["test_accuracy"] for r in a.history] == [r["test_accuracy"] for r in b2.history]
    assert all(_same_record(ra, rb) for ra, rb in zip(a.history, b2.history))
    # the run really moved, and (for SCAFFOLD) the client states persisted through the checkpoint
    assert not torch.equal(a.strategy.global_state["body.weight"], tiny_module(seed=0).body.weight)
    if isinstance(a.strategy, Scaffold):
        for k, v in a.strategy.control.items():
            assert torch.equal(v, b2.strategy.control[k]), k
        sa, sb = a.store.state_dict(), b2.store.state_dict()
        assert set(sa) == set(sb) and len(sa) >= 3
        for cid in sa:
            for n, t in sa[cid]["scaffold.c_i"].items():
                assert torch.equal(t, sb[cid]["scaffold.c_i"][n])


def test_scaffold_resume_needs_the_client_states(tiny_module, tiny_data, tmp_path):
    # Negative control for the resume test: without the persisted c_i the run ends elsewhere.
    a = _build(tiny_module, tiny_data, strategy=Scaffold(), run_dir=tmp_path / "A")
    a.run(3)
    b1 = _build(tiny_module, tiny_data, strategy=Scaffold(), run_dir=tmp_path / "B")
    b1.run(2)
    b2 = _build(tiny_module, tiny_data, strategy=Scaffold(), run_dir=tmp_path / "B")
    b2.load_checkpoint(tmp_path / "B" / CHECKPOINT_NAME)
    assert b2.store.client_ids() == [0, 1, 2]
    b2.store = ClientStore()  # forget every c_i
    b2.run(3)
    assert not torch.equal(a.strategy.global_state["body.weight"], b2.strategy.global_state["body.weight"])


def test_checkpoint_of_another_run_is_refused(tiny_module, tiny_data, tmp_path):
    a = _build(tiny_module, tiny_data, strategy=FedAvg(), run_dir=tmp_path)
    a.run(1)
    other = SimulationEngine(
        strategy=FedAvg(), runtime=ClientRuntime(tiny_module(), data=tiny_data), data=tiny_data, seed=6, run_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="checkpoint was made with seed=5, this run has seed=6"):
        other.run(2, resume=True)


def test_resume_without_checkpoint_starts_afresh(tiny_module, tiny_data, tmp_path):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), run_dir=tmp_path / "new")
    summary = eng.run(2, resume=True)
    assert summary["rounds_run"] == 2 and [r["round"] for r in eng.history] == [0, 1]


# ----------------------------------------------------------------------------- failures


def _devices(n: int, overrides: dict[int, dict] | None = None) -> list[DeviceProfile]:
    base = dict(flops_per_second=1e6, uplink_bytes_per_second=1000.0, downlink_bytes_per_second=2000.0)
    return [DeviceProfile(**base, **(overrides or {}).get(c, {})) for c in range(n)]


def test_dropped_out_clients_are_counted_and_the_run_goes_on(tiny_module, tiny_data):
    # Prepare: client 1 always drops out
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), devices=_devices(3, {1: {"failure_prob": 1.0}}))
    sent = eng.strategy.configure_round(0, [0, 1, 2])
    # Execute
    records = [eng.run_round(r) for r in range(2)]
    # Assert
    for rec in records:
        assert rec["num_selected"] == 3 and rec["num_results"] == 2 and rec["num_failures"] == 1
        assert rec["failures"] == [{"client_id": 1, "kind": "dropout", "reason": "device dropped out (simulated, p=1)"}]
    # the dropped client never trained, yet its task was sent (bytes_down counts 3 tasks)
    assert all([o.client_id for o in call] == [0, 2] for call in eng.runtime.calls)
    assert records[0]["bytes_down"] == sum(len(encode_task(t)) for t in sent)


def test_every_client_dropping_out_raises(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), devices=_devices(3, {c: {"failure_prob": 1.0} for c in range(3)}))
    with pytest.raises(AllClientsFailedError, match=r"round 0: all 3 selected clients failed, nothing to aggregate\. client 0: dropout: device dropped out"):
        eng.run(2)


def test_every_client_raising_raises_with_the_reason(tiny_module, tiny_data, client_probe):
    module = tiny_module()
    module.fail_clients = frozenset({0, 1, 2})
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), module=module, callbacks=[client_probe])
    with pytest.raises(AllClientsFailedError, match=r"all 3 selected clients failed.*client 0: error: RuntimeError: injected failure for client 0"):
        eng.run_round(0)


def test_a_raising_client_is_an_error_failure(tiny_module, tiny_data, client_probe):
    module = tiny_module()
    module.fail_clients = frozenset({2})
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), module=module, callbacks=[client_probe])
    rec = eng.run_round(0)
    assert rec["num_results"] == 2
    assert [(f["client_id"], f["kind"]) for f in rec["failures"]] == [(2, "error")]
    assert "injected failure for client 2" in rec["failures"][0]["reason"]


class _PickyFedAvg(FedAvg):
    """Demands a wrong shape from client 1's result (as if its plan had pruned a layer)."""

    def expected_result(self, task):
        w_spec, x_spec = super().expected_result(task)
        if task.client_id == 1:
            w_spec = {**w_spec, "body.weight": ((8, 8), torch.float32)}
        return w_spec, x_spec


def test_a_result_that_does_not_match_its_task_is_rejected(tiny_module, tiny_data):
    # Prepare
    eng = _build(tiny_module, tiny_data, strategy=_PickyFedAvg())
    reference = _build(tiny_module, tiny_data, strategy=FedAvg())
    # Execute
    rec = eng.run_round(0)
    # Assert
    assert rec["num_results"] == 2
    (failure,) = rec["failures"]
    assert failure["client_id"] == 1 and failure["kind"] == "rejected"
    assert "'body.weight' has shape (16, 8)" in failure["reason"] and "expected (8, 8)" in failure["reason"]
    # the round went on with clients 0 and 2: FedAvg of their results alone
    trained = {o.client_id: o for o in eng.runtime.calls[0]}
    expected_w = (20 * trained[0].weights["body.weight"] + 40 * trained[2].weights["body.weight"]) / 60
    torch.testing.assert_close(eng.strategy.global_state["body.weight"], expected_w)
    # the rejected upload was still sent over the network
    assert rec["bytes_up"] == sum(len(encode_result(o)) for o in eng.runtime.calls[0])
    reference.run_round(0)
    assert not torch.equal(reference.strategy.global_state["body.weight"], eng.strategy.global_state["body.weight"])


def test_oversized_results_are_rejected(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), max_message_bytes=100)
    with pytest.raises(AllClientsFailedError, match="client 0: rejected: result payload of .* bytes exceeds the limit of 100 bytes"):
        eng.run_round(0)


# ----------------------------------------------------------------------------- bytes and clock


def test_bytes_and_simulated_time_by_hand(tiny_module, tiny_data):
    # Prepare: fixed devices with different speeds and links
    devices = [
        DeviceProfile(flops_per_second=1e6, uplink_bytes_per_second=1000.0, downlink_bytes_per_second=2000.0),
        DeviceProfile(flops_per_second=5e5, uplink_bytes_per_second=4000.0, downlink_bytes_per_second=1000.0),
        DeviceProfile(flops_per_second=2e6, uplink_bytes_per_second=500.0, downlink_bytes_per_second=8000.0),
    ]
    eng = _build(tiny_module, tiny_data, strategy=Scaffold(), devices=devices)
    clock = 0.0
    for rnd in range(2):
        tasks = eng.strategy.configure_round(rnd, [0, 1, 2])  # pure: what run_round will send
        down = {t.client_id: len(encode_task(t)) for t in tasks}
        # Execute
        rec = eng.run_round(rnd)
        # Assert: bytes are the real encoded payloads
        results = {o.client_id: o for o in eng.runtime.calls[-1]}
        up = {c: len(encode_result(r)) for c, r in results.items()}
        assert rec["bytes_down"] == sum(down.values())
        assert rec["bytes_up"] == sum(up.values())
        # the clock: slowest client of down/downlink + flops/speed + up/uplink
        times = [
            down[c] / devices[c].downlink_bytes_per_second
            + results[c].metrics.flops / devices[c].flops_per_second
            + up[c] / devices[c].uplink_bytes_per_second
            for c in range(3)
        ]
        clock += max(times)
        assert rec["round_sim_time"] == pytest.approx(max(times), rel=1e-12)
        assert rec["sim_time"] == pytest.approx(clock, rel=1e-12)
    assert eng.history[-1]["cum_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in eng.history)
    # SCAFFOLD sends c with the task and dc with the result: more bytes than the weights alone
    weights_only = len(encode_task(tasks[0].__class__(round=1, client_id=0, weights=tasks[0].weights)))
    assert down[0] > weights_only


def test_unavailable_clients_are_not_selected(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), devices=_devices(3, {0: {"availability": 0.0}}))
    rec = eng.run_round(0)
    assert rec["num_selected"] == 2 and [o.client_id for o in eng.runtime.calls[0]] == [1, 2]


# ----------------------------------------------------------------------------- run loop


def test_target_accuracy_stops_early(tiny_module, tiny_data, tmp_path):
    # Prepare: the accuracy reached after round 1 of a reference run
    ref = _build(tiny_module, tiny_data, strategy=FedAvg())
    ref.run(4)
    accs = [r["test_accuracy"] for r in ref.history]
    target = accs[1]
    stop = next(i for i, a in enumerate(accs) if a >= target)
    # Execute
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), target_accuracy=target, run_dir=tmp_path, checkpoint_every=10)
    summary = eng.run(10)
    # Assert
    assert summary["stopped_early"] is True
    assert len(eng.history) == stop + 1 < 10
    assert eng.history[-1]["test_accuracy"] >= target
    assert (tmp_path / CHECKPOINT_NAME).exists()  # saved at the stop even with checkpoint_every=10
    # a resumed run knows it is done
    again = _build(tiny_module, tiny_data, strategy=FedAvg(), target_accuracy=target, run_dir=tmp_path)
    assert again.run(10, resume=True)["stopped_early"] is True
    assert again.runtime.calls == []


def test_listeners_see_the_run(tiny_module, tiny_data):
    class Listener:
        def __init__(self):
            self.events = []

        def on_run_start(self, info):
            self.events.append(("start", info["num_rounds"], info["start_round"], info["strategy"]))

        def on_round_end(self, record):
            self.events.append(("round", record["round"]))

        def on_run_end(self, summary):
            self.events.append(("end", summary["rounds_run"]))

    listener = Listener()
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), listeners=[listener, object()])
    eng.run(2)
    assert listener.events == [("start", 2, 0, "FedAvg"), ("round", 0), ("round", 1), ("end", 2)]


def test_eval_every_skips_evaluations_but_not_the_last_round(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), eval_every=2)
    eng.run(3)
    evaluated = [not math.isnan(r["test_accuracy"]) for r in eng.history]
    assert evaluated == [False, True, True]


def test_record_holds_results_and_local_accuracy(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg())
    rec = eng.run_round(0)
    local = [o.metrics.extra["local_test_acc"] for o in eng.runtime.calls[0]]
    assert rec["local_acc_mean"] == pytest.approx(sum(local) / 3)
    assert rec["local_acc_min"] == min(local) and rec["local_acc_max"] == max(local)
    assert rec["agg/num_results"] == 3.0 and 0.0 <= rec["test_accuracy"] <= 1.0
    assert all(isinstance(o, ClientResult) for o in eng.runtime.calls[0])


def test_rounds_must_run_in_order(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg())
    with pytest.raises(ConfigError, match="round 1 requested but the next round is 0"):
        eng.run_round(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_every": 0}, "`eval_every` must be >= 1, got 0"),
        ({"checkpoint_every": 0}, "`checkpoint_every` must be >= 1, got 0"),
        ({"target_accuracy": 1.5}, r"`target_accuracy` must be in \(0, 1\], got 1.5"),
        ({"devices": make_devices(2)}, "2 device profiles for 3 clients"),
    ],
)
def test_engine_arguments_are_checked(kwargs, message, tiny_module, tiny_data):
    with pytest.raises(ConfigError, match=message):
        _build(tiny_module, tiny_data, strategy=FedAvg(), **kwargs)


def test_save_checkpoint_needs_a_place(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg())
    with pytest.raises(ConfigError, match="save_checkpoint needs a path or an engine with a run_dir"):
        eng.save_checkpoint()


def test_a_round_without_available_clients_changes_nothing(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg(), devices=_devices(3, {c: {"availability": 0.0} for c in range(3)}))
    before = {k: v.clone() for k, v in eng.strategy.global_state.items()}
    rec = eng.run_round(0)
    assert (rec["num_selected"], rec["num_results"], rec["bytes_down"], rec["sim_time"]) == (0, 0, 0, 0.0)
    assert all(torch.equal(before[k], eng.strategy.global_state[k]) for k in before)
    assert eng.runtime.calls == [] and eng.next_round == 1


class _RogueFedAvg(FedAvg):
    def configure_round(self, rnd, available):
        return super().configure_round(rnd, [*available, 7])


def test_tasks_for_unavailable_clients_are_refused(tiny_module, tiny_data_factory):
    data = tiny_data_factory(sizes=(20, 20, 20, 20, 20, 20, 20, 20))
    eng = _build(tiny_module, data, strategy=_RogueFedAvg(), devices=_devices(8, {7: {"availability": 0.0}}))
    with pytest.raises(ConfigError, match=r"_RogueFedAvg built tasks for unavailable clients or another round: \[7\]"):
        eng.run_round(0)


def test_checkpoint_format_is_checked(tiny_module, tiny_data):
    eng = _build(tiny_module, tiny_data, strategy=FedAvg())
    with pytest.raises(ConfigError, match="checkpoint format 99 is not supported"):
        eng.load_state_dict({**eng.state_dict(), "format": 99})


def test_fednova_through_the_engine_reports_tau_eff(tiny_module, tiny_data):
    from lightning_fedprune.strategies import FedNova

    eng = _build(tiny_module, tiny_data, strategy=FedNova(local_epochs_range=(1, 3), seed=4))
    rec = eng.run_round(0)
    results = eng.runtime.calls[0]
    n = [r.metrics.num_samples for r in results]
    steps = [r.metrics.num_steps for r in results]
    assert len(set(steps)) > 1  # heterogeneous local work
    assert rec["agg/tau_eff"] == pytest.approx(sum(a * b for a, b in zip(n, steps)) / sum(n))
