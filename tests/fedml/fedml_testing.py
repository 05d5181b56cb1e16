"""Helpers of the FedML tests: an in-memory transport and in-process sessions over it, process
starting, logs and CPU readings.

(Imported by the test files as ``fedml_testing``; ``conftest.py`` turns the transport into a fixture.)

The process-level tests start real server and client processes (``python -m lightning_fedprune
...``) with FedML's transports; they need fedml, grpcio (and for MQTT_S3 mosquitto and moto) and
skip cleanly without them. Processes optionally run under a socket audit hook that records every
Python-level connection (and refuses those to non-loopback addresses).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_fedprune.fedml_adapters.envelope import Envelope, decode_envelope, encode_envelope

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "fedml"


# --------------------------------------------------------------------------- in-memory transport


class LoopbackHub:
    """Endpoints of one process that deliver envelopes to each other through the real codec."""

    def __init__(self) -> None:
        self.endpoints: dict[int, LoopbackEndpoint] = {}
        self.lock = threading.Lock()

    def endpoint(self, rank: int) -> LoopbackEndpoint:
        return LoopbackEndpoint(self, rank)


class LoopbackEndpoint:
    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub, self.rank = hub, rank
        self.on_message: Callable[[Envelope, int], None] | None = None
        self.stats = {"sent": 0}
        self.sent: list[Envelope] = []

    def start(self, on_message, on_reject=None) -> None:
        self.on_message = on_message
        with self.hub.lock:
            self.hub.endpoints[self.rank] = self

    def send(self, env: Envelope, *, wait_s: float = 0.0) -> int:
        from lightning_fedprune.fedml_adapters.transport import TransportError

        data = encode_envelope(env)
        deadline = time.monotonic() + wait_s
        while True:
            with self.hub.lock:
                target = self.hub.endpoints.get(env.receiver)
            if target is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if target is None or target.on_message is None:
            raise TransportError(f"rank {env.receiver} is not up")
        self.stats["sent"] += 1
        self.sent.append(env)
        target.on_message(decode_envelope(data), len(data))
        return len(data)

    def close(self) -> None:
        with self.hub.lock:
            self.hub.endpoints.pop(self.rank, None)


# --------------------------------------------------------------------------- requirements


def need_fedml() -> None:
    """Skip unless FedML and grpcio import here."""
    for mod in ("fedml", "grpc"):
        spec = importlib.util.find_spec(mod)
        # origin None: a namespace package, e.g. this very tests/fedml folder, not the library
        if spec is None or spec.origin is None:
            pytest.skip(f"{mod} is not installed (pip install 'lightning_fedprune[fedml]')")


def need_mqtt_s3() -> None:
    need_fedml()
    from lightning_fedprune.fedml_adapters.services import find_broker

    if find_broker() is None:
        pytest.skip("no MQTT broker is installed (`make test` installs amqtt; or apt-get install -y mosquitto)")
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed (pip install 'moto[server]')")


# --------------------------------------------------------------------------- processes

#: an audit hook: every Python-level socket connection (and name lookup) is appended to the file
#: named by LFP_AUDIT_LOG; those to non-loopback addresses are refused
AUDIT_HOOK = r"""
import ipaddress, json, os, socket, sys
_LOG = os.environ["LFP_AUDIT_LOG"]
def _loopback(host):
    if host in ("localhost", "") or host is None:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
def _hook(event, args):
    if event == "socket.connect":
        if getattr(args[0], "family", None) == socket.AF_UNIX:
            return
        addr = args[1]
        host = addr[0] if isinstance(addr, tuple) else str(addr)
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    else:
        return
    ok = _loopback(host)
    with open(_LOG, "a") as fh:
        fh.write(json.dumps({"event": event, "host": str(host), "ok": ok, "pid": os.getpid()}) + "\n")
    if not ok:
        raise OSError(f"audit: refused a connection to {host}")
