"""Overlapped evaluation: round t's global model is evaluated (and round t recorded and
checkpointed) while the workers train round t+1, with every record, checkpoint and result the same
as one round after the other."""

from __future__ import annotations

import math
import types

import pytest
import torch
from worker_testing import CrashingRuntime

from lightning_fedprune import driver as driver_module
from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.errors import ConfigError, RunInterrupted
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies import FedMP, Scaffold

SIZES = (20, 30, 40, 25, 35)
TIMES = ("wall_time", "cpu_time")


@pytest.fixture
def still_clock(monkeypatch):
    """Wall and CPU seconds read as 0 in the driver: records and checkpoints become byte-comparable."""
    monkeypatch.setattr(driver_module, "time", types.SimpleNamespace(perf_counter=lambda: 0.0, process_time=lambda: 0.0))


def _strategy(kind):
    # SCAFFOLD: persistent per-client state (c_i), 4 of 5 clients sampled per round (a seeded draw);
    # FedMP: a bandit and per-round sub-model plans kept in the strategy's state between configure and aggregate
    return Scaffold(fraction_fit=0.8, seed=1) if kind == "scaffold" else FedMP(seed=1)


def _engine(tiny_module, data, kind, *, workers, overlap=True, runtime=None, **kw):
    strategy = _strategy(kind)
    runtime = runtime or ClientRuntime(tiny_module(), data=data, seed=4, client_callbacks=strategy.client_callbacks)
    return SimulationEngine(
        strategy=strategy, runtime=runtime, data=data, devices=make_devices(data.num_clients, seed=2), seed=6,
        workers=workers, overlap_eval=overlap, listeners=[], **kw,
    )


class Events:
    """Records the order of the transport's and the evaluator's steps."""

    def __init__(self, engine):
        self.log = []
        t, ev = engine.transport, engine.evaluator
        start, finish, discard, evaluate = t.start, t.finish, t.discard, ev.evaluate

        def _start(rnd, tasks, rules):
            self.log.append(("start", rnd))
            return start(rnd, tasks, rules)

        def _finish(started):
            self.log.append(("finish", started.round))
            return finish(started)

        def _discard(started, *, wait=True):
            self.log.append(("discard", started.round) if wait else ("stop", started.round))
            return discard(started, wait=wait)

        def _evaluate(state):
            self.log.append(("evaluate", engine.next_round))
            return evaluate(state)

        t.start, t.finish, t.discard, ev.evaluate = _start, _finish, _discard, _evaluate


class Checkpoints:
    """The bytes of every checkpoint the engine writes, in order."""

    def __init__(self, engine):
        self.blobs = []
        save = engine.save_checkpoint

        def _save(path=None):
            target = save(path)
            self.blobs.append(target.read_bytes())
            return target

        engine.save_checkpoint = _save


def _run(engine, rounds, **kw):
    try:
        return engine.run(rounds, **kw)
    finally:
        engine.close()


def _history(engine):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in engine.history]


def _state_bytes(engine, path):
    """The whole run state (strategy, clients' states, clock, history) as checkpoint bytes."""
    engine.save_checkpoint(path)
    return path.read_bytes()


def _same_run(a, b, tmp_path):
    assert _history(a) == _history(b)  # same clients, simulated times, bytes, accuracies, losses
    for k, v in a.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    assert a.store.client_ids() == b.store.client_ids()
    for c in a.store.client_ids():
        assert a.store.get_encoded(c) == b.store.get_encoded(c), c  # persistent client state, bit for bit


def test_overlap_is_used_only_with_workers_in_sync_and_deadline_mode(tiny_module, tiny_data_factory):
    data = tiny_data_factory(sizes=SIZES)
    cases = [
        ({"workers": 2}, True),
        ({"workers": 2, "mode": "deadline"}, True),
        ({"workers": 2, "mode": "async", "async_m": 2}, False),
        ({"workers": 1}, False),
        ({"workers": 2, "overlap": False}, False),
    ]
    for kw, expected in cases:
        engine = _engine(tiny_module, data, "scaffold", **kw)
        assert engine.overlaps() is expected, kw
        engine.close()


@pytest.mark.parametrize("mode", ["sync", "deadline"])
@pytest.mark.parametrize("kind", ["scaffold", "fedmp"])
def test_overlapped_run_is_bit_identical_to_one_round_after_the_other(tiny_module, tiny_data_factory, tmp_path, still_clock, mode, kind):
    data = tiny_data_factory(sizes=SIZES)
    # deadline: a tight deadline makes clients late every round, and they sit out the next one,
    # so round t+1's eligible clients depend on round t's outcome
    kw = {"mode": mode, "deadline_fraction": 0.5, "deadline_factor": 1.0} if mode == "deadline" else {"mode": mode}
    runs = {
        "one worker": _engine(tiny_module, data, kind, workers=1, **kw),
        "two workers": _engine(tiny_module, data, kind, workers=2, overlap=False, **kw),
        "overlapped": _engine(tiny_module, data, kind, workers=2, **kw),
    }
    events = Events(runs["overlapped"])
    for engine in runs.values():
        _run(engine, 4)
    # round t+1 is sent before round t is evaluated, and collected after; none is sent past the last
    assert events.log == [
        ("start", 0), ("finish", 0), ("start", 1), ("evaluate", 0),
        ("finish", 1), ("start", 2), ("evaluate", 1),
        ("finish", 2), ("start", 3), ("evaluate", 2),
        ("finish", 3), ("evaluate", 3),
    ]
    ref = runs["one worker"]
    assert all(math.isfinite(r["test_accuracy"]) for r in ref.history)
    if mode == "deadline":
        assert all(r["num_late"] >= 1 for r in ref.history)
    for name in ("two workers", "overlapped"):
        _same_run(ref, runs[name], tmp_path)
        assert _state_bytes(runs[name], tmp_path / f"{name}.ckpt") == _state_bytes(ref, tmp_path / "ref.ckpt"), name


