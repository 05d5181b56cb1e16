"""A real GRPC deployment on 127.0.0.1: 1 server + 3 client processes, 3 rounds of FedMP on digits.

One deployment is shared by the checks of this file (process start-up dominates on two cores):

* client 1 starts first and waits for the server (its idle CPU is measured), the server starts and
  waits for the other clients (its idle CPU is measured), and while it waits a probe without a
  certificate fails to connect, and a probe holding rank 1's certificate (not its message key)
  sends it a crafted pickle, an oversized message, a hello claiming rank 2 and an unsigned hello
  with FedML's own GRPC stub, and client 1 a FINISH posing as the server and a TASK nested 5,000
  deep;
* client 3 runs from a client package made with FedML's ``fedml build``, unzipped into a folder
  holding only its own data and config, with no access to the repository;
* server, client 1 and client 2 run under a socket audit hook.

The clients train sub-models of different sizes (fixed pruning ratios 0 / 0.3 / 0.6); the final
model must equal the simulator's for the same seeds.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import urllib.request
import zipfile

import pytest
import torch
from fedml_testing import (
    AUDIT_HOOK,
    ROOT,
    assert_simulators_model,
    grpc_deployment,
    idle_cpu_fraction,
    need_fedml,
    read_jsonl,
    start_cli,
    tcp_peers,
)

from lightning_fedprune.core.serialization import load_state
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

torch.set_num_threads(1)

ROUNDS = 3
MAX_MESSAGE = 1 << 20  # 1 MiB: the digits sub-models are < 210 kB

PROBE = AUDIT_HOOK + r"""
import json, os, pickle
import grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb2
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb2_grpc
from lightning_fedprune.fedml_adapters.envelope import Envelope, encode_envelope

host, port, marker, run_id, creds, client_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])

class Boom:
    def __reduce__(self):
        return (open, (marker, "w"))

opts = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 1 << 26)]
out = {}
def send(stub, name, data, client_id):
    try:
        stub.sendMessage(pb2.CommRequest(client_id=client_id, message=data), timeout=20)
        out[name] = "delivered"
    except grpc.RpcError as err:
        out[name] = str(err.code())
# an outsider (no certificate) cannot even connect
outsider = pb2_grpc.gRPCCommManagerStub(grpc.insecure_channel(f"{host}:{port}", options=opts))
send(outsider, "outsider", encode_envelope(Envelope("hello", 1, 0, run_id, "none", body={"clients": [0]})), 1)
# an insider: a process holding rank 1's certificate (not its message key), with FedML's own stub
read = lambda name: open(os.path.join(creds, name), "rb").read()
tls = grpc.ssl_channel_credentials(read("ca.pem"), read("rank_1.key"), read("rank_1.pem"))
stub = pb2_grpc.gRPCCommManagerStub(grpc.secure_channel(f"{host}:{port}", tls, options=opts))
send(stub, "pickle", pickle.dumps(Boom()), 1)
send(stub, "oversized", encode_envelope(Envelope("result", 1, 0, run_id, "x", 0, body={"client_id": 0}, payload=os.urandom(3 << 19))), 1)
send(stub, "other_rank", encode_envelope(Envelope("hello", 2, 0, run_id, "none", body={"clients": [1], "session": "evil"})), 2)
send(stub, "unsigned_hello", encode_envelope(Envelope("hello", 1, 0, run_id, "none", body={"clients": [0], "session": "evil"})), 1)
# and at client 1's port: a FINISH posing as the server, a TASK whose header nests 5,000 deep
from lightning_fedprune.fedml_adapters.envelope import ENVELOPE_VERSION, MAGIC
cstub = pb2_grpc.gRPCCommManagerStub(grpc.secure_channel(f"{host}:{client_port}", tls, options=opts))
send(cstub, "finish_to_client", encode_envelope(Envelope("finish", 0, 1, run_id, "x")), 0)
deep = ('{"type":"task","sender":0,"receiver":1,"run":"%s","session":"x","round":0,"body":' % run_id + "[" * 5000 + "]" * 5000 + ',"payload_bytes":0}').encode()
send(cstub, "deep_task", MAGIC + bytes([ENVELOPE_VERSION]) + len(deep).to_bytes(4, "big") + deep, 1)
# positive control of the audit hook: FedML's own config fetch (what fedml.init and an unset
# MQTT/S3 config do) tries to reach its cloud
from fedml.core.mlops.mlops_configs import MLOpsConfigs
try:
    MLOpsConfigs.fetch_all_configs()
    out["cloud_fetch"] = "succeeded"
