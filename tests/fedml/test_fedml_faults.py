"""Faults in a real GRPC deployment: a client killed mid-round, a server killed mid-round.

One deployment (server + 3 client processes, 4 rounds of FedMP with fixed ratios, long enough
local work that a round takes seconds):

1. client rank 3 is killed (SIGKILL) while it trains round 1: the server drops it at the round's
   deadline and round 1 completes with the other two. The kill waits a moment after the client
   says it trains: a process killed before its GRPC reply to the task reached the server is one
   the task never provably reached, which the server reports as a dropout at once instead;
2. the server is killed (SIGKILL) right after it sent round 2's tasks, and rank 3 is restarted;
3. the server is restarted with ``--resume``: it continues from its round-1 checkpoint, the live
   clients (which wait for it) and the restarted one join, and rounds 2 and 3 run with all three.

The final model must equal the model the same rounds give without any crash, given the same
client results: we replay the recorded participation in this process with the same strategy and
client runtime.
"""

from __future__ import annotations

import time

import pytest
import torch
from fedml_testing import RECIPES, need_fedml, read_jsonl, replay, secure_overrides, start_cli, wait_rounds

from lightning_fedprune.core.serialization import load_state
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, write_grpc_ipconfig

torch.set_num_threads(1)

ROUNDS, TIMEOUT_S = 4, 8.0
LOCAL_EPOCHS = 40  # 1-2 s of local work per round with three clients on 2 cores (15 epochs: 0.44 s)
KILL_AFTER_S = 0.5  # after "training": the task's GRPC reply is long back, the training far from done


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import free_port

    base = tmp_path_factory.mktemp("faults")
    logs = base / "logs"
    ipconfig = write_grpc_ipconfig(base / "ip.csv", {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)})
    cfg = DeploymentConfig.from_yaml(
        RECIPES / "digits_grpc.yaml",
        overrides=[
            f"rounds={ROUNDS}", f"run_dir={base / 'run'}", f"strategy.local_epochs={LOCAL_EPOCHS}", f"train_args.round_timeout_s={TIMEOUT_S}",
            f"comm_args.grpc_ipconfig_path={ipconfig}", "comm_args.hello_interval_s=0.5", *secure_overrides(base / "credentials"),
        ],
    )
    config = base / "deployment.yaml"
    config.write_text(cfg.to_yaml())
    metrics = cfg.run_dir / "metrics.jsonl"
    procs = {}
    try:
        procs["server"] = start_cli("server", ["server", str(config), "--no-progress"], logs)
        for r in (1, 2, 3):
            procs[f"client_{r}"] = start_cli(f"client_{r}", ["client", str(config), "--rank", str(r)], logs)
        # 1. kill rank 3 while it trains round 1
        procs["client_3"].wait_for("round 1: training clients [2]", timeout_s=180)
        time.sleep(KILL_AFTER_S)
        procs["client_3"].kill()
        wait_rounds(metrics, 2)
        # 2. kill the server right after it sent round 2's tasks; restart rank 3
        procs["server"].wait_for("round 2: sent", timeout_s=60)
        procs["server"].kill()
        procs["client_3b"] = start_cli("client_3b", ["client", str(config), "--rank", "3"], logs)
        # 3. a new server resumes from the checkpoint
        procs["server_b"] = start_cli("server_b", ["server", str(config), "--no-progress", "--resume"], logs)
        server_rc = procs["server_b"].wait(240)
        client_rc = {n: procs[n].wait(60) for n in ("client_1", "client_2", "client_3b")}
        yield {"cfg": cfg, "procs": procs, "server_rc": server_rc, "client_rc": client_rc, "records": read_jsonl(metrics)}
    finally:
        for p in procs.values():
            p.stop()


def test_a_killed_client_is_dropped_at_the_deadline_and_the_round_completes(crashed):
    rec = crashed["records"][1]
    assert rec["round"] == 1 and rec["num_selected"] == 3 and rec["num_results"] == 2
    assert [(f["client_id"], f["kind"]) for f in rec["failures"]] == [(2, "deadline")]
    assert "round_timeout_s" in rec["failures"][0]["reason"]
    assert rec["round_sim_time"] >= TIMEOUT_S
    assert rec["clients"]["2"]["status"] == "deadline" and rec["clients"]["0"]["status"] == "ok"


def test_a_restarted_server_resumes_and_the_restarted_client_rejoins(crashed):
    assert crashed["server_rc"] == 0, crashed["procs"]["server_b"].text()[-3000:]
    assert crashed["client_rc"] == {"client_1": 0, "client_2": 0, "client_3b": 0}
    records = crashed["records"]
    assert [r["round"] for r in records] == list(range(ROUNDS))  # no round lost or written twice
    assert [r["num_results"] for r in records[2:]] == [3, 3]  # rank 3 is back
    assert "resumed from" in crashed["procs"]["server_b"].text() and "at round 2" in crashed["procs"]["server_b"].text()
    assert "joined the run" in crashed["procs"]["client_3b"].text()
    for name in ("client_1", "client_2"):  # they waited for the new server and went on
        log = crashed["procs"][name].text()
        assert "the server restarted" in log and f"round {ROUNDS - 1}: sent 1 result(s)" in log


def test_the_final_model_is_the_one_the_same_client_results_give_without_a_crash(crashed):
    cfg = crashed["cfg"]
    expected = replay(cfg, crashed["records"])
    final = load_state(cfg.run_dir / "global_model.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-6, atol=1e-7)
