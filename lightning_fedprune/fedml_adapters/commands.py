"""The deployment commands behind ``python -m lightning_fedprune server|client|launch|...``.

:mod:`lightning_fedprune.cli` parses the arguments and calls these; FedML is imported only when a
process actually opens its transport.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

log = logging.getLogger(__name__)

__all__ = [
    "load_deployment",
    "run_server",
    "run_client",
    "run_launch",
    "run_export_data",
    "run_package",
    "run_serve",
    "plain_logging",
]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def load_deployment(path: str, overrides: list[str]) -> DeploymentConfig:
    """The deployment config at ``path`` with ``--set`` overrides applied."""
    return DeploymentConfig.from_yaml(path, overrides=overrides)


class plain_logging:
    """Timestamped log lines on stderr for the package's loggers while a process runs (restored after)."""

    def __init__(self, *, quiet: bool = False, prefix: str = "") -> None:
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(f"{prefix}{_FORMAT}" if prefix else _FORMAT))
        self.level = logging.WARNING if quiet else logging.INFO

    def __enter__(self) -> None:
        pkg = logging.getLogger("lightning_fedprune")
        self._saved = (pkg.level, pkg.propagate)
        pkg.addHandler(self.handler)
        pkg.setLevel(self.level)
        pkg.propagate = False

    def __exit__(self, *exc: object) -> None:
        pkg = logging.getLogger("lightning_fedprune")
        pkg.removeHandler(self.handler)
        pkg.setLevel(self._saved[0])
        pkg.propagate = self._saved[1]


def run_server(cfg: DeploymentConfig, *, resume: bool = False, progress: Any = None) -> dict[str, Any]:
    """Run the server of ``cfg`` with the simulator's listeners (metric files, plots, progress).

    Args:
        cfg: the deployment config.
        resume: continue from the run folder's checkpoint.
        progress: a :class:`~lightning_fedprune.reporting.RichProgress` (or ``None``: none).
    """
    from lightning_fedprune.config import recipe_listeners
    from lightning_fedprune.fedml_adapters.server import FedMLServer
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "deployment.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    (run_dir / "config.yaml").write_text(cfg.recipe.to_yaml(), encoding="utf-8")
    listeners = [*([progress] if progress is not None else []), MetricsWriter(run_dir), PlotWriter(run_dir), *recipe_listeners(cfg.recipe)]
    server = FedMLServer(cfg, listeners=listeners, resume=resume)
    return server.run()


def run_client(cfg: DeploymentConfig, rank: int) -> int:
    """Run the client process of ``rank`` until the server finishes; returns the rounds it trained in."""
    from lightning_fedprune.fedml_adapters.client import FedMLClient

    return FedMLClient(cfg, rank).run()


def run_launch(cfg: DeploymentConfig, *, clients: int | None, resume: bool, quiet: bool) -> int:
    """Start broker/store (MQTT_S3), the server and the client processes on this machine; see :mod:`.launch`."""
    from lightning_fedprune.fedml_adapters.launch import launch

    return launch(cfg, clients=clients, resume=resume, quiet=quiet)


def run_export_data(cfg: DeploymentConfig, rank: int, out: str) -> Path:
    """Write the data of the clients of ``rank`` to ``out`` (see :func:`.components.export_client_data`)."""
    from lightning_fedprune.fedml_adapters.components import export_client_data

    return export_client_data(cfg, rank, out)


def run_package(cfg: DeploymentConfig, rank: int, out: str, *, with_data: bool) -> Path:
    """Build the client package of ``rank`` with ``fedml build`` (see :mod:`.edge`)."""
    from lightning_fedprune.fedml_adapters.edge import build_client_package

    return build_client_package(cfg, rank, out, with_data=with_data)


def run_credentials(cfg: DeploymentConfig, out: str, *, broker_hosts: list[str], days: int) -> str:
    """Write the deployment's credentials to ``out`` (see :mod:`.credentials`); returns what to
    put into ``comm_args`` and which file goes to which host."""
    from lightning_fedprune.errors import ConfigError
    from lightning_fedprune.fedml_adapters.credentials import write_credentials

    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    hosts = {r: [a.host, a.bind_host] for r, a in cfg.grpc_addresses().items()} if cfg.comm_args.backend == "GRPC" else {}
    files = write_credentials(out, cfg.worker_num, rank_hosts=hosts, broker_hosts=broker_hosts, days=days)
    folder = files["ca"].parent.resolve()
    return (
        f"wrote the credentials of {cfg.worker_num + 1} ranks to {folder} (owner-only files)\n"
        "comm_args of the server (and of a one-machine run):\n"
        f"  tls: {{ca_file: {folder}/ca.pem, cert_file: {folder}/rank_{{rank}}.pem, key_file: {folder}/rank_{{rank}}.key}}\n"
        f"  auth_key_file: {folder}/keys/master.json\n"
        "copy to the host of client rank r only: ca.pem, rank_r.pem, rank_r.key and keys/rank_r.json "
        "(`package --rank r` does it); the broker and store use broker.pem and broker.key\n"
    )


def run_serve(cfg: DeploymentConfig, client_id: int, *, host: str, port: int) -> None:
    """Serve the trained model of ``client_id`` with FedML's inference runner (see :mod:`.serving`)."""
    from lightning_fedprune.fedml_adapters.serving import serve_client_model

    serve_client_model(cfg, client_id, host=host, port=port)
