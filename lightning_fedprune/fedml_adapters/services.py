"""Local MQTT broker and S3-compatible store for the MQTT_S3 transport on one machine (no FedML here).

:class:`LocalBroker` runs an MQTT broker on 127.0.0.1 (:func:`find_broker`: Debian's ``mosquitto``,
the production choice, or the pip-installable ``amqtt``, which ``make test`` installs into its own
environment ``.venv/mqtt-broker`` because its pins conflict with FedML's) and :class:`LocalObjectStore` runs
``moto`` in server mode on 127.0.0.1 with one bucket; both are context managers that stop their
process on exit. Their ``fedml_config()`` is what goes into ``comm_args.customized_training_mqtt_config``
and ``comm_args.customized_training_s3_config``. ``launch`` and the tests start them; on real
machines use a real broker and store.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_fedprune.errors import ConfigError, FedPruneError

log = logging.getLogger(__name__)

__all__ = ["LocalBroker", "LocalObjectStore", "ServiceError", "free_port", "wait_for_port", "find_mosquitto", "find_amqtt", "find_broker"]

_MOSQUITTO_HINT = (
    "install Debian's broker with `apt-get install -y mosquitto`, or amqtt in an environment of its own "
    "(`make test` does: python -m venv .venv/mqtt-broker && .venv/mqtt-broker/bin/pip install amqtt), "
    "or point comm_args at a running broker"
)
#: environment variable that picks the local broker: ``mosquitto`` or ``amqtt`` (default: mosquitto if installed)
BROKER_ENV = "LIGHTNING_FEDPRUNE_MQTT_BROKER"


class ServiceError(FedPruneError, RuntimeError):
    """A local service could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises:
        ServiceError: on timeout, or when ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"the process serving {host}:{port} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise ServiceError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


def find_mosquitto() -> str | None:
    """The ``mosquitto`` executable (PATH, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_amqtt() -> str | None:
    """The ``amqtt`` broker executable: ``<this environment>/mqtt-broker/bin/amqtt`` (where ``make test``
    installs it), then PATH; or None."""
    local = Path(sys.prefix) / "mqtt-broker" / "bin" / "amqtt"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("amqtt")


def find_broker() -> tuple[str, str] | None:
    """``(kind, executable)`` of the local MQTT broker to start: ``$LIGHTNING_FEDPRUNE_MQTT_BROKER``
    (``mosquitto`` or ``amqtt``) when set, else mosquitto when installed, else amqtt; None if none is.

    Raises:
        ConfigError: the environment variable names another broker.
    """
    choice = os.environ.get(BROKER_ENV, "").strip().lower()
    if choice not in ("", "mosquitto", "amqtt"):
        raise ConfigError(f"${BROKER_ENV} can be mosquitto or amqtt, got {choice!r}")
    for kind, find in (("mosquitto", find_mosquitto), ("amqtt", find_amqtt)):
        if choice in ("", kind):
            exe = find()
            if exe is not None:
                return kind, exe
    return None


class _Service:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    def _spawn(self, argv: list[str], log_path: Path | None, env: dict[str, str] | None = None) -> None:
        self._log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self):  # noqa: ANN204
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalBroker(_Service):
    """An MQTT broker on ``127.0.0.1:port`` (no persistence): mosquitto or amqtt (:func:`find_broker`).

    Args:
        port: the port (default: a free one).
        workdir: where its config (and log) go (default: a temporary folder).
        tls: ``(ca, certificate, key)`` files: the broker listens with TLS only. With mosquitto it
            also requires a client certificate signed by ``ca``, takes its common name as the user
            name and allows no anonymous access; amqtt cannot map certificates to users, so it
            accepts any TLS client (messages are still authenticated end to end).
        acl: mosquitto ACL text (:func:`~lightning_fedprune.fedml_adapters.credentials.mosquitto_acl`):
            which user may use which topic.
        None of them: plaintext and anonymous, for tests and closed networks.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        acl: str | None = None,
    ) -> None:
        super().__init__()
        self.host = "127.0.0.1"
        self.port = int(port) if port is not None else free_port()
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lfp-mqtt-"))
        self.kind = ""
        self.tls = tuple(str(Path(p).resolve()) for p in tls) if tls is not None else None
        self.acl = acl

    def start(self) -> LocalBroker:
        found = find_broker()
        if found is None:
            raise ConfigError(f"the MQTT_S3 transport needs an MQTT broker and none is installed: {_MOSQUITTO_HINT}")
        self.kind, exe = found
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            lines = [f"listener {self.port} {self.host}", "persistence false"]
            if os.geteuid() == 0:
                lines.append("user root")  # mosquitto drops root for `mosquitto`, who cannot read our 0600 files
            if self.tls is None:
                lines.append("allow_anonymous true")
            else:
                ca, cert, key = self.tls
                lines += [
                    f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "require_certificate true",
                    "use_identity_as_username true", "allow_anonymous false",
                ]
            if self.acl is not None:
                acl = self.workdir / "mosquitto.acl"
                acl.write_text(self.acl, encoding="utf-8")
                lines.append(f"acl_file {acl}")
            conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
            argv = [exe, "-c", str(conf)]
        else:
            conf = self.workdir / "amqtt.yaml"
            ssl = ""
            if self.tls is not None:
                ca, cert, key = self.tls
                ssl = f"    ssl: true\n    cafile: {ca}\n    certfile: {cert}\n    keyfile: {key}\n"
                log.warning("amqtt accepts any TLS client: use mosquitto for per-client broker credentials")
            conf.write_text(
                f"listeners:\n  default:\n    type: tcp\n    bind: {self.host}:{self.port}\n{ssl}"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n",
                encoding="utf-8",
            )
            argv = [exe, "-c", str(conf)]
        self._spawn(argv, self.workdir / f"{self.kind}.log")
        try:
            wait_for_port(self.host, self.port, timeout_s=15.0, proc=self.proc)
        except ServiceError:
            self.stop()
            raise
        log.info("MQTT broker (%s) on %s:%d", self.kind, self.host, self.port)
        return self

    def fedml_config(self) -> dict[str, Any]:
        """``comm_args.customized_training_mqtt_config`` for this broker."""
        return {"BROKER_HOST": self.host, "BROKER_PORT": self.port, "MQTT_KEEPALIVE": 30}


