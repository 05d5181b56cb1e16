"""Transport security: a deployment's own CA, TLS for GRPC (mutual, with rank identities) and MQTT,
security required unless explicitly waived, clear errors for malformed deployment sections."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest
from fedml_testing import RECIPES, grpc_deployment, need_fedml, secure_overrides

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.credentials import mosquitto_acl, rank_of_common_name, write_credentials
from lightning_fedprune.fedml_adapters.envelope import Envelope
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("creds")
    return write_credentials(folder, 3, rank_hosts={2: ["10.1.2.3", "edge-2"]}, broker_hosts=["broker.lan"])


def _cert(path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def test_credentials_are_signed_by_the_deployments_ca_and_name_their_rank(creds):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca = _cert(creds["ca"])
    for rank in range(4):
        cert = _cert(creds[f"cert_{rank}"])
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == f"lfp-rank-{rank}" and rank_of_common_name(cn) == rank
    san = _cert(creds["cert_2"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "edge-2"]
    broker = _cert(creds["broker_cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.lan" in broker.get_values_for_type(x509.DNSName)
    # every file is private, and the CA's private key was never written
    files = [p for p in creds["ca"].parent.rglob("*") if p.is_file()]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files)
    assert not any(b"PRIVATE KEY" in p.read_bytes() and "rank_" not in p.name and "broker" not in p.name for p in files)
    assert [rank_of_common_name(x) for x in ("lfp-rank-12", b"lfp-rank-3", "lfp-rank-", "rank-1", "lfp-rank-1 ", None, b"\xff")] == [
        12, 3, None, None, None, None, None,
    ]


def test_the_broker_acl_gives_each_rank_its_own_topics_only():
    assert mosquitto_acl("run", 2).splitlines() == [
        "user lfp-rank-0",
        "topic write fedml_run_0_1", "topic read fedml_run_1", "topic write fedml_run_0_2", "topic read fedml_run_2", "",
        "user lfp-rank-1", "topic write fedml_run_1", "topic read fedml_run_0_1", "",
        "user lfp-rank-2", "topic write fedml_run_2", "topic read fedml_run_0_2",
    ]


def _deployment(*overrides, **sections):
    data = {"recipe": str(RECIPES / "../digits_fedavg.yaml"), **sections}
    return DeploymentConfig.from_dict(data, base_dir=RECIPES, overrides=["run_dir=null", *overrides])


def test_security_is_required_unless_waived_explicitly(creds, caplog):
    with pytest.raises(ConfigError, match=r"`comm_args.tls` and `comm_args.auth_key_file` not set: .*credentials CONFIG --out DIR.*insecure: true"):
        _deployment().require_security(0)
    with pytest.raises(ConfigError, match=r"`comm_args.tls` not set"):
        _deployment(f"comm_args.auth_key_file={creds['master']}").require_security(1)
    with caplog.at_level(logging.WARNING):
        assert _deployment("comm_args.insecure=true").require_security(1) == (None, None)
    assert "rank 1 runs INSECURE (comm_args.insecure: true): no TLS, no message authentication," in caplog.text
    folder = creds["ca"].parent
    cfg = _deployment(*secure_overrides(folder))
    auth, tls = cfg.require_security(2)
    assert auth is not None and tls.cert_path == folder / "rank_2.pem" and tls.key == (folder / "rank_2.key").read_bytes()
    assert tls.ca == creds["ca"].read_bytes() and tls.mutual


def test_bad_tls_settings_name_the_key(creds, tmp_path):
    folder = creds["ca"].parent
    with pytest.raises(ConfigError, match=r"`comm_args.tls` needs ca_file, cert_file and key_file; key_file not set"):
        _deployment(f"comm_args.tls.ca_file={folder / 'ca.pem'}", f"comm_args.tls.cert_file={folder / 'rank_0.pem'}").tls_files(0)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"`comm_args.tls.ca_file`: .*junk.pem is not a PEM file"):
        _deployment(*secure_overrides(folder), f"comm_args.tls.ca_file={tmp_path / 'junk.pem'}").tls_files(0)
    with pytest.raises(ConfigError, match=r"`comm_args.tls.cert_file`: cannot read .*rank_9.pem"):
        _deployment(*secure_overrides(folder)).tls_files(9)
    with pytest.raises(ConfigError, match=r"`comm_args.auth_key_file`: no such file"):
        _deployment(f"comm_args.auth_key_file={tmp_path / 'nope.json'}").authenticator(0)
    with pytest.raises(ConfigError, match="`comm_args.tls.mutual`"):
        _deployment("comm_args.tls.mutual=[1]")


@pytest.mark.parametrize(
    "section, value",
    [("train_args", [1, 2]), ("comm_args", 5), ("comm_args", "GRPC"), ("device_args", True)],
)
def test_a_section_that_is_not_a_mapping_is_a_clear_error(section, value):
    with pytest.raises(ConfigError, match=re.escape(f"`{section}` must be a mapping of keys to values, got {value!r}")):
        _deployment(**{section: value})


def test_relative_credential_paths_are_resolved_against_the_config_file(creds, tmp_path):
    folder = creds["ca"].parent
    cfg = DeploymentConfig.from_dict(
        {"recipe": str(RECIPES / "../digits_fedavg.yaml"),
         "comm_args": {"tls": {"ca_file": "ca.pem", "cert_file": "rank_{rank}.pem", "key_file": "rank_{rank}.key"},
                       "auth_key_file": "keys/master.json"}},
        base_dir=folder, overrides=["run_dir=null"],
    )
    assert cfg.tls_files(3).cert_path == folder / "rank_3.pem"
    again = DeploymentConfig.from_dict(cfg.to_dict(), base_dir=tmp_path)  # written elsewhere (launch does)
    assert again.comm_args.tls.cert_file == str(folder / "rank_{rank}.pem") and again.require_security(1)[1] is not None


def test_over_grpc_tls_lets_a_certified_rank_in_and_refuses_everyone_else(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.transport import TransportError, make_endpoint

    shared = tmp_path / "creds"
    cfg_server, _, _ = grpc_deployment(tmp_path / "s", credentials=shared)
    addresses = f"comm_args.grpc_ipconfig_path={cfg_server.resolve_path(cfg_server.comm_args.grpc_ipconfig_path)}"
    cfg_client, _, _ = grpc_deployment(tmp_path / "c", addresses, credentials=shared)
    # a peer holding rank 2's real certificate that claims to be rank 1
    stolen = [f"comm_args.tls.cert_file={shared / 'rank_2.pem'}", f"comm_args.tls.key_file={shared / 'rank_2.key'}"]
    cfg_other_rank, _, _ = grpc_deployment(tmp_path / "o", addresses, *stolen, credentials=shared)
    # a peer with a certificate of another CA, and one without TLS
    quick = "comm_args.send_timeout_s=2"
    cfg_foreign, _, _ = grpc_deployment(tmp_path / "f", addresses, quick, credentials=tmp_path / "other-ca")
    cfg_plain, _, _ = grpc_deployment(
        tmp_path / "p", addresses, quick, "comm_args.insecure=true", "comm_args.tls.ca_file=null", "comm_args.tls.cert_file=null",
        "comm_args.tls.key_file=null", credentials=shared,
    )
    got, refused, arrived = [], [], threading.Event()
    server = make_endpoint(cfg_server, 0)
    server.start(lambda env, wire: (got.append(env), arrived.set()), refused.append)
    hello = Envelope("hello", 1, 0, cfg_server.run_id, "none", body={"clients": [0]})
    try:
        for cfg in (cfg_foreign, cfg_plain):
            ep = make_endpoint(cfg, 1)
            ep.start(lambda env, wire: None)
            try:
                with pytest.raises(TransportError, match=r"GRPC send to rank 0 failed: rank 0 is not reachable \(waited 1 s\)"):
                    ep.send(hello, wait_s=1.0)
            finally:
                ep.close()
        ep = make_endpoint(cfg_other_rank, 1)
        ep.start(lambda env, wire: None)
        try:
            ep.send(hello, wait_s=10)  # TLS lets it in; the rank check refuses the message
        finally:
            ep.close()
        client = make_endpoint(cfg_client, 1)
        client.start(lambda env, wire: None)
        try:
            client.send(hello, wait_s=10)
            assert arrived.wait(30)
        finally:
            client.close()
    finally:
        server.close()
    assert [(e.type, e.sender) for e in got] == [("hello", 1)]
    assert refused == [r for r in refused if "the request claims rank 1 but the peer's certificate names ['lfp-rank-2']" in r]
    assert len(refused) == 1


def test_the_credentials_command_writes_them_and_says_where_they_go(tmp_path, capsys):
    need_fedml()
    from lightning_fedprune.cli import main

    config = RECIPES / "digits_grpc.yaml"
    assert main(["credentials", str(config), "--out", str(tmp_path / "c"), "--broker-host", "mqtt.lan", "--set", "run_dir=null"]) == 0
    out = capsys.readouterr().out
    assert f"cert_file: {tmp_path / 'c'}/rank_{{rank}}.pem" in out and "keys/rank_r.json" in out
    assert sorted(json.loads((tmp_path / "c" / "keys" / "rank_1.json").read_text())) == ["key", "rank"]
    assert main(["credentials", str(config), "--out", str(tmp_path / "d"), "--days", "0", "--set", "run_dir=null"]) == 2
    assert "error: --days must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "d").exists()


def _mqtt(broker, creds=None, rank=None):
    """A connected paho client (TLS with ``rank``'s certificate when given), or the connect error."""
    import ssl

    import paho.mqtt.client as mqtt

    client = mqtt.Client(client_id=f"probe-{rank}")
    got: list[tuple[str, bytes]] = []
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    if creds is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(creds["ca"]))
        if rank is not None:
            ctx.load_cert_chain(str(creds[f"cert_{rank}"]), str(creds[f"key_{rank}"]))
        client.tls_set_context(ctx)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc: connected.set() if rc == 0 else None
    try:
        client.connect(broker.host, broker.port, keepalive=10)
        deadline = time.monotonic() + 5
        while not connected.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError) as err:
        return None, str(err)
    if not connected.is_set():
        client.disconnect()
        return None, "not accepted"
    client.loop_start()
    return (client, got), None