sys.addaudithook(_hook)
"""
#: the CLI under :data:`AUDIT_HOOK`
AUDITED_MAIN = AUDIT_HOOK + r"""
from lightning_fedprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Proc:
    """A started process with its log file."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, *, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen.poll() is not None and needle not in self.text():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before logging {needle!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not log {needle!r} within {timeout_s} s:\n{self.text()[-3000:]}")

    def wait(self, timeout_s: float = 180.0) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs after {timeout_s} s:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cli(
    name: str,
    args: list[str],
    log_dir: Path,
    *,
    audit_log: Path | None = None,
    cwd: Path | None = None,
    pythonpath: str | None = str(ROOT),
    script: list[str] | None = None,
) -> Proc:
    """Start ``python -m lightning_fedprune ARGS`` (or ``script``), logging to ``log_dir/name.log``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env["PYTHONUNBUFFERED"] = "1"
    if audit_log is not None:
        env["LFP_AUDIT_LOG"] = str(audit_log)
        argv = [sys.executable, "-c", AUDITED_MAIN, *args]
    elif script is not None:
        argv = [sys.executable, *script, *args]
    else:
        argv = [sys.executable, "-m", "lightning_fedprune", *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    fh = open(log, "ab")
    popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    fh.close()
    return Proc(name, popen, log)


def run_deployment(config: Path, logs: Path, *, clients: int = 3, timeout_s: float = 300.0) -> None:
    """Run a deployment's client processes (ranks 1..clients) and server to the end; every
    process must exit 0."""
    procs: dict[str, Proc] = {}
    try:
        for rank in range(1, clients + 1):
            procs[f"client_{rank}"] = start_cli(f"client_{rank}", ["client", str(config), "--rank", str(rank)], logs)
        procs["server"] = server = start_cli("server", ["server", str(config), "--no-progress"], logs)
        assert server.wait(timeout_s) == 0, server.text()[-3000:]
        codes = {n: p.wait(60) for n, p in procs.items() if n != "server"}
        assert codes == {f"client_{r}": 0 for r in range(1, clients + 1)}, codes
    finally:
        for p in procs.values():
            p.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_fraction(pid: int, seconds: float = 3.0) -> float:
    """Fraction of one core the process used over ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def tcp_peers(pid: int) -> set[str]:
    """Remote addresses of the TCP sockets a process holds now (from /proc: GRPC's C core included).

    Listening sockets show the unspecified address (0.0.0.0 or ::); v4-mapped IPv6 addresses are
    given as IPv4.
    """
    import ipaddress

    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:  # the process is gone
        return set()
    peers = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[9] not in inodes:
                continue
            raw = bytes.fromhex(parts[2].split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(words if width == 32 else raw[::-1])
            mapped = getattr(addr, "ipv4_mapped", None)  # GRPC uses v4-mapped IPv6 sockets
            peers.add(str(mapped if mapped is not None else addr))
    return peers


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_rounds(path: Path, n: int, timeout_s: float = 120.0) -> None:
    """Wait until the metrics file ``path`` holds ``n`` round records."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(read_jsonl(path)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} rounds in {timeout_s} s")


def replay(cfg: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The global state the recorded rounds give without any crash, given the same client results.

    Every round is rebuilt in this process with the deployment's strategy and client runtime: the
    clients each record names as selected are asked, the recorded failures fail, the others train.
    """
    import torch

    from lightning_fedprune.core.client_store import ClientStore
    from lightning_fedprune.core.messages import ClientFailure
    from lightning_fedprune.simulation import build_run

    torch.set_num_threads(1)
    engine, _ = build_run(cfg.recipe.apply_overrides(["run_dir=null"]), listeners=[])
    strategy, runtime, store = engine.strategy, engine.runtime, ClientStore()
    for rec in records:
        rnd = rec["round"]
        tasks = strategy.configure_round(rnd, rec["selected"])
        failed = {f["client_id"] for f in rec["failures"]}
        results = runtime.run_many([t for t in tasks if t.client_id not in failed], store)
        failures = [ClientFailure(rnd, f["client_id"], f["kind"], f["reason"]) for f in rec["failures"]]
        strategy.aggregate(rnd, results, failures)
    return dict(strategy.global_state)


def simulate(cfg: Any) -> Any:
    """The simulator run of a deployment's recipe (same seeds), in this process."""
    import torch

    from lightning_fedprune.simulation import build_run

    torch.set_num_threads(1)
    engine, rounds = build_run(cfg.recipe.apply_overrides(["run_dir=null"]), listeners=[])
    engine.run_dir = None
    engine.run(rounds)
    return engine


def assert_simulators_model(cfg: Any, state: Any = None) -> Any:
    """Assert that ``state`` (default: the run folder's final global model) equals the simulator's
    for the same recipe and seeds; returns the simulator's engine."""
    import torch

    from lightning_fedprune.core.serialization import load_state

    engine = simulate(cfg)
    final = state if state is not None else load_state(cfg.run_dir / "global_model.safetensors")
    for k, v in engine.strategy.global_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-6, atol=1e-7)
    return engine


def secure_overrides(folder: Path, worker_num: int = 3) -> list[str]:
    """Deployment overrides for TLS and message keys written to ``folder`` (once; reused after)."""
    from lightning_fedprune.fedml_adapters.credentials import write_credentials

    if not (folder / "ca.pem").exists():
        write_credentials(folder, worker_num)
    return [
        f"comm_args.tls.ca_file={folder / 'ca.pem'}", f"comm_args.tls.cert_file={folder / 'rank_{rank}.pem'}",
        f"comm_args.tls.key_file={folder / 'rank_{rank}.key'}", f"comm_args.auth_key_file={folder / 'keys' / 'master.json'}",
    ]


def grpc_deployment(base: Path, *overrides: str, credentials: Path | None = None) -> tuple[Any, Path, dict[int, Any]]:
    """A GRPC deployment of ``digits_grpc.yaml`` on free 127.0.0.1 ports with TLS and message keys
    (from ``credentials``, default ``base/credentials``), written to ``base/deployment.yaml``.

    Returns ``(config, its YAML file, the address of every rank)``.
    """
    from lightning_fedprune.fedml_adapters.services import free_port
    from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, write_grpc_ipconfig

    base.mkdir(parents=True, exist_ok=True)
    addresses = {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)}
    ipconfig = write_grpc_ipconfig(base / "grpc_ipconfig.csv", addresses)
    cfg = DeploymentConfig.from_yaml(
        RECIPES / "digits_grpc.yaml",
        overrides=[
            f"run_dir={base / 'run'}", f"comm_args.grpc_ipconfig_path={ipconfig}", "comm_args.hello_interval_s=0.5",
            "train_args.round_timeout_s=120", *secure_overrides(credentials or base / "credentials"), *overrides,
        ],
    )
    config = base / "deployment.yaml"
    config.write_text(cfg.to_yaml())
    return cfg, config, addresses


