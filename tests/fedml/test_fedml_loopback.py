"""The deployment's server and client logic in one process over an in-memory transport.

The envelopes go through the real codec; only the sockets are missing. These tests need no FedML
and pin the behaviour the process-level tests then show over GRPC and MQTT_S3.
"""

from __future__ import annotations

import threading

import pytest
import torch
from fedml_testing import RECIPES, LoopbackHub, SerialRuntime, assert_simulators_model, session, simulate

from lightning_fedprune.core.messages import ClientResult, encode_result
from lightning_fedprune.fedml_adapters.client import FedMLClient, model_path
from lightning_fedprune.fedml_adapters.envelope import Envelope
from lightning_fedprune.fedml_adapters.server import FedMLServer
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

torch.set_num_threads(1)

#: NestFL with fixed rates: nested sub-networks of three sizes, t = 3 local steps
NESTFL = ("strategy.name=nestfl", "strategy.local_steps=3", "strategy.options={fixed_rates: {0: 0.0, 1: 0.25, 2: 0.5}}")


def _cfg(tmp_path, *extra: str) -> DeploymentConfig:
    return DeploymentConfig.from_yaml(
        RECIPES / "digits_grpc.yaml",
        overrides=["rounds=2", f"run_dir={tmp_path / 'run'}", "comm_args.hello_interval_s=0.05", "train_args.round_timeout_s=30", *extra],
    )


def _start_clients(cfg, hub, ranks, *, runtime_wrap=SerialRuntime):
    from lightning_fedprune.fedml_adapters.components import build_client_runtime

    clients, threads = [], []
    for rank in ranks:
        c = FedMLClient(cfg, rank, endpoint=hub.endpoint(rank), runtime=runtime_wrap(build_client_runtime(cfg, rank)))
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        clients.append(c)
        threads.append(t)
    return clients, threads


def test_a_deployment_ends_with_the_simulators_model(tmp_path, loopback):
    # Prepare: FedMP with fixed ratios 0 / 0.3 / 0.6: three sub-models of different shapes
    cfg = _cfg(tmp_path)
    clients, threads = _start_clients(cfg, loopback, [1, 2, 3])  # clients first: they wait for the server
    # Execute
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    summary = server.run()
    for t in threads:
        t.join(timeout=30)
    # Assert: same final model and accuracy as the simulator for the same seeds
    engine = simulate(cfg)
    for k, v in engine.strategy.global_state.items():
        torch.testing.assert_close(server.strategy.global_state[k], v, rtol=1e-6, atol=1e-7)
    assert summary["final"]["test_accuracy"] == pytest.approx(engine.history[-1]["test_accuracy"])
    assert all(not t.is_alive() for t in threads) and [c.rounds_trained for c in clients] == [2, 2, 2]
    rec = server.history[0]
    assert rec["num_results"] == 3 and rec["failures"] == []
    # sub-models of different sizes went down; payload bytes equal the simulator's
    down = [rec["clients"][str(c)]["bytes_down"] for c in range(3)]
    assert down[0] > down[1] > down[2]
    assert rec["bytes_down"] == engine.history[0]["bytes_down"]
    assert all(rec["clients"][str(c)]["seconds"] > 0 for c in range(3))
    # each client's trained sub-model was kept for serving
    from lightning_fedprune.core.serialization import load_state

    shapes = {c: tuple(load_state(model_path(cfg, c))["weights"]["model.features.0.weight"].shape) for c in range(3)}
    assert shapes == {0: (300, 64), 1: (210, 64), 2: (120, 64)}


def test_a_client_sending_a_mismatched_result_is_rejected_and_the_round_goes_on(tmp_path, loopback, caplog):
    cfg = _cfg(tmp_path, "rounds=1")

    class Tamper(SerialRuntime):
        def run_many(self, tasks, store):
            out = super().run_many(tasks, store)
            r = out[0]
            bad = dict(r.weights)
            bad["model.features.0.weight"] = torch.zeros(5, 64)  # not the plan's shape
            return [ClientResult(round=r.round, client_id=r.client_id, weights=bad, metrics=r.metrics)]

    _start_clients(cfg, loopback, [1, 2], runtime_wrap=SerialRuntime)
    _start_clients(cfg, loopback, [3], runtime_wrap=Tamper)
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    with caplog.at_level("WARNING"):
        server.run()
    rec = server.history[0]
    assert rec["num_results"] == 2
    assert [(f["client_id"], f["kind"]) for f in rec["failures"]] == [(2, "rejected")]
    assert "model.features.0.weight" in rec["failures"][0]["reason"] and "client 2 rejected" in caplog.text


