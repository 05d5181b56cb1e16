"""Clients trained in worker processes: bit-identical to the sequential runtime, in every round mode."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from worker_testing import CrashingRuntime, DyingAfterFirstOutcome, SlowWorker

from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.errors import AllClientsFailedError, ConfigError
from lightning_fedprune.runtime import ClientRuntime, initialize_strategy
from lightning_fedprune.simulation import ParallelClients, SimulationEngine, cuda_device_count, make_devices, parallel, resolve_devices, resolve_workers
from lightning_fedprune.simulation.parallel import balanced_shares
from lightning_fedprune.strategies import FedAvg, FedMP, Scaffold


def _engine(tiny_module, data, strategy, *, workers, **kw):
    runtime = ClientRuntime(tiny_module(), data=data, seed=4, client_callbacks=strategy.client_callbacks)
    return SimulationEngine(
        strategy=strategy, runtime=runtime, data=data, devices=make_devices(data.num_clients, seed=2), seed=6, workers=workers, **kw
    )


def _same(a, b):
    assert [r["num_results"] for r in a.history] == [r["num_results"] for r in b.history]
    for k, v in a.strategy.global_state.items():
        assert torch.equal(b.strategy.global_state[k], v), k
    sa, sb = a.store.state_dict(), b.store.state_dict()
    assert sa.keys() == sb.keys()
    for c in sa:
        for k, v in sa[c].items():
            if isinstance(v, dict):
                assert all(torch.equal(v[n], sb[c][k][n]) for n in v)
    ha = [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in a.history]
    hb = [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in b.history]
    assert ha == hb  # same simulated times, bytes, accuracies, losses


@pytest.mark.parametrize("mode", ["sync", "deadline", "async"])
def test_two_workers_end_bit_identical_to_one(tiny_module, tiny_data_factory, mode):
    # SCAFFOLD keeps c_i per client; with 4 of 5 clients sampled per round a client moves between
    # workers from round to round and must take its state along
    data = tiny_data_factory(sizes=(20, 30, 40, 25, 35))
    kw = {"mode": mode, "async_m": 2} if mode == "async" else {"mode": mode}
    seq = _engine(tiny_module, data, Scaffold(fraction_fit=0.8, seed=1), workers=1, **kw)
    par = _engine(tiny_module, data, Scaffold(fraction_fit=0.8, seed=1), workers=2, **kw)
    try:
        seq.run(4)
        par.run(4)
    finally:
        par.close()
    _same(seq, par)
    assert seq.store.client_ids() == [0, 1, 2, 3, 4]


def test_sub_models_train_identically_in_workers(tiny_module, tiny_data):
    seq = _engine(tiny_module, tiny_data, FedMP(seed=1), workers=1)
    par = _engine(tiny_module, tiny_data, FedMP(seed=1), workers=3)
    seq.run(3)
    par.run(3)
    _same(seq, par)






def test_a_worker_that_dies_is_a_counted_client_failure_and_is_replaced(tiny_module, tiny_data, caplog):
    strategy = FedAvg(seed=0)
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0)
    engine = SimulationEngine(strategy=strategy, runtime=CrashingRuntime(runtime, round=0), data=tiny_data, devices=make_devices(3, seed=0), workers=3)
    try:
        with caplog.at_level("WARNING"):
            r0 = engine.run_round(0)
        assert r0["num_results"] == 2 and r0["num_failures"] == 1
        assert r0["failures"][0]["client_id"] == 1 and "exit code 7" in r0["failures"][0]["reason"]
        assert "client worker 1 died" in caplog.text
        r1 = engine.run_round(1)  # a new worker took its place
        assert r1["num_results"] == 3
    finally:
        engine.close()


def test_results_come_client_by_client_and_a_worker_that_dies_midway_fails_its_whole_share(tiny_module, tiny_data_factory):
    # Prepare: 4 clients on 2 workers (2 each); in round 1 both workers die after their first answer
    data = tiny_data_factory(sizes=(20, 30, 40, 25))
    strategy = Scaffold(seed=1)
    initialize_strategy(strategy, tiny_module(), num_clients=4)
    runtime = ClientRuntime(tiny_module(), data=data, seed=4, client_callbacks=strategy.client_callbacks)
    pool = ParallelClients(DyingAfterFirstOutcome(runtime, round=1), workers=2)
    store = ClientStore()
    try:
        # Execute: round 0, each result handed over as it comes
        seen = []
        pool.submit(strategy.configure_round(0, [0, 1, 2, 3]), store)
        out = pool.collect(store, on_result=lambda cid, blob: seen.append((cid, blob)))
        # Assert: every result was handed over once, as the very bytes collect returns
        assert sorted(c for c, _ in seen) == [0, 1, 2, 3]
        assert all(out[c] is blob for c, blob in seen)
        saved = {c: store.get_encoded(c) for c in range(4)}
        assert all(saved.values())
        # Execute: round 1, the workers die after answering one client each
        pool.submit(strategy.configure_round(1, [0, 1, 2, 3]), store)
        out = pool.collect(store)
        # Assert: all clients fail, no state changes (a share counts only once it is complete)
        assert sorted(out) == [0, 1, 2, 3]
        assert all(o.kind == "error" and "exit code 9" in o.reason for o in out.values())
        assert {c: store.get_encoded(c) for c in range(4)} == saved
        # the replaced workers train the next round
        pool.submit(strategy.configure_round(2, [0, 1, 2, 3]), store)
        assert all(isinstance(o, bytes) for o in pool.collect(store).values())
    finally:
        pool.close()


def test_held_back_tasks_go_to_the_workers_that_ask_and_train_bit_identically(tiny_module, tiny_data_factory, monkeypatch):
    # Prepare: 8 clients on 2 workers, shares of 4: each worker starts with 3, 2 are handed out on request
    handed = []
    real_add = parallel._Answers.add
    monkeypatch.setattr(parallel._Answers, "add", lambda self, task: handed.append((self.worker, task.client_id)) or real_add(self, task))
    data = tiny_data_factory(sizes=(20, 30, 40, 25, 35, 22, 28, 33))
    seq = _engine(tiny_module, data, Scaffold(seed=1), workers=1)
    par = _engine(tiny_module, data, Scaffold(seed=1), workers=2)
    try:
        # Execute
        seq.run(3)
        par.run(3)
    finally:
        par.close()
    # Assert: the two smallest clients of each round were handed out, and nothing changed
    assert len(handed) == 6 and all(c in (0, 5) for _, c in handed)
    _same(seq, par)
    assert [r["num_results"] for r in par.history] == [8, 8, 8]


def test_held_back_tasks_go_to_the_worker_that_needs_one_first(tiny_module, tiny_data_factory, monkeypatch):
    # Prepare: 8 equal clients on 2 workers (3 each to start with, 2 held back); worker 1 takes
    # 0.4 s per client, so worker 0 runs out first, twice
    handed = []
    real_add = parallel._Answers.add
    monkeypatch.setattr(parallel._Answers, "add", lambda self, task: handed.append(self.worker) or real_add(self, task))
    data = tiny_data_factory(sizes=(20,) * 8)
    strategy = FedAvg(seed=0)
    initialize_strategy(strategy, tiny_module(), num_clients=8)
    runtime = ClientRuntime(tiny_module(), data=data, seed=0, callbacks=[SlowWorker(1, 0.4)])
    pool = ParallelClients(runtime, workers=2)
    try:
        # Execute
        out = pool.run_many(strategy.configure_round(0, list(range(8))), ClientStore())
    finally:
        pool.close()
    # Assert
    assert handed == [0, 0]
    assert [o.client_id for o in out] == list(range(8)) and all(o.metrics.num_samples == 20 for o in out)


def test_workers_setting():
    assert resolve_workers(3) == 3 and resolve_workers(None) == 1 and resolve_workers("auto") >= 1
    with pytest.raises(ConfigError, match="`workers` must be an integer >= 1 or 'auto'"):
        resolve_workers(0)
    with pytest.raises(ConfigError, match="`engine.workers` must be an integer >= 1 or auto"):
        RecipeConfig.from_dict({"engine": {"workers": "many"}})
    assert RecipeConfig.from_dict({"engine": {"workers": "auto"}}).engine.workers == "auto"
    # from the command line a number stays a number where the key also takes text
    base = RecipeConfig.from_dict({})
    assert base.apply_overrides(["engine.workers=2"]).engine.workers == 2
    assert base.apply_overrides(["engine.workers=auto"]).engine.workers == "auto"
    assert base.apply_overrides(["name=123"]).name == "123"


def test_parallel_clients_read_the_runtimes_attributes(tiny_module, tiny_data):
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0)
    pool = ParallelClients(runtime, 2)
    assert pool.module is runtime.module and pool.seed == 0
    assert pool.run_many([], None) == []
    pool.close()


def test_a_recipe_sets_workers_and_the_client_memory_budget(tmp_path):
    from lightning_fedprune.simulation import build_run

    cfg = RecipeConfig.from_dict({
        "rounds": 2, "run_dir": str(tmp_path), "data": {"num_clients": 4}, "strategy": {"name": "scaffold"},
        "engine": {"workers": 2, "client_memory_mb": 0.0},
    })
    engine, rounds = build_run(cfg, listeners=[])
    try:
        engine.run(rounds)
    finally:
        engine.close()
    assert engine.transport.workers == 2
    assert engine.store.memory_bytes == 0 and len(list(engine.store.spill_dir.glob("client_*.safetensors"))) == 4


def test_shares_are_balanced_longest_task_first():
    # LPT by hand: 9 -> w0, 7 -> w1, 5 -> w1 (7 < 9), 4 -> w0 (9 < 12), 3 -> w1 (12 < 13)
    assert balanced_shares([5, 9, 3, 7, 4], 2) == [[1, 4], [0, 2, 3]]
    assert balanced_shares([1, 1, 1], 2) == [[0, 2], [1]]  # ties: earlier task, lower worker
    assert balanced_shares([2.0], 3) == [[0]]  # idle workers get no share


def test_a_rounds_shared_global_model_is_encoded_once_and_sent_once_per_worker(tiny_module, tiny_data_factory, monkeypatch):
    calls = []
    real = parallel.encode_weights
    monkeypatch.setattr(parallel, "encode_weights", lambda w: calls.append(len(w)) or real(w))
    data = tiny_data_factory(sizes=(20, 30, 40, 25))
    engine = _engine(tiny_module, data, FedAvg(seed=0), workers=2)
    try:
        engine.run(2)
    finally:
        engine.close()
    assert calls == [5, 5]  # one encoding of the global model (5 tensors) per round, for both workers
    assert [r["num_results"] for r in engine.history] == [4, 4]


def test_accelerator_settings_on_a_machine_without_cuda(monkeypatch):
    assert resolve_devices("cpu", 2) == ["cpu", "cpu"]
    assert resolve_devices("auto", 3, cuda_devices=0) == ["cpu"] * 3  # auto falls back to the CPU
    assert resolve_devices("auto", "auto", cuda_devices=0) == ["cpu"] * resolve_workers("auto")
    # with GPUs: `workers_per_gpu` workers share each one; `workers: auto` starts that many per GPU
    assert resolve_devices("cuda", "auto", workers_per_gpu=2, cuda_devices=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert resolve_devices("auto", 3, cuda_devices=2) == ["cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(ConfigError, match="`accelerator: cuda` was asked for but no CUDA device is visible.*HINT: use `accelerator: auto`"):
        resolve_devices("cuda", 2, cuda_devices=0)
    with pytest.raises(ConfigError, match="`accelerator` can be cpu, cuda, auto, got 'gpu'"):
        resolve_devices("gpu", 2)
    with pytest.raises(ConfigError, match="`workers_per_gpu` must be an integer >= 1, got 0"):
        resolve_devices("cuda", 2, workers_per_gpu=0)
    cfg = RecipeConfig.from_dict({"engine": {"accelerator": "auto", "workers_per_gpu": 2}})
    assert (cfg.engine.accelerator, cfg.engine.workers_per_gpu) == ("auto", 2)
    assert RecipeConfig.from_dict({}).engine.accelerator == "cpu"
    with pytest.raises(ConfigError, match="`engine.accelerator` can be cpu, cuda, auto; got 'gpu'"):
        RecipeConfig.from_dict({"engine": {"accelerator": "gpu"}})
    with pytest.raises(ConfigError, match="`engine.workers_per_gpu` must be an integer >= 1"):
        RecipeConfig.from_dict({"engine": {"workers_per_gpu": 0}})


@pytest.mark.skipif(cuda_device_count() > 0, reason="checks the behaviour without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error_and_auto_trains_on_the_cpu(tiny_module, tiny_data):
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        _engine(tiny_module, tiny_data, FedAvg(seed=0), workers=2, accelerator="cuda")
    engine = _engine(tiny_module, tiny_data, FedAvg(seed=0), workers=2, accelerator="auto")
    assert engine.transport.worker_devices == ["cpu", "cpu"]
    engine.close()


def test_the_runtime_trains_on_the_device_it_is_given(tiny_module, tiny_data):
    runtime = ClientRuntime(tiny_module(), data=tiny_data, seed=0)
    runtime.use_device("cuda:1")
    assert (runtime.trainer_kwargs["accelerator"], runtime.trainer_kwargs["devices"]) == ("cuda", [1])
    runtime.use_device("cpu")
    assert (runtime.trainer_kwargs["accelerator"], runtime.trainer_kwargs["devices"]) == ("cpu", 1)
    with pytest.raises(ConfigError, match="`device` can be cpu, cuda or cuda:<index>, got 'cuda:x'"):
        runtime.use_device("cuda:x")


def test_cuda_workers_are_refused_once_this_process_initialized_cuda(tiny_module, tiny_data, monkeypatch):
    # a forked child cannot use CUDA that its parent initialized: refuse before forking
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    pool = ParallelClients(ClientRuntime(tiny_module(), data=tiny_data, seed=0), devices=["cuda:0", "cuda:0"])
    strategy = FedAvg(seed=0)
    initialize_strategy(strategy, tiny_module(), num_clients=3)
    with pytest.raises(ConfigError, match="CUDA was initialized in this process before the client workers started"):
        pool.submit(strategy.configure_round(0, [0, 1, 2]), ClientStore())
    assert not [p for p in mp.active_children() if p.name.startswith("lfp-client-worker")]  # nothing was forked


@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA device")
def test_workers_train_on_the_gpu_with_results_close_to_the_cpus(tiny_module, tiny_data):
    cpu = _engine(tiny_module, tiny_data, FedAvg(seed=0), workers=2)
    gpu = _engine(tiny_module, tiny_data, FedAvg(seed=0), workers=2, accelerator="cuda", workers_per_gpu=2)
    try:
        cpu.run(2)
        gpu.run(2)
    finally:
        cpu.close()
        gpu.close()
    assert gpu.transport.worker_devices == ["cuda:0", "cuda:0"]
    assert [r["num_results"] for r in gpu.history] == [3, 3]
    for k, v in cpu.strategy.global_state.items():
        torch.testing.assert_close(gpu.strategy.global_state[k], v, rtol=1e-4, atol=1e-5)  # floating-point order only


def test_a_worker_that_cannot_use_its_device_fails_its_clients_and_the_others_train(tiny_module, tiny_data):
    strategy = FedAvg(seed=0)
    initialize_strategy(strategy, tiny_module(), num_clients=3)
    pool = ParallelClients(ClientRuntime(tiny_module(), data=tiny_data, seed=0), devices=["cuda:x", "cpu"])
    try:
        out = pool.run_many(strategy.configure_round(0, [0, 1, 2]), ClientStore())
    finally:
        pool.close()
    # by work (samples 20 / 30 / 40), longest first: client 2 -> worker 0, client 1 -> worker 1, client 0 -> worker 1
    assert out[2].kind == "error" and "worker device 'cuda:x'" in out[2].reason and "`device` can be cpu, cuda" in out[2].reason
    assert [o.client_id for o in out[:2]] == [0, 1] and all(o.metrics.num_samples > 0 for o in out[:2])


def test_a_raising_client_and_an_oversized_result_fail_alike_in_workers(tiny_module, tiny_data_factory, client_probe):
    # client 3 raises in its training_step (inside a worker's fit, among other clients); results
    # above the size limit are rejected by the engine, which decodes what the workers send
    data = tiny_data_factory(sizes=(20, 30, 40, 25))

    def run(workers, max_bytes=None):
        module = tiny_module()
        module.fail_clients = frozenset({3})
        runtime = ClientRuntime(module, data=data, seed=4, callbacks=[client_probe])
        engine = SimulationEngine(strategy=FedAvg(seed=1), runtime=runtime, data=data, devices=make_devices(4, seed=2), seed=6,
                                  workers=workers, max_message_bytes=max_bytes)
        try:
            engine.run(2)
        finally:
            engine.close()
        return engine

    seq, par = run(1), run(2)
    _same(seq, par)
    failures = par.history[-1]["failures"]
    assert [(f["client_id"], f["kind"]) for f in failures] == [(3, "error")] and "injected failure for client 3" in failures[0]["reason"]
    with pytest.raises(AllClientsFailedError, match="all 4 selected clients failed.*rejected.*exceeds the limit of 100 bytes"):
        run(2, max_bytes=100)
