"""The MQTT_S3 transport with a real broker (mosquitto) and a real S3-compatible store (moto server).

Runs ``examples/fedml_one_machine.py --backend MQTT_S3``, i.e. ``python -m lightning_fedprune launch``,
which starts the broker, the store, the server and three client processes, shows one progress
view and stops everything; then the example compares the result with the simulator. A second
check drives the broker and store helpers directly and shows a consumed object is deleted.
"""

from __future__ import annotations

import json

import pytest
import torch
from fedml_testing import RECIPES, ROOT, need_mqtt_s3, read_jsonl, simulate, start_cli

from lightning_fedprune.core.serialization import load_state
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

torch.set_num_threads(1)

ROUNDS = 3


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    need_mqtt_s3()
    base = tmp_path_factory.mktemp("mqtt")
    run_dir = base / "run"
    proc = start_cli(
        "example", ["--backend", "MQTT_S3", "--rounds", str(ROUNDS), "--run-dir", str(run_dir)], base,
        script=[str(ROOT / "examples" / "fedml_one_machine.py")],
    )
    code = proc.wait(300)
    return {"code": code, "out": proc.text(), "run_dir": run_dir}


def test_mqtt_s3_deployment_ends_with_the_simulators_model(launched):
    assert launched["code"] == 0, launched["out"][-4000:]
    run_dir = launched["run_dir"]
    cfg = DeploymentConfig.from_yaml(RECIPES / "digits_mqtt_s3.yaml", overrides=[f"rounds={ROUNDS}", f"run_dir={run_dir}"])
    engine = simulate(cfg)
    final = load_state(run_dir / "global_model.safetensors")
    for k, v in engine.strategy.global_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-6, atol=1e-7)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["test_accuracy"] for r in records] == pytest.approx([r["test_accuracy"] for r in engine.history])
    down = [records[0]["clients"][str(c)]["bytes_down"] for c in range(3)]
    assert down[0] > down[1] > down[2]  # sub-models of different sizes
    assert "largest difference of the final global models" in launched["out"]


def test_launch_shows_one_progress_view_and_cleans_up(launched):
    out, run_dir = launched["out"], launched["run_dir"]
    assert out.count("Run summary") == 1 and "over FedML MQTT_S3" in out
    assert f"round {ROUNDS - 1} ({ROUNDS}/{ROUNDS} done)" in out  # round numbers count from 0
    assert "Total measured time" in out and "simulated" not in out  # a deployment's times are measured
    info = json.loads((run_dir / "launch" / "launch.json").read_text())
    assert info["exit_codes"] == {"server": 0, "client_1": 0, "client_2": 0, "client_3": 0}
    assert info["objects_left"] == 0  # every object in the store was deleted once consumed
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["transport"]
    assert t["backend"] == "MQTT_S3" and t["objects_put"] >= 3 * ROUNDS  # the tasks went through the store
    assert t["objects_consumed"] == 3 * ROUNDS  # the server read and deleted every result
    logs = run_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {"server.log", "client_1.log", "client_2.log", "client_3.log"}
    assert any((run_dir / "launch" / "mqtt-broker" / f"{k}.log").is_file() for k in ("mosquitto", "amqtt"))
    # launch made throwaway credentials (owner-only): a CA, certificates for every rank and the
    # broker/store, message keys; the broker spoke TLS only and every process authenticated its messages
    creds = run_dir / "launch" / "credentials"
    keys = creds / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["master.json", "rank_1.json", "rank_2.json", "rank_3.json"]
    assert {p.name for p in creds.iterdir()} >= {"ca.pem", "broker.pem", "broker.key", "rank_0.pem", "rank_3.key"}
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in [*keys.iterdir(), *creds.glob("*.*")])
    deployment = (run_dir / "launch" / "deployment.yaml").read_text()
    assert "https://127.0.0.1" in deployment and "rank_{rank}.pem" in deployment
    texts = [(logs / n).read_text() for n in ("server.log", "client_1.log", "client_2.log", "client_3.log")]
    assert not any("not authenticated" in t or "session " in t for t in texts)  # no session id in any log
    for path in (*logs.iterdir(), run_dir / "checkpoint.safetensors", run_dir / "global_model.safetensors"):
        assert (path.stat().st_mode & 0o777) == 0o600, path


def test_local_broker_and_store_round_trip_and_delete(tmp_path):
    need_mqtt_s3()
    from lightning_fedprune.fedml_adapters.services import LocalBroker, LocalObjectStore

    with LocalBroker(workdir=tmp_path / "b") as broker, LocalObjectStore(workdir=tmp_path / "s") as store:
        cfg = broker.fedml_config()
        assert cfg["BROKER_HOST"] == "127.0.0.1" and cfg["BROKER_PORT"] == broker.port
        s3 = store.client()
        s3.put_object(Bucket=store.bucket, Key="run/x", Body=b"abc")
        assert store.object_keys() == ["run/x"]
        assert s3.get_object(Bucket=store.bucket, Key="run/x")["Body"].read() == b"abc"
        s3.delete_object(Bucket=store.bucket, Key="run/x")
        assert store.object_keys() == []
        proc = store.proc
    assert proc.poll() is not None  # stopped on exit
