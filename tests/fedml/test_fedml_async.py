"""Async (m-of-N) rounds and a mid-training join over a real GRPC deployment: 1 server + 3 client processes.

The round rules are the simulator's (:class:`~lightning_fedprune.core.rounds.RoundRules`), applied
to real arrival times: client 2 joins in round 1, every round aggregates the first 2 arrivals and
the third task stays in flight into the next round (stale results are aggregated in the
in-process test of the same rules, ``test_fedml_loopback.py``, where arrival order is steady).
"""

from __future__ import annotations

import math

import pytest
import torch
from fedml_testing import grpc_deployment, need_fedml, read_jsonl, start_cli

from lightning_fedprune.core.serialization import load_state

ROUNDS = 4


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    need_fedml()
    base = tmp_path_factory.mktemp("grpc_async")
    logs = base / "logs"
    cfg, config, _ = grpc_deployment(base, f"rounds={ROUNDS}", "engine.mode=async", "engine.async_m=2", "engine.join_rounds={2: 1}")
    procs = {}
    try:
        procs["server"] = server = start_cli("server", ["server", str(config), "--no-progress"], logs)
        for rank in (1, 2, 3):
            procs[f"client_{rank}"] = start_cli(f"client_{rank}", ["client", str(config), "--rank", str(rank)], logs)
        rc = server.wait(400)
        clients = {n: p.wait(120) for n, p in procs.items() if n.startswith("client")}
        yield {"cfg": cfg, "server_rc": rc, "client_rc": clients, "procs": procs}
    finally:
        for p in procs.values():
            p.stop()


def test_async_rounds_and_a_join_run_to_the_end_over_grpc(async_run):
    assert async_run["server_rc"] == 0, async_run["procs"]["server"].text()[-3000:]
    assert async_run["client_rc"] == {"client_1": 0, "client_2": 0, "client_3": 0}
    cfg = async_run["cfg"]
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    assert records[0]["selected"] == [0, 1]  # client 2 joins in round 1
    assert 2 in records[1]["selected"]
    assert [r["num_results"] for r in records] == [2] * ROUNDS
    assert [r["num_in_flight"] for r in records] == [0] + [1] * (ROUNDS - 1)
    for prev, rec in zip(records, records[1:]):  # a busy client never gets a second task
        busy = {int(c) for c, info in prev["clients"].items() if info["status"] == "in_flight"}
        assert not busy & set(rec["selected"])
    # with real clocks the slowest task may stay in flight to the end: the server then waits for it
    # (its result is discarded) before telling the clients to finish, so no client sends into the void
    if records[-1]["num_in_flight"]:
        assert "task(s) still in flight before finishing" in async_run["procs"]["server"].text()
    assert all(math.isfinite(r["test_accuracy"]) for r in records)
    final = load_state(cfg.run_dir / "global_model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
