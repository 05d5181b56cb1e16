"""Server strategies (pure objects: no Lightning, no FedML, no engine)."""

from lightning_fedprune.strategies.base import ModelSpec, Strategy, sample_clients
from lightning_fedprune.strategies.fedavg import FedAvg, FedNova, FedProx, Scaffold, capability_local_steps
from lightning_fedprune.strategies.fedmp import FedMP, FlexCom, SubModelStrategy, UniformPruning
from lightning_fedprune.strategies.prunefl import PruneFL

#: strategy name (as used in recipes) -> class
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fednova": FedNova,
    "scaffold": Scaffold,
    "fedmp": FedMP,
    "upfl": UniformPruning,
    "flexcom": FlexCom,
    "prunefl": PruneFL,
}

__all__ = [
    "Strategy",
    "ModelSpec",
    "sample_clients",
    "FedAvg",
    "FedProx",
    "FedNova",
    "Scaffold",
    "capability_local_steps",
    "SubModelStrategy",
    "FedMP",
    "UniformPruning",
    "FlexCom",
    "PruneFL",
    "STRATEGIES",
]
