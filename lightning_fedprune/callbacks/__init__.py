"""Lightning callbacks carrying the client-side parts of federated algorithms."""

from collections.abc import Callable

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.compression import TopKUploadCallback
from lightning_fedprune.callbacks.fedprox import FedProxCallback
from lightning_fedprune.callbacks.masking import (
    IterativeMagnitudePruning,
    MaskingCallback,
    run_server_pruning,
    sample_based_pruning,
)
from lightning_fedprune.callbacks.scaffold import ScaffoldCallback
from lightning_fedprune.callbacks.structured import StructuredPruning
from lightning_fedprune.errors import ConfigError

#: names a strategy lists in ``client_callbacks`` -> factory of the client callback
CLIENT_CALLBACKS: dict[str, Callable[[], FederatedCallback]] = {
    "fedprox": FedProxCallback,
    "scaffold": ScaffoldCallback,
    "topk_upload": TopKUploadCallback,
    "masks": MaskingCallback,
}


def make_client_callbacks(names: tuple[str, ...] | list[str]) -> list[FederatedCallback]:
    """Instantiate the client callbacks a strategy asks for, by name."""
    unknown = [n for n in names if n not in CLIENT_CALLBACKS]
    if unknown:
        raise ConfigError(f"unknown client callback(s) {unknown}; valid: {', '.join(sorted(CLIENT_CALLBACKS))}")
    return [CLIENT_CALLBACKS[n]() for n in names]


__all__ = [
    "ClientContext",
    "FederatedCallback",
    "FedProxCallback",
    "ScaffoldCallback",
    "TopKUploadCallback",
    "StructuredPruning",
    "MaskingCallback",
    "IterativeMagnitudePruning",
    "run_server_pruning",
    "sample_based_pruning",
    "CLIENT_CALLBACKS",
    "make_client_callbacks",
]
