"""Deadline and asynchronous rounds, and clients joining mid-training."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_fedprune.core.devices import round_time
from lightning_fedprune.core.messages import encode_result, encode_task
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import DeviceProfile, SimulationEngine
from lightning_fedprune.strategies import FedAvg

FAST_NET = 1e15  # bytes/s: transfers take no time, compute alone orders the arrivals


class SpyRuntime(ClientRuntime):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list, list]] = []

    def run_many(self, tasks, store):
        out = super().run_many(tasks, store)
        self.calls.append((list(tasks), out))
        return out


def _engine(tiny_module, data, speeds, *, strategy=None, run_dir=None, **kwargs):
    devices = [DeviceProfile(flops_per_second=s, uplink_bytes_per_second=FAST_NET, downlink_bytes_per_second=FAST_NET) for s in speeds]
    runtime = SpyRuntime(tiny_module(lr=0.1, seed=0), data=data, seed=3)
    return SimulationEngine(
        strategy=strategy or FedAvg(), runtime=runtime, data=data, devices=devices, seed=1, run_dir=run_dir, **kwargs
    )


def _times(engine, call_index: int) -> dict[int, float]:
    """Simulated seconds of each client of one run_many call, recomputed by hand."""
    tasks, outs = engine.runtime.calls[call_index]
    return {
        t.client_id: round_time(
            engine.devices[t.client_id], flops=o.metrics.flops, bytes_down=len(encode_task(t)), bytes_up=len(encode_result(o))
        )
        for t, o in zip(tasks, outs)
    }


# ----------------------------------------------------------------------------- deadline


def test_deadline_round_drops_the_late_client_and_benches_it(tiny_module, tiny_data_factory):
    # Prepare: 10 equal clients; client 9 is 10x slower. ceil(0.85 * 10) = 9 -> d = 9th arrival
    data = tiny_data_factory(sizes=(20,) * 10)
    speeds = [1e6] * 9 + [1e5]
    eng = _engine(tiny_module, data, speeds, mode="deadline")
    # Execute
    rec0 = eng.run_round(0)
    rec1 = eng.run_round(1)
    rec2 = eng.run_round(2)
    # Assert: the deadline is 1.5 x the 9th arrival and the round lasted until the deadline
    times = _times(eng, 0)
    d = sorted(times.values())[8]
    assert rec0["deadline"] == pytest.approx(1.5 * d)
    assert rec0["round_sim_time"] == pytest.approx(1.5 * d)
    assert times[9] > 1.5 * d
    assert rec0["num_late"] == 1 and rec0["num_results"] == 9
    (fail,) = rec0["failures"]
    assert fail["client_id"] == 9 and fail["kind"] == "deadline"
    # client 9 sits out round 1 (backoff 1) and is asked again in round 2
    assert rec1["num_selected"] == 9 and 9 not in [t.client_id for t in eng.runtime.calls[1][0]]
    assert rec2["num_selected"] == 10


def test_deadline_round_without_late_clients_ends_at_the_last_arrival(tiny_module, tiny_data_factory):
    data = tiny_data_factory(sizes=(20, 20, 20))
    eng = _engine(tiny_module, data, [1e6, 1e6, 1e6], mode="deadline")
    rec = eng.run_round(0)
    assert rec["num_late"] == 0 and rec["num_results"] == 3
    assert rec["round_sim_time"] == pytest.approx(max(_times(eng, 0).values()))


def test_deadline_global_model_averages_only_on_time_results(tiny_module, tiny_data_factory):
    data = tiny_data_factory(sizes=(20,) * 10)
    eng = _engine(tiny_module, data, [1e6] * 9 + [1e5], mode="deadline")
    eng.run_round(0)
    outs = {o.client_id: o for o in eng.runtime.calls[0][1]}
    expected = sum(outs[c].weights["body.weight"] for c in range(9)) / 9
    torch.testing.assert_close(eng.strategy.global_state["body.weight"], expected)


# ----------------------------------------------------------------------------- async


def test_async_aggregates_the_first_m_arrivals_and_records_staleness(tiny_module, tiny_data_factory):
    # Prepare: clients 0, 1 fast; 2, 3 take 2.5x as long (same data sizes -> same FLOPs)
    data = tiny_data_factory(sizes=(20, 20, 20, 20))
    eng = _engine(tiny_module, data, [2.5e6, 2.5e6, 1e6, 1e6], mode="async", async_m=2)
    # Execute
    recs = [eng.run_round(r) for r in range(4)]
    # Assert: round 0 sends to all four, aggregates the two fast ones
    assert [r["num_selected"] for r in recs] == [4, 2, 2, 2]
    issued = [[t.client_id for t in tasks] for tasks, _ in eng.runtime.calls]
    assert issued == [[0, 1, 2, 3], [0, 1], [0, 1], [2, 3]]
    # fast ones arrive at f, 2f; the slow ones (2.5f) come in round 2 with staleness 2
    assert [r["num_results"] for r in recs] == [2, 2, 2, 2]
    assert recs[0]["staleness_max"] == 0 and recs[1]["staleness_max"] == 0
    assert recs[2]["staleness_mean"] == 2.0
    f = _times(eng, 0)[0]
    assert recs[0]["sim_time"] == pytest.approx(f)
    assert recs[1]["sim_time"] == pytest.approx(2 * f)
    assert recs[2]["sim_time"] == pytest.approx(2.5 * f)
    assert recs[3]["sim_time"] == pytest.approx(3 * f)  # the fast pair issued in round 2 at 2f
    assert recs[2]["num_in_flight"] == 2


def test_async_results_carry_their_issue_round_and_completion_time(tiny_module, tiny_data_factory):
    seen = []

    class Recording(FedAvg):
        def aggregate(self, rnd, results, failures):
            seen.append([(rnd, r.client_id, r.round, r.completion_time) for r in results])
            return super().aggregate(rnd, results, failures)

    data = tiny_data_factory(sizes=(20, 20, 20, 20))
    eng = _engine(tiny_module, data, [2.5e6, 2.5e6, 1e6, 1e6], strategy=Recording(), mode="async", async_m=2)
    for r in range(3):
        eng.run_round(r)
    f = _times(eng, 0)[0]
    assert [(a, b, c) for a, b, c, _ in seen[2]] == [(2, 2, 0), (2, 3, 0)]
    assert seen[2][0][3] == pytest.approx(2.5 * f)  # dispatched at 0, arrived at 2.5 f
    assert seen[1][0][3] == pytest.approx(f)


def test_async_resume_with_results_in_flight_is_bit_identical(tiny_module, tiny_data_factory, tmp_path):
    data = tiny_data_factory(sizes=(20, 30, 20, 25))
    speeds = [2.5e6, 2.0e6, 1e6, 0.7e6]
    a = _engine(tiny_module, data, speeds, run_dir=tmp_path / "a", mode="async", async_m=2)
    a.run(5)
    b1 = _engine(tiny_module, data, speeds, run_dir=tmp_path / "b", mode="async", async_m=2)
    b1.run(2)
    assert b1.transport.in_flight()  # something was in flight at the checkpoint
    b2 = _engine(tiny_module, data, speeds, run_dir=tmp_path / "b", mode="async", async_m=2)
    b2.run(5, resume=True)
    for k, v in a.strategy.global_state.items():
        assert torch.equal(v, b2.strategy.global_state[k]), k
    keys = ("sim_time", "num_results", "staleness_mean", "bytes_up", "bytes_down", "test_accuracy")
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b2.history]


# ----------------------------------------------------------------------------- joins and arguments


def test_clients_join_mid_training(tiny_module, tiny_data_factory):
    data = tiny_data_factory(sizes=(20, 20, 20))
    eng = _engine(tiny_module, data, [1e6] * 3, join_rounds={2: 2})
    recs = [eng.run_round(r) for r in range(3)]
    assert [r["num_selected"] for r in recs] == [2, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "later"}, "`mode` must be one of"),
        ({"mode": "async"}, "async mode needs `async_m`"),
        ({"deadline_fraction": 0.0}, "`deadline_fraction`"),
        ({"deadline_factor": 0.5}, "`deadline_factor`"),
        ({"join_rounds": {7: 1}}, "`join_rounds` names clients [7]"),
    ],
)
def test_mode_arguments_are_checked(kwargs, message, tiny_module, tiny_data):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _engine(tiny_module, tiny_data, [1e6] * 3, **kwargs)
