"""``python -m lightning_fedprune launch CONFIG --clients N``: a whole deployment on one machine.

The launcher (which never imports FedML itself):

1. for MQTT_S3 with empty broker/store sections, starts a local mosquitto and a local moto S3
   server and fills the sections in; for GRPC without an ipconfig file, picks free ports on
   127.0.0.1 and writes FedML's ipconfig CSV;
2. writes the resolved config to ``<run_dir>/launch/deployment.yaml`` and starts the server and
   the N client processes from it (``server ... --no-progress`` / ``client ... --rank r``), each logging
   to ``<log_dir>/server.log`` / ``client_<r>.log``;
3. shows ONE progress view: it follows the server's ``metrics.jsonl`` and prints the summary
   table from ``summary.json`` at the end;
4. waits for the server, gives the clients time to exit on ``finish`` (then stops them), stops
   the broker and store, and writes ``<run_dir>/launch/launch.json`` (exit codes, objects left
   in the store).

Ctrl-C stops every process it started; ``launch --resume`` continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, write_grpc_ipconfig

log = logging.getLogger(__name__)

__all__ = ["launch", "prepare_launch", "LAUNCH_DIR"]

LAUNCH_DIR = "launch"
_CLIENT_GRACE_S = 30.0


def prepare_launch(cfg: DeploymentConfig, *, clients: int | None, stack: contextlib.ExitStack) -> DeploymentConfig:
    """``cfg`` completed for this machine: worker count, GRPC ports, credentials, broker and store
    (started on ``stack``).

    Unless ``comm_args.insecure`` is true or the config names its own, throwaway credentials are
    written to ``<run_dir>/launch/credentials`` (owner-only files,
    :func:`~lightning_fedprune.fedml_adapters.credentials.write_credentials`): a CA, one
    certificate per rank, the broker's and store's certificate and the message keys. The local
    broker then speaks TLS only, knows each rank by its certificate and lets it use only its own
    topics; the local store serves https.

    Raises:
        ConfigError: ``clients`` is not in 1..data.num_clients, or the config names its own TLS
            files but leaves the broker or store to ``launch`` (their certificates need its CA key).
    """
    from lightning_fedprune.fedml_adapters.credentials import mosquitto_acl, write_credentials
    from lightning_fedprune.fedml_adapters.services import LocalBroker, LocalObjectStore, free_port

    if clients is not None:
        if not 1 <= clients <= cfg.num_clients:
            raise ConfigError(f"--clients must be in 1..data.num_clients ({cfg.num_clients}), got {clients}")
        cfg = cfg.replace(device_args=dataclasses.replace(cfg.device_args, worker_num=int(clients)))
    out = cfg.run_dir / LAUNCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    comm = cfg.comm_args
    if comm.backend == "GRPC" and comm.grpc_ipconfig_path is None:
        addresses = {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(cfg.worker_num + 1)}
        path = write_grpc_ipconfig(out / "grpc_ipconfig.csv", addresses)
        comm = dataclasses.replace(comm, grpc_ipconfig_path=str(path.resolve()))
    cfg = cfg.replace(comm_args=comm)
    generated: dict[str, Path] = {}
    if not comm.insecure and (comm.tls.cert_file is None or comm.auth_key_file is None):
        hosts = {r: [a.host, a.bind_host] for r, a in cfg.grpc_addresses().items()} if comm.backend == "GRPC" else {}
        generated = write_credentials(out / "credentials", cfg.worker_num, rank_hosts=hosts)
        if comm.tls.cert_file is None:
            tls = dataclasses.replace(
                comm.tls, ca_file=str(generated["ca"].resolve()),
                cert_file=str((generated["ca"].parent / "rank_{rank}.pem").resolve()),
                key_file=str((generated["ca"].parent / "rank_{rank}.key").resolve()),
            )
            comm = dataclasses.replace(comm, tls=tls)
        if comm.auth_key_file is None:
            comm = dataclasses.replace(comm, auth_key_file=str(generated["master"].resolve()))
    if comm.backend == "MQTT_S3":
        secure = not comm.insecure
        if secure and "broker_cert" not in generated and not (comm.customized_training_mqtt_config and comm.customized_training_s3_config):
            raise ConfigError(
                "`comm_args.tls` names your own certificates, so `launch` cannot give its local broker and store "
                "certificates from your CA: configure customized_training_mqtt_config and customized_training_s3_config, "
                "or leave comm_args.tls unset for throwaway credentials"
            )
        service_tls = (generated["ca"], generated["broker_cert"], generated["broker_key"]) if "broker_cert" in generated else None
        if not comm.customized_training_mqtt_config:
            acl = mosquitto_acl(cfg.run_id, cfg.worker_num) if secure else None
            broker = stack.enter_context(LocalBroker(workdir=out / "mqtt-broker", tls=service_tls, acl=acl))
            comm = dataclasses.replace(comm, customized_training_mqtt_config=broker.fedml_config())
        if not comm.customized_training_s3_config:
            store = stack.enter_context(LocalObjectStore(workdir=out / "moto", tls=service_tls))
            stack.callback(_count_objects, store, out)  # runs before the store stops
            comm = dataclasses.replace(comm, customized_training_s3_config=store.fedml_config())
    return cfg.replace(comm_args=comm)


def _count_objects(store: Any, out: Path) -> None:
    try:
        keys = store.object_keys()
    except Exception as err:  # the store may already be gone
        log.warning("could not list the object store: %s", err)
        return
    _update_launch_json(out, {"objects_left": len(keys), "object_keys_left": keys[:20]})
    if keys:
        log.warning("%d object(s) left in the store: %s", len(keys), keys[:5])


def _update_launch_json(out: Path, values: dict[str, Any]) -> None:
    path = out / "launch.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def launch(cfg: DeploymentConfig, *, clients: int | None = None, resume: bool = False, quiet: bool = False) -> int:
    """Run a deployment on this machine (see the module docstring); returns the server's exit code."""
    from rich.console import Console

    from lightning_fedprune.reporting import METRICS_FILE, SUMMARY_FILE, RichProgress

    console = Console()
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}
    code = 1
    with contextlib.ExitStack() as stack:
        cfg = prepare_launch(cfg, clients=clients, stack=stack)
        out = cfg.run_dir / LAUNCH_DIR
        log_dir = cfg.log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        config_path = out / "deployment.yaml"
        config_path.write_text(cfg.to_yaml(), encoding="utf-8")
        metrics = cfg.run_dir / METRICS_FILE
        start_round = _start_round(cfg) if resume else 0
        if not resume and metrics.exists():
            metrics.unlink()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        base = [sys.executable, "-m", "lightning_fedprune"]
        try:
            logs["server"] = _private_log(log_dir / "server.log")
            procs["server"] = subprocess.Popen(
                [*base, "server", str(config_path), "--no-progress", *(["--resume"] if resume else [])],
                stdout=logs["server"], stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            for rank in range(1, cfg.worker_num + 1):
                name = f"client_{rank}"
                logs[name] = _private_log(log_dir / f"{name}.log")
                procs[name] = subprocess.Popen(
                    [*base, "client", str(config_path), "--rank", str(rank)],
                    stdout=logs[name], stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )
            progress = None if quiet else RichProgress(console=console)
            if progress is not None:
                progress.on_run_start({
                    "num_rounds": cfg.recipe.rounds, "start_round": start_round,
                    "strategy": f"{cfg.recipe.strategy.name} over FedML {cfg.comm_args.backend}",
                    "num_clients": cfg.num_clients, "run_dir": str(cfg.run_dir), "transport": "fedml",
                })
            emitted: set[int] = set()
            exited: set[str] = set()
            while True:
                server_done = procs["server"].poll() is not None
                for rec in _new_records(metrics, emitted, start_round):
                    if progress is not None:
                        progress.on_round_end(rec)
                for name, p in procs.items():
                    if name != "server" and name not in exited and p.poll() is not None:
                        exited.add(name)
                        if not server_done and p.returncode != 0:
                            log.warning("%s exited with code %s; see %s", name, p.returncode, log_dir / f"{name}.log")
                if server_done:
                    break
                time.sleep(0.5)
            code = procs["server"].returncode
            summary_path = cfg.run_dir / SUMMARY_FILE
            if progress is not None and code == 0 and summary_path.exists():
                progress.on_run_end(json.loads(summary_path.read_text(encoding="utf-8")))
            if code != 0:
                console.print(f"the server exited with code {code}; last lines of {log_dir / 'server.log'}:", markup=False)
                console.print(_tail(log_dir / "server.log"), markup=False, highlight=False)
            _stop_clients(procs, grace_s=_CLIENT_GRACE_S if code == 0 else 0.0)
        except KeyboardInterrupt:
            code = 130
            _interrupt_server(procs.get("server"), console)
        finally:
            for p in procs.values():
                _terminate(p)
            for fh in logs.values():
                fh.close()
            _update_launch_json(out, {"exit_codes": {n: p.returncode for n, p in procs.items()}, "log_dir": str(log_dir)})
    return int(code)


#: how long ``launch`` waits for an interrupted server to finish its round
_SERVER_STOP_S = 300.0


def _private_log(path: Path) -> Any:
    """A process log opened for appending, readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(path, 0o600)
    return os.fdopen(fd, "ab")


def _start_round(cfg: DeploymentConfig) -> int:
    from lightning_fedprune.core.serialization import load_state
    from lightning_fedprune.fedml_adapters.server import CHECKPOINT_NAME

    path = cfg.run_dir / CHECKPOINT_NAME
    if not path.exists():
        return 0
    try:
        return int(load_state(path).get("next_round", 0))
    except Exception:  # the server reports a bad checkpoint itself
        return 0


def _new_records(path: Path, emitted: set[int], start_round: int) -> list[dict[str, Any]]:
    from lightning_fedprune.reporting import read_metrics

    if not path.exists():
        return []
    try:
        records = read_metrics(path.parent)
    except Exception:  # being rewritten right now
        return []
    out = []
    for rec in records:
        rnd = rec.get("round")
        if isinstance(rnd, int) and rnd >= start_round and rnd not in emitted:
            emitted.add(rnd)
            out.append(rec)
    return out


def _stop_clients(procs: dict[str, subprocess.Popen], *, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for name, p in procs.items():
        if name == "server":
            continue
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit after the run; stopping it", name)


def _interrupt_server(server: subprocess.Popen | None, console: Any) -> None:
    """Ctrl-C in ``launch``: pass it on to the server (its own session does not get the terminal's),
    which finishes the round in progress and writes its checkpoint; a second Ctrl-C stops waiting."""
    if server is None or server.poll() is not None:
        return
    console.print("interrupted: the server finishes the round in progress and writes its checkpoint (Ctrl-C again stops at once)", markup=False)
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=_SERVER_STOP_S)
    except (ProcessLookupError, subprocess.TimeoutExpired, KeyboardInterrupt):
        pass


def _terminate(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