def test_unknown_senders_and_stale_rounds_are_dropped(tmp_path, loopback, caplog):
    cfg = _cfg(tmp_path, "rounds=1")
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    spy = loopback.endpoint(9)
    spy.start(lambda env, n: None)

    class Probe(SerialRuntime):
        """Before training, sends forged messages to the server."""

        def run_many(self, tasks, store):
            t = tasks[0]
            r = self.inner.run_many(tasks, store)[0]
            payload = encode_result(r)
            forged = [
                Envelope("result", 9, 0, cfg.run_id, server.session, t.round, body={"client_id": 0}, payload=payload),
                Envelope("result", 1, 0, cfg.run_id, server.session, t.round + 7, body={"client_id": 0}, payload=payload),
                Envelope("result", 1, 0, cfg.run_id, "stale", t.round, body={"client_id": 0}, payload=payload),
                Envelope("hello", 1, 0, "another-run", "x", body={"clients": [0], "session": "y"}),
                Envelope("task", 1, 0, cfg.run_id, "x", 0, body={}, payload=b"x"),
            ]
            for env in forged:
                spy.send(env)
            return [r]

    _start_clients(cfg, loopback, [1], runtime_wrap=Probe)
    _start_clients(cfg, loopback, [2, 3])
    with caplog.at_level("WARNING"):
        server.run()
    text = caplog.text
    reasons = ("unknown sender", "round 7, the current round is 0", "earlier server session", "belongs to run 'another-run'", "does not take 'task'")
    for reason in reasons:
        assert reason in text, reason
    assert server.history[0]["num_results"] == 3  # the forgeries changed nothing
    assert server.dropped_messages == 5


def test_a_restarted_server_resumes_from_its_checkpoint(tmp_path, loopback):
    # Prepare: the reference (uninterrupted) run
    cfg = _cfg(tmp_path, "rounds=3")
    _, threads = _start_clients(cfg, loopback, [1, 2, 3])
    ref = FedMLServer(cfg.replace(), endpoint=loopback.endpoint(0))
    ref.run()
    ref_state = {k: v.clone() for k, v in ref.strategy.global_state.items()}
    for t in threads:
        t.join(timeout=30)
    # Execute: a server that stops after 2 rounds, then a new server process resuming (clients stay up)
    cfg2 = _cfg(tmp_path / "b", "rounds=3")
    hub = type(loopback)()
    _, threads = _start_clients(cfg2, hub, [1, 2, 3])
    first = FedMLServer(cfg2, endpoint=hub.endpoint(0))
    first.rounds = 2  # dies after round 1's checkpoint (without telling the clients)
    first.transport.stop = lambda: first.transport._endpoint.close()
    first.run()
    second = FedMLServer(cfg2, endpoint=hub.endpoint(0), resume=True)
    second.run()
    for t in threads:
        t.join(timeout=30)
    # Assert
    assert second.history[0]["round"] == 0 and len(second.history) == 3 and second.next_round == 3
    for k, v in ref_state.items():
        assert torch.equal(second.strategy.global_state[k], v), k


def test_measured_completion_times_feed_fedmps_bandit(tmp_path, loopback):
    # FedMP with E-UCB (no fixed ratios): its reward reads each result's completion_time
    cfg = _cfg(tmp_path, "rounds=2", "strategy.options={}")
    _, threads = _start_clients(cfg, loopback, [1, 2, 3])
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    server.run()
    for t in threads:
        t.join(timeout=30)
    for rec in server.history:
        seconds = [rec["clients"][str(c)]["seconds"] for c in range(3)]
        assert rec["agg/time_mean"] == pytest.approx(sum(seconds) / 3)
        assert rec["agg/time_max"] == pytest.approx(max(seconds))
    assert server.strategy.bandit.state_dict() != type(server.strategy)(seed=0).bandit.state_dict()