@pytest.mark.parametrize("kind", ["scaffold", "fedmp"])
def test_every_checkpoint_is_byte_identical_and_resumes_bit_identically(tiny_module, tiny_data_factory, tmp_path, still_clock, kind):
    data = tiny_data_factory(sizes=SIZES)
    plain = _engine(tiny_module, data, kind, workers=2, overlap=False, run_dir=tmp_path / "plain")
    over = _engine(tiny_module, data, kind, workers=2, run_dir=tmp_path / "over")
    cp_plain, cp_over = Checkpoints(plain), Checkpoints(over)
    _run(plain, 4)
    _run(over, 4)
    # round t's checkpoint is written while round t+1 trains and configure_round(t+1) has run
    # (FedMP's plans and bandit, SCAFFOLD's client draw): none of it is in the checkpoint
    assert len(cp_over.blobs) == 4
    assert cp_over.blobs == cp_plain.blobs

    # resume from the checkpoint of round 1 (written while round 2 was in flight)
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    (run_dir / driver_module.CHECKPOINT_NAME).write_bytes(cp_over.blobs[1])
    resumed = _engine(tiny_module, data, kind, workers=2, run_dir=run_dir)
    events = Events(resumed)
    _run(resumed, 4, resume=True)
    assert events.log[:3] == [("start", 2), ("finish", 2), ("start", 3)]
    _same_run(plain, resumed, tmp_path)
    assert _state_bytes(resumed, tmp_path / "a.ckpt") == _state_bytes(plain, tmp_path / "b.ckpt")


def _accuracies(tiny_module, data, kind):
    ref = _engine(tiny_module, data, kind, workers=1)
    _run(ref, 4)
    return [r["test_accuracy"] for r in ref.history]


@pytest.mark.parametrize("kind", ["scaffold", "fedmp"])
def test_early_stop_discards_the_round_started_ahead(tiny_module, tiny_data_factory, tmp_path, still_clock, kind):
    data = tiny_data_factory(sizes=SIZES)
    acc = _accuracies(tiny_module, data, kind)
    target = max(acc[:3])  # reached at the latest in round 2 of 4: round 3 (or earlier) was started ahead
    stop_at = next(i for i, a in enumerate(acc) if a >= target)
    plain = _engine(tiny_module, data, kind, workers=2, overlap=False, target_accuracy=target, run_dir=tmp_path / "plain")
    over = _engine(tiny_module, data, kind, workers=2, target_accuracy=target, run_dir=tmp_path / "over")
    cp_plain, cp_over = Checkpoints(plain), Checkpoints(over)
    events = Events(over)
    s_plain, s_over = _run(plain, 4), _run(over, 4)
    assert s_over["stopped_early"] and s_plain["stopped_early"]
    assert [r["round"] for r in over.history] == list(range(stop_at + 1))
    # the round started ahead was sent, never collected, and dropped once the target was reached
    assert events.log[-3:] == [("start", stop_at + 1), ("evaluate", stop_at), ("discard", stop_at + 1)]
    assert ("finish", stop_at + 1) not in events.log
    assert over.transport.executor.collect(over.store) == {}  # the workers were drained
    assert cp_over.blobs == cp_plain.blobs
    # the strategy is as if the round never started; the clients' states hold nothing of it
    _same_run(plain, over, tmp_path)
    assert _state_bytes(over, tmp_path / "a.ckpt") == _state_bytes(plain, tmp_path / "b.ckpt")


class StopAfter:
    """A listener that asks the run to stop after round ``rnd`` (as the first Ctrl-C does)."""

    def __init__(self, rnd):
        self.rnd, self.engine = rnd, None

    def on_round_end(self, record):
        if record["round"] == self.rnd:
            self.engine.stop_requested = True


