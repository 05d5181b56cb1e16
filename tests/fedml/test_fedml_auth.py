"""Per-client message authentication: forged, altered, impersonated and replayed messages are refused."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from fedml_testing import grpc_deployment, need_fedml

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.envelope import Authenticator, Envelope, decode_envelope, encode_envelope, rank_key
from lightning_fedprune.fedml_adapters.settings import write_auth_keys

MASTER = bytes(range(32))


def _wire(env):
    return decode_envelope(encode_envelope(env))


def test_the_server_accepts_a_clients_sealed_message_once():
    server, client = Authenticator(0, master=MASTER), Authenticator(1, key=rank_key(MASTER, 1))
    hello = client.seal(Envelope("hello", 1, 0, "run", "none", body={"clients": [0]}))
    assert server.check(_wire(hello)) is None
    assert "replays an earlier message of rank 1" in server.check(_wire(hello))
    # the server's reply checks out on the client, with the same channel key
    assert client.check(_wire(server.seal(Envelope("ready", 0, 1, "run", "s1")))) is None


@pytest.mark.parametrize(
    "attack, reason",
    [
        ("unsigned", "carries no authentication"),
        ("other key", "does not check out for rank 1"),
        ("altered body", "does not check out for rank 1"),
        ("altered payload", "does not check out for rank 1"),
        ("impersonation", "does not check out for rank 2"),  # rank 1's key, claiming to be rank 2
    ],
)
def test_forged_messages_are_refused(attack, reason):
    server = Authenticator(0, master=MASTER)
    client = Authenticator(1, key=rank_key(MASTER, 1))
    env = Envelope("result", 1, 0, "run", "s1", 3, body={"client_id": 0}, payload=b"weights")
    if attack == "unsigned":
        sent = env
    elif attack == "other key":
        sent = Authenticator(1, key=bytes(32)).seal(env)
    elif attack == "impersonation":
        sealed = client.seal(Envelope("result", 2, 0, "run", "s1", 3, body={"client_id": 1}, payload=b"weights"))
        sent = sealed
    else:
        sealed = client.seal(env)
        sent = Envelope(
            "result", 1, 0, "run", "s1", 3, body={"client_id": 2} if attack == "altered body" else {"client_id": 0},
            payload=b"weightz" if attack == "altered payload" else b"weights", auth=sealed.auth,
        )
    assert reason in server.check(_wire(sent))


def test_a_client_cannot_read_or_forge_another_clients_channel():
    c1, c2 = Authenticator(1, key=rank_key(MASTER, 1)), Authenticator(2, key=rank_key(MASTER, 2))
    assert "has no key" in c2.check(_wire(c1.seal(Envelope("hello", 1, 0, "run", "none"))))
    with pytest.raises(ConfigError, match="the server needs the deployment's master key"):
        Authenticator(0, key=rank_key(MASTER, 1))


def test_key_files_are_private_and_a_client_gets_only_its_own(tmp_path):
    files = write_auth_keys(tmp_path / "keys", 3)
    assert sorted(files) == ["master", "rank_1", "rank_2", "rank_3"]
    for path in files.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    master = bytes.fromhex(json.loads(files["master"].read_text())["master"])
    own = json.loads(files["rank_2"].read_text())
    assert own == {"rank": 2, "key": rank_key(master, 2).hex()} and "master" not in own


def test_deployment_config_builds_the_authenticator(tmp_path):
    need_fedml()
    files = write_auth_keys(tmp_path / "keys", 3)
    cfg, _, _ = grpc_deployment(tmp_path, f"comm_args.auth_key_file={files['rank_1']}")
    assert isinstance(cfg.authenticator(1), Authenticator)
    with pytest.raises(ConfigError, match="holds the key of rank 1, not of rank 2"):
        cfg.authenticator(2)
    cfg0, _, _ = grpc_deployment(tmp_path / "b", f"comm_args.auth_key_file={files['master']}")
    assert cfg0.authenticator(0) is not None and cfg0.authenticator(3) is not None


def test_over_grpc_a_peer_without_the_key_is_refused_and_a_client_with_it_gets_through(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.transport import make_endpoint

    files = write_auth_keys(tmp_path / "keys", 3)
    tls = tmp_path / "tls"  # every process holds its rank's certificate; the keys decide
    cfg_server, _, _ = grpc_deployment(tmp_path / "s", f"comm_args.auth_key_file={files['master']}", credentials=tls)
    addresses = f"comm_args.grpc_ipconfig_path={cfg_server.resolve_path(cfg_server.comm_args.grpc_ipconfig_path)}"
    cfg_client, _, _ = grpc_deployment(tmp_path / "c", addresses, f"comm_args.auth_key_file={files['rank_1']}", credentials=tls)
    # no key at all (allowed only by an explicit insecure setting)
    cfg_evil, _, _ = grpc_deployment(tmp_path / "e", addresses, "comm_args.auth_key_file=null", "comm_args.insecure=true", credentials=tls)
    got, refused, arrived = [], [], threading.Event()
    server = make_endpoint(cfg_server, 0)
    server.start(lambda env, wire: (got.append(env), arrived.set()), refused.append)
    client, evil = make_endpoint(cfg_client, 1), make_endpoint(cfg_evil, 2)
    client.start(lambda env, wire: None)
    evil.start(lambda env, wire: None)
    try:
        evil.send(Envelope("hello", 2, 0, cfg_server.run_id, "none", body={"clients": [1]}), wait_s=10)
        client.send(Envelope("hello", 1, 0, cfg_server.run_id, "none", body={"clients": [0]}), wait_s=10)
        assert arrived.wait(30)
    finally:
        for ep in (client, evil, server):
            ep.close()
    assert [(e.type, e.sender) for e in got] == [("hello", 1)]
    assert any("claiming rank 2" in r and "carries no authentication" in r for r in refused)