def test_processes_serving_several_stateful_clients_match_the_simulator(tmp_path, loopback):
    # SCAFFOLD keeps a control variate per client on the client side, across rounds; two processes
    # serve two clients each and train each round's pair in one Trainer.fit
    cfg = _cfg(
        tmp_path, "rounds=3", "data.num_clients=4", "device_args.worker_num=2", "strategy.name=scaffold",
        "strategy.options={}", "model.momentum=0.0", "strategy.fraction_fit=0.75",
    )
    server, clients, _ = session(loopback, cfg)
    engine = assert_simulators_model(cfg, server.strategy.global_state)
    for k, v in engine.strategy.control.items():
        torch.testing.assert_close(server.strategy.control[k], v, rtol=1e-6, atol=1e-7)
    # the same seeded client sampling as the simulator: 3 of 4 clients per round
    assert [r["selected"] for r in server.history] == [engine.strategy.sample(r, [0, 1, 2, 3]) for r in range(3)]
    assert [len(r["selected"]) for r in server.history] == [3, 3, 3]
    # each process kept its clients' control variates in its own store, on disk
    assert sorted(clients[0].store.client_ids()) and set(clients[0].store.client_ids()) <= {0, 2}
    assert set(clients[1].store.client_ids()) <= {1, 3}


def test_clients_that_join_mid_training_match_the_simulator(tmp_path, loopback):
    # client 2 exists from round 1 on: round 0 trains clients 0 and 1 only, as in the simulator
    cfg = _cfg(tmp_path, "rounds=3", "engine.join_rounds={2: 1}")
    _, threads = _start_clients(cfg, loopback, [1, 2, 3])
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    server.run()
    for t in threads:
        t.join(timeout=30)
    assert [rec["selected"] for rec in server.history] == [[0, 1], [0, 1, 2], [0, 1, 2]]
    engine = simulate(cfg)
    for k, v in engine.strategy.global_state.items():
        torch.testing.assert_close(server.strategy.global_state[k], v, rtol=1e-6, atol=1e-7)


def test_async_rounds_aggregate_the_first_m_arrivals_and_carry_the_rest(tmp_path, loopback):
    cfg = _cfg(tmp_path, "rounds=4", "engine.mode=async", "engine.async_m=2")
    _, threads = _start_clients(cfg, loopback, [1, 2, 3])
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    summary = server.run()
    for t in threads:
        t.join(timeout=30)
    hist = server.history
    assert [rec["num_results"] for rec in hist] == [2, 2, 2, 2]
    assert [len(rec["selected"]) for rec in hist] == [3, 2, 2, 2]  # every idle client gets a task
    # after round 0 one task is always still in flight, and it is never sent a second task
    assert all(rec["num_in_flight"] == 1 for rec in hist)
    for prev, rec in zip(hist, hist[1:]):
        busy = [c for c, info in prev["clients"].items() if info["status"] == "in_flight"]
        assert not set(int(c) for c in busy) & set(rec["selected"])
    # a result carried from an earlier round is aggregated with its staleness
    assert max(rec["staleness_max"] for rec in hist[1:]) >= 1
    assert all(torch.isfinite(v).all() for v in server.strategy.global_state.values() if v.is_floating_point())
    assert summary["final"]["round"] == 3


def test_nestfl_deployment_matches_the_simulator_and_clients_keep_their_personalized_models(tmp_path, loopback):
    from lightning_fedprune.callbacks.personal import personal_model
    from lightning_fedprune.core.client_store import ClientStore
    from lightning_fedprune.fedml_adapters.client import client_dir

    cfg = _cfg(tmp_path, "rounds=2", *NESTFL)
    server, _, _ = session(loopback, cfg)
    engine = assert_simulators_model(cfg, server.strategy.global_state)
    # each client process kept its trained sub-network in its own state folder, as the simulator did
    for c in range(3):
        own = personal_model(ClientStore(client_dir(cfg, cfg.rank_of_client(c)) / "state").get(c))
        sim = personal_model(engine.store.get(c))
        assert own is not None and own["round"] == 1
        for k, v in sim["weights"].items():
            torch.testing.assert_close(own["weights"][k], v, rtol=1e-6, atol=1e-7)