class SerialRuntime:
    """Client runtimes of several in-process clients take turns (torch's RNG is process-global)."""

    lock = threading.Lock()

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_many(self, tasks, store):
        with self.lock:
            return self.inner.run_many(tasks, store)


def session(hub: LoopbackHub, cfg: Any, *, resume: bool = False, runtime_wrap: type = SerialRuntime) -> tuple[Any, list[Any], list[LoopbackEndpoint]]:
    """A server and the client processes of ranks 1..``worker_num`` in this process over ``hub``,
    run to the end (``resume``: the server resumes from its checkpoint in ``cfg.run_dir``).

    Returns ``(server, clients, every endpoint used)``.
    """
    from lightning_fedprune.fedml_adapters.client import FedMLClient
    from lightning_fedprune.fedml_adapters.components import build_client_runtime
    from lightning_fedprune.fedml_adapters.server import FedMLServer

    endpoints, clients, threads = [], [], []
    for rank in range(1, cfg.worker_num + 1):
        ep = hub.endpoint(rank)
        endpoints.append(ep)
        c = FedMLClient(cfg, rank, endpoint=ep, runtime=runtime_wrap(build_client_runtime(cfg, rank)))
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        clients.append(c)
        threads.append(t)
    ep0 = hub.endpoint(0)
    endpoints.append(ep0)
    server = FedMLServer(cfg, endpoint=ep0, resume=resume)
    server.run()
    for t in threads:
        t.join(timeout=30)
    return server, clients, endpoints
