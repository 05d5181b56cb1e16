"""The deployment commands of the CLI: arguments, user errors (exit 2), unreachable peers (exit 3)."""

from __future__ import annotations

import json

import pytest
from fedml_testing import RECIPES, need_fedml, secure_overrides, start_cli

from lightning_fedprune.cli import main

GRPC = str(RECIPES / "digits_grpc.yaml")
MQTT = str(RECIPES / "digits_mqtt_s3.yaml")


@pytest.mark.parametrize("command", ["server", "client", "launch", "export-data", "package", "serve"])
def test_each_deployment_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_top_level_help_lists_the_deployment_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "show", "server", "client", "launch"):
        assert command in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["client", GRPC, "--rank", "0"], "client rank must be in 1..3"),
        (["client", GRPC, "--rank", "1", "--set", "comm_args.backend=TRPC"], "`comm_args.backend` can be GRPC, MQTT_S3"),
        (["server", MQTT, "--set", "rounds=1"], "customized_training_mqtt_config` is empty"),
        (["launch", GRPC, "--clients", "9"], r"--clients must be in 1..data.num_clients (3)"),
        (["server", "no/such.yaml"], "deployment config not found"),
        (["server", GRPC, "--set", "strategy.name=fedmpp"], "`strategy.name` can be"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--set", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_data_writes_only_the_ranks_clients(tmp_path, capsys):
    out = tmp_path / "own"
    assert main(["export-data", GRPC, "--rank", "2", "--out", str(out)]) == 0
    assert json.loads((out / "client_data.json").read_text())["clients"] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["client_1.safetensors", "client_data.json"]
    assert "wrote the data of rank 2" in capsys.readouterr().out


def test_serve_without_a_trained_model_is_a_user_error(tmp_path, capsys):
    assert main(["serve", GRPC, "--client-id", "1", "--set", f"run_dir={tmp_path}"]) == 2
    assert "no trained model of client 1" in capsys.readouterr().err


def test_unreachable_broker_and_silent_server_exit_3(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import free_port

    secure = [x for o in secure_overrides(tmp_path / "creds") for x in ("--set", o)]
    closed = free_port()
    mqtt = f"comm_args.customized_training_mqtt_config={{BROKER_HOST: 127.0.0.1, BROKER_PORT: {closed}}}"
    s3 = "comm_args.customized_training_s3_config={CN_S3_ENDPOINT: 'http://127.0.0.1:9', CN_S3_AKI: a, CN_S3_SAK: b, BUCKET_NAME: c}"
    broker = start_cli(
        "mqtt_client",
        ["client", MQTT, "--rank", "1", "--set", f"run_dir={tmp_path}", "--set", mqtt, "--set", s3, "--set", "comm_args.connect_timeout_s=2", *secure],
        tmp_path,
    )
    silent = start_cli(
        "grpc_client",
        ["client", GRPC, "--rank", "1", "--set", f"run_dir={tmp_path}", "--set", f"comm_args.grpc_base_port={free_port() - 1}",
         "--set", "device_args.max_idle_s=3", "--set", "comm_args.hello_interval_s=0.5", *secure],
        tmp_path,
    )
    assert broker.wait(120) == 3
    assert "cannot reach the MQTT broker at 127.0.0.1" in broker.text()
    assert silent.wait(120) == 3
    assert "no word from a server for 3 s" in silent.text()
