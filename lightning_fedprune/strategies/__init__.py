"""Server strategies (pure objects: no Lightning, no FedML, no engine)."""

from lightning_fedprune.strategies.base import ModelSpec, Strategy, sample_clients
from lightning_fedprune.strategies.fedavg import FedAvg, FedNova, FedProx, Scaffold

#: strategy name (as used in recipes) -> class
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fednova": FedNova,
    "scaffold": Scaffold,
}

__all__ = ["Strategy", "ModelSpec", "sample_clients", "FedAvg", "FedProx", "FedNova", "Scaffold", "STRATEGIES"]