class LocalObjectStore(_Service):
    """moto's S3 server on ``127.0.0.1:port`` with one bucket.

    Args:
        port: the port (default: a free one).
        bucket: the bucket created at start.
        workdir: where its log goes (default: none).
    """

    ACCESS_KEY = "lightning-fedprune"
    SECRET_KEY = "lightning-fedprune-local"
    REGION = "us-east-1"

    def __init__(
        self,
        *,
        port: int | None = None,
        bucket: str = "fedprune",
        workdir: str | os.PathLike[str] | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    ) -> None:
        super().__init__()
        self.host = "127.0.0.1"
        self.port = int(port) if port is not None else free_port()
        self.bucket = bucket
        self.workdir = Path(workdir) if workdir is not None else None
        #: ``(ca, certificate, key)``: serve https with this certificate (clients verify it against ``ca``)
        self.tls = tuple(str(Path(p).resolve()) for p in tls) if tls is not None else None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

    def start(self) -> LocalObjectStore:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            raise ConfigError(
                "the MQTT_S3 transport needs an S3-compatible store and moto's server is not installed: "
                "pip install 'moto[server]' (or point comm_args at a running store)"
            )
        env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", PYTHONWARNINGS="ignore")
        log_path = self.workdir / "moto.log" if self.workdir is not None else None
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        if self.tls is not None:
            argv += ["-c", self.tls[1], "-k", self.tls[2]]
        self._spawn(argv, log_path, env)
        try:
            wait_for_port(self.host, self.port, timeout_s=60.0, proc=self.proc)
            self.client().create_bucket(Bucket=self.bucket)
        except Exception:
            self.stop()
            raise
        log.info("object store (moto) on %s, bucket %s", self.endpoint, self.bucket)
        return self

    def client(self) -> Any:
        """A boto3 S3 client for the store."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION, config=Config(signature_version="s3v4", retries={"max_attempts": 2}),
            verify=self.tls[0] if self.tls is not None else None,
        )

    def object_keys(self) -> list[str]:
        """Keys of the objects in the bucket now."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out

    def fedml_config(self) -> dict[str, Any]:
        """``comm_args.customized_training_s3_config`` for this store."""
        return {
            "CN_S3_ENDPOINT": self.endpoint,
            "CN_S3_AKI": self.ACCESS_KEY,
            "CN_S3_SAK": self.SECRET_KEY,
            "CN_REGION_NAME": self.REGION,
            "BUCKET_NAME": self.bucket,
        }