except Exception as err:
    out["cloud_fetch"] = type(err).__name__
print("PROBE " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    need_fedml()
    base = tmp_path_factory.mktemp("grpc")
    logs = base / "logs"
    cfg, config, addresses = grpc_deployment(base, f"rounds={ROUNDS}", f"comm_args.max_message_bytes={MAX_MESSAGE}")
    audit = base / "audit.jsonl"
    out = {"cfg": cfg, "base": base, "audit": audit, "marker": base / "pwned", "addresses": addresses}

    procs = {}
    try:
        # the edge client: `fedml build` package of rank 3 with its own data (built meanwhile)
        procs["package"] = pkg = start_cli(
            "package", ["package", str(config), "--rank", "3", "--out", str(base / "pkg"), "--with-data"], logs, audit_log=audit
        )
        procs["client_1"] = c1 = start_cli("client_1", ["client", str(config), "--rank", "1"], logs, audit_log=audit)
        c1.wait_for("saying hello to the server")
        out["idle_client"] = idle_cpu_fraction(c1.pid, 3.0)  # waiting for a server that is not up
        procs["server"] = server = start_cli("server", ["server", str(config), "--no-progress"], logs, audit_log=audit)
        server.wait_for("rank 1 is up")
        out["idle_server"] = idle_cpu_fraction(server.pid, 3.0)  # waiting for ranks 2 and 3
        peers = tcp_peers(server.pid) | tcp_peers(c1.pid)
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, "127.0.0.1", str(addresses[0].port), str(out["marker"]), cfg.run_id,
             str(base / "credentials"), str(addresses[1].port)],
            capture_output=True, text=True, timeout=180, env={"PYTHONPATH": str(ROOT), "LFP_AUDIT_LOG": str(base / "probe_audit.jsonl"), "PATH": ""},
        )
        line = [x for x in probe.stdout.splitlines() if x.startswith("PROBE ")]
        assert line, probe.stdout[-2000:] + probe.stderr[-3000:]
        out["probe"] = json.loads(line[0][len("PROBE "):])
        server.wait_for("carries no authentication")
        procs["client_2"] = start_cli("client_2", ["client", str(config), "--rank", "2"], logs, audit_log=audit)
        assert pkg.wait(180) == 0, pkg.text()[-3000:]
        device = base / "device"  # unzipped away from the repository: only its own folder
        with zipfile.ZipFile(base / "pkg" / "dist-packages" / "client-package.zip") as zf:
            zf.extractall(device)
        out["device"] = device / "client-package" / "fedml"
        peers |= tcp_peers(server.pid) | tcp_peers(c1.pid)
        procs["client_3"] = start_cli("client_3", [], logs, script=["main_client.py"], cwd=out["device"], pythonpath=None)
        while server.popen.poll() is None:  # sample every process's sockets while the rounds run
            for p in procs.values():
                peers |= tcp_peers(p.pid)
            time.sleep(0.2)
        out["tcp_peers"] = peers
        out["server_rc"] = server.wait(240)
        t0 = time.monotonic()
        out["client_rc"] = {n: p.wait(60) for n, p in procs.items() if n.startswith("client")}
        out["client_exit_lag"] = time.monotonic() - t0
        out["procs"] = procs
        yield out
    finally:
        for p in procs.values():
            p.stop()


