"""Deployment configs: FedML's sections around a recipe, overrides, ranks and GRPC addresses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.settings import (
    DeploymentConfig,
    GrpcAddress,
    read_grpc_ipconfig,
    write_grpc_ipconfig,
)

ROOT = Path(__file__).resolve().parents[2]
GRPC = ROOT / "recipes" / "fedml" / "digits_grpc.yaml"
MQTT = ROOT / "recipes" / "fedml" / "digits_mqtt_s3.yaml"


def test_shipped_configs_load_with_fedml_keys_mapped_onto_the_recipe():
    cfg = DeploymentConfig.from_yaml(GRPC)
    assert cfg.recipe.strategy.name == "fedmp"
    assert cfg.recipe.strategy.options["fixed_ratios"] == {0: 0.0, 1: 0.3, 2: 0.6}
    assert cfg.recipe.rounds == 10  # train_args.comm_round
    assert cfg.recipe.seed == 0  # common_args.random_seed
    assert (cfg.run_id, cfg.worker_num, cfg.comm_args.backend) == ("digits_grpc", 3, "GRPC")
    mq = DeploymentConfig.from_yaml(MQTT)
    assert mq.comm_args.backend == "MQTT_S3" and mq.common_args.training_type == "cross_device"


def test_overrides_go_to_the_recipe_or_to_a_section():
    cfg = DeploymentConfig.from_yaml(
        GRPC, overrides=["rounds=2", "strategy.options.aggregation=bsp", "comm_args.backend=MQTT_S3", "common_args.run_id=7"]
    )
    assert cfg.recipe.rounds == 2 and cfg.recipe.strategy.options["aggregation"] == "bsp"
    assert cfg.train_args.comm_round == 2  # FedML's key mirrors the recipe
    assert cfg.comm_args.backend == "MQTT_S3"
    assert cfg.run_id == "7"  # a number given for a text key stays text
    with pytest.raises(ConfigError, match="unknown key `comm_args.bakend`"):
        DeploymentConfig.from_yaml(GRPC, overrides=["comm_args.bakend=GRPC"])
    with pytest.raises(ConfigError, match="unknown key `strategy.nme`"):
        DeploymentConfig.from_yaml(GRPC, overrides=["strategy.nme=fedavg"])


def test_to_dict_reloads_to_the_same_config(tmp_path):
    cfg = DeploymentConfig.from_yaml(GRPC, overrides=["rounds=4", "seed=3", "train_args.round_timeout_s=9"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = DeploymentConfig.from_yaml(path)
    # the FedML keys in the file (comm_round: 10, random_seed: 0) must not undo the overrides
    assert again.recipe == cfg.recipe and again.recipe.rounds == 4 and again.recipe.seed == 3
    assert again.train_args == cfg.train_args and again.comm_args == cfg.comm_args


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["comm_args.backend=MPI"], "`comm_args.backend` can be GRPC, MQTT_S3; got 'MPI'"),
        (["common_args.run_id=a/b"], "run_id` must be 1-100 characters"),
        (["device_args.worker_num=4"], r"worker_num` must be in 1..data.num_clients \(3\)"),
        (["train_args.round_timeout_s=0"], "round_timeout_s` must be a number of seconds > 0"),
        (["engine.mode=async"], "engine.async_m` must be an integer >= 1 in async mode"),
        (["comm_args.customized_training_s3_config={BUCKET_NAME: b}"], r"customized_training_s3_config` lacks \['CN_S3_ENDPOINT'"),
        (["common_args.training_type=vertical"], "training_type` can be cross_silo, cross_device"),
    ],
)
def test_invalid_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        DeploymentConfig.from_yaml(GRPC, overrides=overrides)


def test_missing_recipe_and_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="needs `recipe`"):
        DeploymentConfig.from_dict({"comm_args": {}})
    with pytest.raises(ConfigError, match="unknown key `comm`"):
        DeploymentConfig.from_dict({"recipe": {}, "comm": {}})
    with pytest.raises(ConfigError, match="deployment config not found"):
        DeploymentConfig.from_yaml(tmp_path / "nope.yaml")


def test_clients_are_spread_over_ranks():
    cfg = DeploymentConfig.from_dict({"recipe": {"data": {"num_clients": 7}}, "device_args": {"worker_num": 3}})
    assert [cfg.clients_of_rank(r) for r in (1, 2, 3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [cfg.rank_of_client(c) for c in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(ConfigError, match=r"client rank must be in 1..3"):
        cfg.clients_of_rank(0)


def test_grpc_addresses_generated_or_read_from_fedml_csv(tmp_path):
    cfg = DeploymentConfig.from_yaml(GRPC, overrides=["comm_args.grpc_base_port=9000"])
    assert cfg.grpc_addresses() == {r: GrpcAddress(r, "127.0.0.1", 9000 + r) for r in range(4)}
    # FedML's CSV: ingress_ip (when set) is where peers connect, grpc_server_ip where it listens
    csv_path = tmp_path / "grpc_ipconfig.csv"
    csv_path.write_text(
        "eid,rank,grpc_server_ip,grpc_server_port,ingress_ip\n0,0,0.0.0.0,8890,10.0.0.5\n1,1,0.0.0.0,8891,\n"
        "2,2,192.168.1.20,8892,\n3,3,192.168.1.21,8893,\n"
    )
    cfg = DeploymentConfig.from_yaml(GRPC, overrides=[f"comm_args.grpc_ipconfig_path={csv_path}"])
    addrs = cfg.grpc_addresses()
    assert addrs[0] == GrpcAddress(0, "10.0.0.5", 8890, "0.0.0.0")
    assert addrs[2] == GrpcAddress(2, "192.168.1.20", 8892, "192.168.1.20")
    write_grpc_ipconfig(tmp_path / "copy.csv", addrs)
    assert read_grpc_ipconfig(tmp_path / "copy.csv") == addrs
    csv_path.write_text("eid,rank,grpc_server_ip,grpc_server_port\n0,0,127.0.0.1,8890\n")
    with pytest.raises(ConfigError, match=r"has no row for ranks \[1, 2, 3\]"):
        cfg.grpc_addresses()
    csv_path.write_text("eid,rank,ip\n0,0,127.0.0.1\n")
    with pytest.raises(ConfigError, match="expected columns eid,rank,grpc_server_ip"):
        cfg.grpc_addresses()


def test_mqtt_s3_needs_its_services_outside_launch():
    cfg = DeploymentConfig.from_yaml(MQTT)
    with pytest.raises(ConfigError, match="customized_training_mqtt_config` is empty.*mosquitto.*launch"):
        cfg.require_services()
    DeploymentConfig.from_yaml(GRPC).require_services()  # nothing needed


def test_yaml_of_shipped_configs_is_plain():
    data = yaml.safe_load(GRPC.read_text())
    assert set(data) == {"recipe", "recipe_overrides", "common_args", "train_args", "device_args", "comm_args", "tracking_args"}


def test_a_deployment_is_named_after_its_file_not_its_base_recipe(tmp_path):
    cfg = DeploymentConfig.from_yaml(GRPC)
    assert cfg.recipe.name == "digits_grpc"  # its base recipe is digits_fedavg.yaml
    assert DeploymentConfig.from_yaml(GRPC, overrides=["name=mine"]).recipe.name == "mine"


def test_the_local_broker_is_mosquitto_or_the_pip_installable_amqtt(monkeypatch, tmp_path):
    from lightning_fedprune.fedml_adapters.services import BROKER_ENV, find_broker

    fake = tmp_path / "amqtt"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv(BROKER_ENV, "amqtt")
    kind, exe = find_broker()
    assert kind == "amqtt" and exe.endswith("amqtt")
    monkeypatch.setenv(BROKER_ENV, "rabbit")
    with pytest.raises(ConfigError, match="can be mosquitto or amqtt"):
        find_broker()