@pytest.mark.parametrize("kind", ["scaffold", "fedmp"])
def test_a_stop_request_discards_the_round_started_ahead_and_the_run_resumes_bit_identically(tiny_module, tiny_data_factory, tmp_path, still_clock, kind):
    data = tiny_data_factory(sizes=SIZES)
    engines, logs = {}, {}
    for name, overlap in (("plain", False), ("over", True)):
        engine = _engine(tiny_module, data, kind, workers=2, overlap=overlap, run_dir=tmp_path / name)
        stop = StopAfter(1)
        stop.engine = engine
        engine.listeners.append(stop)
        logs[name] = Events(engine).log
        with pytest.raises(RunInterrupted):
            _run(engine, 4)
        engines[name] = engine
    assert logs["over"][-3:] == [("start", 2), ("evaluate", 1), ("discard", 2)]
    assert ("start", 2) not in logs["plain"]
    assert (tmp_path / "over" / driver_module.CHECKPOINT_NAME).read_bytes() == (tmp_path / "plain" / driver_module.CHECKPOINT_NAME).read_bytes()
    _same_run(engines["plain"], engines["over"], tmp_path)
    assert _state_bytes(engines["over"], tmp_path / "a.ckpt") == _state_bytes(engines["plain"], tmp_path / "b.ckpt")

    # both resume from their checkpoint and end where an uninterrupted run ends
    whole = _engine(tiny_module, data, kind, workers=1)
    _run(whole, 4)
    for name in ("plain", "over"):
        resumed = _engine(tiny_module, data, kind, workers=2, overlap=name == "over", run_dir=tmp_path / name)
        _run(resumed, 4, resume=True)
        _same_run(whole, resumed, tmp_path)


class FailingEvaluation:
    """An evaluator wrapper that raises when round ``rnd``'s model is evaluated."""

    def __init__(self, engine, rnd):
        self.engine, self.rnd, self.inner = engine, rnd, engine.evaluator

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, state):
        if self.engine.next_round == self.rnd:
            raise RuntimeError("evaluation failed")
        return self.inner.evaluate(state)


def test_an_error_while_a_round_trains_ahead_stops_its_workers_at_once_and_restores_the_strategy(tiny_module, tiny_data_factory, tmp_path, still_clock):
    data = tiny_data_factory(sizes=SIZES)
    engines, logs = {}, {}
    for name, overlap in (("plain", False), ("over", True)):
        engine = _engine(tiny_module, data, "fedmp", workers=2, overlap=overlap, run_dir=tmp_path / name)
        logs[name] = Events(engine).log
        engine.evaluator = FailingEvaluation(engine, 1)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            _run(engine, 4)
        engines[name] = engine
    # round 2 was sent before round 1's evaluation failed: its workers are stopped, not waited for
    assert logs["over"][-2:] == [("start", 2), ("stop", 2)]
    assert engines["over"].transport.executor.collect(engines["over"].store) == {}
    # the strategy holds round 1's aggregate, as without the overlap; nothing of round 2 is kept
    assert _state_bytes(engines["over"], tmp_path / "a.ckpt") == _state_bytes(engines["plain"], tmp_path / "b.ckpt")
    # and the run resumes from its last checkpoint (round 0) to the same end as an uninterrupted one
    whole = _engine(tiny_module, data, "fedmp", workers=1)
    _run(whole, 4)
    resumed = _engine(tiny_module, data, "fedmp", workers=2, run_dir=tmp_path / "over")
    _run(resumed, 4, resume=True)
    _same_run(whole, resumed, tmp_path)






def test_a_worker_that_dies_in_the_overlapped_round_is_a_counted_client_failure(tiny_module, tiny_data, tmp_path, still_clock, caplog):
    engines = {}
    for name, overlap in (("plain", False), ("over", True)):
        strategy = FedMP(seed=1)
        runtime = CrashingRuntime(ClientRuntime(tiny_module(), data=tiny_data, seed=4, client_callbacks=strategy.client_callbacks), round=1)
        engine = SimulationEngine(
            strategy=strategy, runtime=runtime, data=tiny_data, devices=make_devices(3, seed=0), seed=6, workers=3,
            overlap_eval=overlap, listeners=[],
        )
        with caplog.at_level("WARNING"):
            _run(engine, 3)
        engines[name] = engine
    over = engines["over"]
    assert over.overlaps() and "client worker" in caplog.text and "died" in caplog.text
    r1 = over.history[1]
    assert r1["num_results"] == 2 and r1["num_failures"] == 1
    assert r1["failures"][0]["client_id"] == 1 and "exit code 7" in r1["failures"][0]["reason"]
    assert over.history[2]["num_results"] == 3  # a new worker took its place
    _same_run(engines["plain"], over, tmp_path)


def test_a_recipe_turns_the_overlap_off(tmp_path):
    from lightning_fedprune.simulation import build_run

    with pytest.raises(ConfigError, match="`engine.overlap_eval` must be true or false"):
        RecipeConfig.from_dict({"engine": {"overlap_eval": "sometimes"}})
    assert RecipeConfig.from_dict({}).engine.overlap_eval is True
    for value in (True, False):
        cfg = RecipeConfig.from_dict({
            "rounds": 2, "run_dir": str(tmp_path / str(value)), "data": {"num_clients": 4},
            "engine": {"workers": 2, "overlap_eval": value},
        })
        engine, _ = build_run(cfg, listeners=[])
        assert engine.overlaps() is value
        engine.close()