def test_deployment_ends_with_the_simulators_model(deployment):
    assert deployment["server_rc"] == 0, deployment["procs"]["server"].text()[-3000:]
    assert deployment["client_rc"] == {"client_1": 0, "client_2": 0, "client_3": 0}
    assert deployment["client_exit_lag"] < 10.0  # a clean shutdown: no hung RPC keeps a client alive
    cfg = deployment["cfg"]
    engine = assert_simulators_model(cfg)
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    assert [r["test_accuracy"] for r in records] == pytest.approx([r["test_accuracy"] for r in engine.history])
    # three sub-models of different sizes, the same payload bytes as in the simulator
    for rec, sim in zip(records, engine.history):
        down = [rec["clients"][str(c)]["bytes_down"] for c in range(3)]
        assert down[0] > down[1] > down[2]
        assert (rec["bytes_down"], rec["bytes_up"]) == (sim["bytes_down"], sim["bytes_up"])
        assert rec["num_results"] == 3 and rec["failures"] == []


def test_real_clocks_and_bytes_reach_the_reports(deployment):
    run_dir = deployment["cfg"].run_dir
    records = read_jsonl(run_dir / "metrics.jsonl")
    for rec in records:
        for c in range(3):
            cl = rec["clients"][str(c)]
            assert cl["status"] == "ok" and 0 < cl["seconds"] <= rec["round_sim_time"]
            assert cl["wire_down"] > cl["bytes_down"] and cl["wire_up"] > cl["bytes_up"]  # envelope + GRPC framing
        assert rec["wire_bytes_down"] > rec["bytes_down"]
    assert records[-1]["sim_time"] == pytest.approx(sum(r["round_sim_time"] for r in records))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == ROUNDS and summary["transport"]["backend"] == "GRPC"
    assert summary["transport"]["refused"] == 4  # the pickle, the oversized message, the other rank's, the unsigned hello
    for name in ("metrics.csv", "accuracy_vs_round.png", "accuracy_vs_sim_time.png", "accuracy_vs_bytes.png", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name


def test_a_crafted_pickle_is_refused_without_running(deployment):
    probe, server_log = deployment["probe"], deployment["procs"]["server"].text()
    assert probe["pickle"] == "delivered"  # the server accepted the bytes on FedML's GRPC service ...
    assert not deployment["marker"].exists()  # ... and never unpickled them
    assert "refused a" in server_log and "a Python pickle" in server_log and "refused without unpickling" in server_log
    # the oversized message: GRPC itself refused it at the limit, the server logged that
    assert probe["oversized"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert "GRPC ended the call before a whole message arrived" in server_log and f"limit of {MAX_MESSAGE} bytes" in server_log
    assert "the request claims rank 2 but the peer's certificate names ['lfp-rank-1']" in server_log
    assert "refused a 'hello' message claiming rank 1: it carries no authentication" in server_log
    assert probe["outsider"] == "StatusCode.UNAVAILABLE"  # no certificate: no connection
    client_log = deployment["procs"]["client_1"].text()  # client 1 refused both and trained every round
    assert "the request claims rank 0 but the peer's certificate names ['lfp-rank-1']" in client_log
    assert "envelope header nests deeper than 64 levels" in client_log
    assert f"trained in {ROUNDS} round(s)" in client_log
    assert deployment["server_rc"] == 0  # and the run went on


def test_no_connection_leaves_the_machine(deployment):
    audit = read_jsonl(deployment["audit"]) if deployment["audit"].exists() else []
    refused = [a for a in audit if not a["ok"]]
    assert refused == [], refused
    # GRPC's C core opens its sockets outside Python's audit hooks: the sockets the processes held
    # (read from /proc while they ran) connected to loopback addresses only
    assert {a.host for a in deployment["addresses"].values()} == {"127.0.0.1"}
    peers = deployment["tcp_peers"]
    assert "127.0.0.1" in peers, peers
    assert all(ipaddress.ip_address(p).is_loopback or ipaddress.ip_address(p).is_unspecified for p in peers), peers
    # the hook does catch egress: FedML's own cloud config fetch was refused in the probe
    probe_audit = read_jsonl(deployment["base"] / "probe_audit.jsonl")
    assert any(not a["ok"] and "fedml" in a["host"] for a in probe_audit), probe_audit
    assert deployment["probe"]["cloud_fetch"] != "succeeded"


def test_idle_processes_do_not_busy_poll_and_early_clients_wait(deployment):
    assert deployment["idle_client"] < 0.05
    assert deployment["idle_server"] < 0.05
    c1 = deployment["procs"]["client_1"].text()
    assert "joined the run" in c1 and f"trained in {ROUNDS} round(s)" in c1


def test_the_packaged_edge_client_trained_with_only_its_own_folder(deployment):
    device = deployment["device"]
    assert (device / "main_client.py").is_file() and (device / "config" / "fedml_config.yaml").is_file()
    assert (device.parent / "conf" / "fedml.yaml").read_text().count("entry_file: fedml/main_client.py") == 1
    assert sorted(p.name for p in (device / "data").iterdir()) == ["client_2.safetensors", "client_data.json"]
    # its own credentials only: the CA certificate, its certificate and key, its own message key
    creds = device / "config" / "credentials"
    assert sorted(p.name for p in creds.iterdir()) == ["ca.pem", "rank_3.json", "rank_3.key", "rank_3.pem"]
    assert json.loads((creds / "rank_3.json").read_text())["rank"] == 3 and "master" not in (creds / "rank_3.json").read_text()
    staged = deployment["base"] / "pkg" / "staging" / "config" / "credentials"  # (zip files keep no modes)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in staged.iterdir()) and staged.stat().st_mode & 0o777 == 0o700
    log = deployment["procs"]["client_3"].text()
    assert f"trained in {ROUNDS} round(s)" in log
    cfg = DeploymentConfig.from_yaml(device / "config" / "fedml_config.yaml")
    assert cfg.data_args.data_cache_dir == "../data"
    model = device / cfg.recipe.run_dir / "clients" / "rank_3" / "models" / "client_2.safetensors"
    assert load_state(model)["weights"]["model.features.0.weight"].shape == (120, 64)  # ratio 0.6


def test_serving_a_clients_pruned_model(deployment):
    from lightning_fedprune.fedml_adapters.services import free_port
    from lightning_fedprune.fedml_adapters.serving import load_client_model

    device = deployment["device"]
    port = free_port()
    serve_audit = deployment["base"] / "serve_audit.jsonl"
    serve = start_cli("serve", ["serve", "config/fedml_config.yaml", "--client-id", "2", "--port", str(port)],
                      deployment["base"] / "logs", cwd=device, pythonpath=None, audit_log=serve_audit)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
                    assert json.loads(resp.read()) == {"status": "Success"}
                    break
            except OSError:
                assert serve.popen.poll() is None, serve.text()[-3000:]
                assert time.monotonic() < deadline, serve.text()[-3000:]
                time.sleep(0.5)
        from lightning_fedprune.data import load_dataset

        x = load_dataset("digits").test.tensors[0][:16]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            served = json.loads(resp.read())
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=b'{"inputs": [[1, 2]]}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 400
    finally:
        serve.stop()
    cfg = DeploymentConfig.from_yaml(device / "config" / "fedml_config.yaml")
    local = load_client_model(cfg, 2, path=device / cfg.recipe.run_dir / "clients" / "rank_3" / "models" / "client_2.safetensors")
    assert local.module.model.features[0].weight.shape == (120, 64)  # the pruned sub-model is what is served
    expected = local.predict(x.tolist())
    audit = read_jsonl(serve_audit) if serve_audit.exists() else []
    assert [a for a in audit if not a["ok"]] == []  # serving made no connection off the machine
    assert served["predictions"] == expected["predictions"] and served["client_id"] == 2 and served["round"] == ROUNDS - 1
    assert torch.allclose(torch.tensor(served["probabilities"]), torch.tensor(expected["probabilities"]), atol=1e-6)
