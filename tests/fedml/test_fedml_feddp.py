"""FedDP deployed: gates stay in each client process (across rounds and restarts), nothing
gate-related goes on the wire, and the end state is the simulator's.

* in one process over the loopback transport (real envelopes and codec): 2 rounds, then every
  client and the server restart (new objects on the same run folder; the server resumes) for a
  3rd round; every envelope is inspected;
* in one process, FedMP's sub-models under the ``feddp`` wrapper: full-width gates on every client
  and the simulator's end state;
* as real processes over GRPC: 1 server + 3 client processes, 3 rounds;
* as real processes over GRPC with client rank 3 killed (SIGKILL) while it trains round 1 and
  started again: the server drops its round-1 task, the new process joins, takes its gates (and
  SCAFFOLD's control variate) from its state folder and trains round 2; the run ends with the model
  and gates that the same participation gives in one process.
"""

from __future__ import annotations

import time

import pytest
import torch
from fedml_testing import RECIPES, LoopbackHub, need_fedml, read_jsonl, run_deployment, secure_overrides, session, simulate, start_cli
from safetensors.torch import load as st_load

from lightning_fedprune.callbacks.gates import GATE_STATE_KEY
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientFailure
from lightning_fedprune.fedml_adapters.client import client_dir
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


def test_feddp_in_process_gates_survive_restarts_and_never_travel(tmp_path, loopback):
    run = tmp_path / "run"
    # Execute: 2 rounds; then new client objects and a resumed server on the same run folder
    cfg2 = _cfg(run, "rounds=2")
    _, first, eps1 = session(loopback, cfg2, resume=False)
    kept = {c: _client_gates(cfg2, 1 + c % 3, c) for c in range(3)}
    cfg = _cfg(run)
    server, clients, eps2 = session(LoopbackHub(), cfg, resume=True)
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


def test_gated_fedmp_sub_models_in_process_end_like_the_simulator(tmp_path, loopback):
    # FedMP's sub-models (ratios 0.5 / 0.25 / 0) under the feddp wrapper, through the FedML adapters
    cfg = _cfg(
        tmp_path / "run", "strategy.name=fedmp", "strategy.options={fixed_ratios: {0: 0.5, 1: 0.25}}",
        "strategy.wrappers=[{name: feddp, options: {keep_ratio: 0.5, lasso: 0.001}}]",
    )
    server, clients, _ = session(loopback, cfg, resume=False)
    assert [c.rounds_trained for c in clients] == [ROUNDS] * 3
    assert [server.history[-1][f"agg/ratio/{c}"] for c in range(3)] == [0.5, 0.25, 0.0]
    for c in range(3):  # every client keeps its gates at the full width of cnn_digits
        gates = _client_gates(cfg, 1 + c % 3, c)
        assert gates["model.features.0/linear.weight"].shape == (16, 1) and gates["model.features.3/linear.weight"].shape == (32, 16)
    _assert_like_the_simulator(cfg, server.strategy.global_state, lambda c: _client_gates(cfg, 1 + c % 3, c))


def test_feddp_over_grpc_with_three_client_processes_ends_like_the_simulator(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import free_port

    ipconfig = write_grpc_ipconfig(tmp_path / "ip.csv", {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)})
    cfg = _cfg(tmp_path / "run", f"comm_args.grpc_ipconfig_path={ipconfig}", "comm_args.hello_interval_s=0.5", *secure_overrides(tmp_path / "tls"))
    config = tmp_path / "deployment.yaml"
    config.write_text(cfg.to_yaml())
    run_deployment(config, tmp_path / "logs")
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


def test_feddp_over_grpc_a_killed_and_restarted_client_recovers_its_gates(tmp_path):
    need_fedml()
    from lightning_fedprune.core.serialization import load_state
    from lightning_fedprune.fedml_adapters.services import free_port
    from lightning_fedprune.simulation import build_run

    ipconfig = write_grpc_ipconfig(tmp_path / "ip.csv", {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)})
    # 12 local epochs: a client's round takes about 1.2 s (6: 0.6 s), long enough to kill it mid-training
    cfg = _cfg(
        tmp_path / "run", f"comm_args.grpc_ipconfig_path={ipconfig}", "comm_args.hello_interval_s=0.5",
        "train_args.round_timeout_s=180", "strategy.local_epochs=12", *secure_overrides(tmp_path / "tls"),
    )
    config = tmp_path / "deployment.yaml"
    config.write_text(cfg.to_yaml())
    logs = tmp_path / "logs"
    procs = {}
    try:
        procs["server"] = server = start_cli("server", ["server", str(config), "--no-progress"], logs)
        for rank in (1, 2, 3):
            procs[f"client_{rank}"] = start_cli(f"client_{rank}", ["client", str(config), "--rank", str(rank)], logs)
        # Execute: kill rank 3 (client 2) while it trains round 1, then start it again
        procs["client_3"].wait_for("round 1: training clients [2]", timeout_s=240)
        time.sleep(0.3)  # its GRPC reply to the task is back at the server: the task provably arrived
        procs["client_3"].kill()
        after_round0 = _client_gates(cfg, 3, 2)
        procs["client_3b"] = start_cli("client_3b", ["client", str(config), "--rank", "3"], logs)
        assert server.wait(300) == 0, server.text()[-3000:]
        rcs = {n: procs[n].wait(60) for n in ("client_1", "client_2", "client_3b")}
        assert rcs == {"client_1": 0, "client_2": 0, "client_3b": 0}
    finally:
        for p in procs.values():
            p.stop()
    # Assert: round 1 completed without client 2, dropped when its process came back; round 2 had all three
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    assert [r["num_results"] for r in records] == [3, 2, 3]
    assert [(f["client_id"], f["kind"]) for f in records[1]["failures"]] == [(2, "dropout")]
    assert "restarted and lost its task" in records[1]["failures"][0]["reason"]
    restarted = procs["client_3b"].text()
    assert "joined the run" in restarted and "round 2: training clients [2]" in restarted
    assert "round 1: training" not in restarted
    # the restarted process started round 2 from the gates its predecessor saved after round 0
    # (the kill came before round 1's were saved) and trained them further
    final_gates = {c: _client_gates(cfg, 1 + c % 3, c) for c in range(3)}
    assert all(not torch.equal(final_gates[2][k], after_round0[k]) for k in after_round0)
    # the same participation in one process (the recorded selections and failures) gives the same
    # model and every client's same gates: client 2's only if it resumed from the saved ones
    engine, _ = build_run(cfg.recipe.apply_overrides(["run_dir=null"]), listeners=[])
    strategy, runtime, store = engine.strategy, engine.runtime, ClientStore()
    for rec in records:
        rnd = rec["round"]
        failed = {f["client_id"] for f in rec["failures"]}
        tasks = strategy.configure_round(rnd, rec["selected"])
        results = runtime.run_many([t for t in tasks if t.client_id not in failed], store)
        strategy.aggregate(rnd, results, [ClientFailure(rnd, f["client_id"], f["kind"], f["reason"]) for f in rec["failures"]])
        if rnd == 0:
            assert all(torch.equal(store.get(2)[GATE_STATE_KEY][k], v) for k, v in after_round0.items())
    final = load_state(cfg.run_dir / "global_model.safetensors")
    for k, v in strategy.global_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-6, atol=1e-7)
    for c in range(3):
        sim = store.get(c)[GATE_STATE_KEY]
        assert set(final_gates[c]) == set(sim)
        for k in sim:
            torch.testing.assert_close(final_gates[c][k], sim[k], rtol=1e-6, atol=1e-7)
