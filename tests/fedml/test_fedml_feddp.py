"""FedDP deployed: gates stay in each client process (across rounds and restarts), nothing
gate-related goes on the wire, and the end state is the simulator's.

* in one process over the loopback transport (real envelopes and codec): 2 rounds, then every
  client and the server restart (new objects on the same run folder; the server resumes) for a
  3rd round; every envelope is inspected;
* as real processes over GRPC: 1 server + 3 client processes, 3 rounds.
"""

from __future__ import annotations

import threading

import pytest
import torch
from fedml_testing import RECIPES, SerialRuntime, need_fedml, read_jsonl, secure_overrides, simulate, start_cli
from safetensors.torch import load as st_load

from lightning_fedprune.callbacks.gates import GATE_STATE_KEY
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.fedml_adapters.client import FedMLClient, client_dir
from lightning_fedprune.fedml_adapters.server import FedMLServer
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, write_grpc_ipconfig

torch.set_num_threads(1)

ROUNDS = 3


def _cfg(run_dir, *extra):
    return DeploymentConfig.from_yaml(
        RECIPES / "digits_feddp_grpc.yaml",
        overrides=[f"rounds={ROUNDS}", f"run_dir={run_dir}", "comm_args.hello_interval_s=0.05", "train_args.round_timeout_s=60", *extra],
    )


def _client_gates(cfg, rank, client_id):
    return ClientStore(spill_dir=client_dir(cfg, rank) / "state").get(client_id)[GATE_STATE_KEY]


def _assert_like_the_simulator(cfg, global_state, gates_of):
    engine = simulate(cfg)
    for k, v in engine.strategy.global_state.items():
        torch.testing.assert_close(global_state[k], v, rtol=1e-6, atol=1e-7)
    for c in range(3):
        sim = engine.store.get(c)[GATE_STATE_KEY]
        dep = gates_of(c)
        assert set(dep) == set(sim) and len(sim) == 4  # two gated convolutions, weight + bias
        for k in sim:
            torch.testing.assert_close(dep[k], sim[k], rtol=1e-6, atol=1e-7)
    return engine


def _session(hub, cfg, *, resume):
    """Server + 3 clients over ``hub``; returns the server, the clients and every endpoint used."""
    from lightning_fedprune.fedml_adapters.components import build_client_runtime

    endpoints, clients, threads = [], [], []
    for rank in (1, 2, 3):
        ep = hub.endpoint(rank)
        endpoints.append(ep)
        c = FedMLClient(cfg, rank, endpoint=ep, runtime=SerialRuntime(build_client_runtime(cfg, rank)))
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        clients.append(c)
        threads.append(t)
    ep0 = hub.endpoint(0)
    endpoints.append(ep0)
    server = FedMLServer(cfg, endpoint=ep0, resume=resume)
    server.run()
    for t in threads:
        t.join(timeout=30)
    return server, clients, endpoints


def test_feddp_in_process_gates_survive_restarts_and_never_travel(tmp_path, loopback):
    from fedml_testing import LoopbackHub

    run = tmp_path / "run"
    # Execute: 2 rounds; then new client objects and a resumed server on the same run folder
    cfg2 = _cfg(run, "rounds=2")
    _, first, eps1 = _session(loopback, cfg2, resume=False)
    kept = {c: _client_gates(cfg2, 1 + c % 3, c) for c in range(3)}
    cfg = _cfg(run)
    server, clients, eps2 = _session(LoopbackHub(), cfg, resume=True)
    # Assert: the restarted clients trained round 2 only, from the gates they had kept on disk
    assert [c.rounds_trained for c in first] == [2, 2, 2] and [c.rounds_trained for c in clients] == [1, 1, 1]
    assert [r["round"] for r in server.history][-1] == ROUNDS - 1
    for c in range(3):
        key = "model.features.0/linear.weight"
        assert not torch.equal(_client_gates(cfg, 1 + c % 3, c)[key], kept[c][key])
    # the same model and the same gates as the simulator's uninterrupted 3 rounds
    _assert_like_the_simulator(cfg, server.strategy.global_state, lambda c: _client_gates(cfg, 1 + c % 3, c))
    # every envelope of both sessions: no gate tensor, only backbone weights and control variates
    sent = [e for ep in (*eps1, *eps2) for e in ep.sent]
    kinds = {e.type for e in sent}
    assert {"task", "result"} <= kinds, kinds
    backbone = set(server.strategy.global_state)
    gate_values = [v for st in kept.values() for v in st.values()]
    gate_values += [v for c in range(3) for v in _client_gates(cfg, 1 + c % 3, c).values()]
    n_tensors = 0
    for env in sent:
        assert "gate" not in str(env.body)
        if not env.payload:
            continue
        for key, t in st_load(env.payload).items():
            n_tensors += 1
            assert "gate" not in key, key
            name = key.split("/", 1)[1]
            assert name in backbone or name.split("/", 1)[1] in backbone, key
            assert not any(t.shape == g.shape and torch.equal(t, g) for g in gate_values), key
    assert n_tensors > 0


def test_feddp_over_grpc_with_three_client_processes_ends_like_the_simulator(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import free_port

    ipconfig = write_grpc_ipconfig(tmp_path / "ip.csv", {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)})
    cfg = _cfg(tmp_path / "run", f"comm_args.grpc_ipconfig_path={ipconfig}", "comm_args.hello_interval_s=0.5", *secure_overrides(tmp_path / "tls"))
    config = tmp_path / "deployment.yaml"
    config.write_text(cfg.to_yaml())
    logs = tmp_path / "logs"
    procs = {}
    try:
        for rank in (1, 2, 3):
            procs[f"client_{rank}"] = start_cli(f"client_{rank}", ["client", str(config), "--rank", str(rank)], logs)
        procs["server"] = server = start_cli("server", ["server", str(config), "--no-progress"], logs)
        assert server.wait(240) == 0, server.text()[-3000:]
        assert {n: p.wait(60) for n, p in procs.items() if n != "server"} == {"client_1": 0, "client_2": 0, "client_3": 0}
    finally:
        for p in procs.values():
            p.stop()
    from lightning_fedprune.core.serialization import load_state

    final = load_state(cfg.run_dir / "global_model.safetensors")
    engine = _assert_like_the_simulator(cfg, final, lambda c: _client_gates(cfg, 1 + c % 3, c))
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for rec, sim in zip(records, engine.history):
        assert rec["num_results"] == 3 and rec["failures"] == []
        assert (rec["bytes_down"], rec["bytes_up"]) == (sim["bytes_down"], sim["bytes_up"])  # the same payloads
        # the clients' gated local accuracy is what the simulator's clients measured
        assert rec["local_acc_mean"] == pytest.approx(sim["local_acc_mean"])