def test_the_launchers_broker_speaks_tls_knows_ranks_by_certificate_and_keeps_topics_apart(creds, tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import LocalBroker, find_broker

    found = find_broker()
    if found is None or found[0] != "mosquitto":
        pytest.skip("per-client broker credentials need mosquitto (apt-get install -y mosquitto)")
    tls = (creds["ca"], creds["broker_cert"], creds["broker_key"])
    foreign = write_credentials(tmp_path / "foreign", 1)
    with LocalBroker(workdir=tmp_path / "b", tls=tls, acl=mosquitto_acl("run", 2)) as broker:
        assert _mqtt(broker)[0] is None  # plaintext, anonymous
        assert _mqtt(broker, creds)[0] is None  # TLS without a client certificate
        assert _mqtt(broker, foreign, 1)[0] is None  # a certificate of another CA
        (server, got), _ = _mqtt(broker, creds, 0)
        (client, _), _ = _mqtt(broker, creds, 1)
        try:
            for topic in ("fedml_run_1", "fedml_run_2", "fedml_run_0_2"):
                server.subscribe(topic, qos=1)
            time.sleep(0.5)
            client.publish("fedml_run_1", b"mine", qos=1).wait_for_publish(5)
            client.publish("fedml_run_2", b"posing as rank 2", qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        finally:
            for c in (server, client):
                c.loop_stop()
                c.disconnect()
    assert got == [("fedml_run_1", b"mine")]