def test_nestfl_clients_keep_their_personalized_models_across_a_restart(tmp_path, loopback):
    from lightning_fedprune.callbacks.personal import PERSONAL_STATE_KEY, personal_model
    from lightning_fedprune.core.client_store import ClientStore
    from lightning_fedprune.core.messages import decode_result, decode_task
    from lightning_fedprune.fedml_adapters.client import client_dir

    def own(cfg, c):  # the personalized model in the state folder of client c's process
        return personal_model(ClientStore(spill_dir=client_dir(cfg, cfg.rank_of_client(c)) / "state").get(c))

    class Held(SerialRuntime):
        """Records the personalized model each client holds when its training starts."""

        held: dict[int, dict] = {}

        def run_many(self, tasks, store):
            for t in tasks:
                entry = personal_model(store.get(t.client_id))
                self.held[t.client_id] = {**entry, "weights": {k: v.clone() for k, v in entry["weights"].items()}} if entry else None
            return super().run_many(tasks, store)

    # Execute: 2 rounds; then new client objects and a resumed server on the same run folder for round 2
    cfg2 = _cfg(tmp_path, "rounds=2", *NESTFL)
    _, first, eps1 = session(loopback, cfg2)
    kept = {c: own(cfg2, c) for c in range(3)}
    cfg = _cfg(tmp_path, "rounds=3", *NESTFL)
    server, clients, eps2 = session(LoopbackHub(), cfg, resume=True, runtime_wrap=Held)
    # Assert: the restarted clients trained round 2 only, holding the sub-networks they kept on disk
    assert [c.rounds_trained for c in first] == [2, 2, 2] and [c.rounds_trained for c in clients] == [1, 1, 1]
    assert [r["round"] for r in server.history] == [0, 1, 2]
    engine = simulate(cfg)
    for k, v in engine.strategy.global_state.items():
        assert torch.equal(server.strategy.global_state[k], v), k
    for c in range(3):
        before, held, after, sim = kept[c], Held.held[c], own(cfg, c), personal_model(engine.store.get(c))
        assert held is not None, f"client {c} restarted without the personalized model it kept"
        assert before["round"] == held["round"] == 1 and after["round"] == sim["round"] == 2
        assert held["kept"] == before["kept"] and set(held["weights"]) == set(before["weights"])
        assert all(torch.equal(held["weights"][k], v) for k, v in before["weights"].items())
        assert set(after["weights"]) == set(before["weights"]) == set(sim["weights"])
        assert all(not torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
        for k, v in sim["weights"].items():
            assert torch.equal(after["weights"][k], v), k
    # every envelope of both sessions: a personalized sub-network travels only as the result of the
    # round that trained it; tasks carry the global model's sub-models, other messages no tensors
    personal = {(1, c): kept[c]["weights"] for c in range(3)} | {(2, c): own(cfg, c)["weights"] for c in range(3)}
    sent = [e for ep in (*eps1, *eps2) for e in ep.sent]
    assert {"task", "result"} <= {e.type for e in sent}
    results = 0
    for env in sent:
        assert PERSONAL_STATE_KEY not in str(env.body)
        if env.type == "result":
            r = decode_result(env.payload)
            results += 1
            if (r.round, r.client_id) in personal:
                mine = personal[(r.round, r.client_id)]
                assert set(r.weights) == set(mine) and all(torch.equal(r.weights[k], mine[k]) for k in mine)
            others = [w for (rnd, c), ws in personal.items() if (rnd, c) != (r.round, r.client_id) for w in ws.values()]
            tensors = list(r.weights.values()) + list(r.extras.values())
        elif env.type == "task":
            t = decode_task(env.payload)
            others = [w for ws in personal.values() for w in ws.values()]
            tensors = list(t.weights.values()) + list(t.extras.values())
        else:
            assert not env.payload, env.type
            continue
        assert not any(x.shape == w.shape and torch.equal(x, w) for x in tensors for w in others)
    assert results == 3 * 3
