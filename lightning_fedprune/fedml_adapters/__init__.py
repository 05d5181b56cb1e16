"""FedML transports for the round contract: real server and client processes.

The same :class:`~lightning_fedprune.strategies.Strategy` and
:class:`~lightning_fedprune.runtime.ClientRuntime` the simulator uses, driven over FedML's
communication managers (GRPC, or MQTT + S3) with our own message types and a pickle-free wire
format::

    from lightning_fedprune.fedml_adapters import DeploymentConfig, FedMLServer, FedMLClient

    cfg = DeploymentConfig.from_yaml("recipes/fedml/digits_grpc.yaml")
    FedMLServer(cfg).run()               # in the server process
    FedMLClient(cfg, rank=1).run()       # in each client process (ranks 1..worker_num)

or from the command line: ``python -m lightning_fedprune server|client|launch CONFIG``.

Modules: :mod:`.settings` (deployment configs), :mod:`.envelope` (wire format), :mod:`.rounds`
(server-side round bookkeeping), :mod:`.server`, :mod:`.client`, :mod:`.transport` (the only
module that imports FedML), :mod:`.services` (local mosquitto / moto), :mod:`.launch`,
:mod:`.components` (what processes build; edge data folders), :mod:`.edge` (``fedml build``
packages), :mod:`.serving` (FedML's inference runner).

FedML is imported lazily, only when a process opens its transport, builds a package or serves a
model; importing this package does not import it. Install it with
``pip install 'lightning_fedprune[fedml]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DeploymentConfig",
    "FedMLServer",
    "FedMLClient",
    "FedMLEndpoint",
    "TransportError",
    "Envelope",
    "RoundCollector",
    "LocalBroker",
    "LocalObjectStore",
    "LocalClientData",
    "export_client_data",
    "build_client_package",
    "load_client_model",
    "serve_client_model",
]

_WHERE = {
    "DeploymentConfig": "settings",
    "FedMLServer": "server",
    "FedMLClient": "client",
    "FedMLEndpoint": "transport",
    "TransportError": "transport",
    "Envelope": "envelope",
    "RoundCollector": "rounds",
    "LocalBroker": "services",
    "LocalObjectStore": "services",
    "LocalClientData": "components",
    "export_client_data": "components",
    "build_client_package": "edge",
    "load_client_model": "serving",
    "serve_client_model": "serving",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
