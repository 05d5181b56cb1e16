"""Server strategies (pure objects: no Lightning, no FedML, no engine).

Strategies and wrappers are registered by name (:mod:`lightning_fedprune.strategies.registry`):
importing this package registers the built-in ones.
"""

from lightning_fedprune.strategies.base import ModelSpec, Strategy, sample_clients
from lightning_fedprune.strategies.fedavg import FedAvg, FedNova, Scaffold, capability_local_steps
from lightning_fedprune.strategies.feddp import DynamicGates, FedDP
from lightning_fedprune.strategies.fedmp import FedMP, FlexCom, SubModelStrategy, UniformPruning
from lightning_fedprune.strategies.hermes import Hermes
from lightning_fedprune.strategies.heterofl import HeteroFL
from lightning_fedprune.strategies.nestfl import NestFL
from lightning_fedprune.strategies.perfedavg import PerFedAvg
from lightning_fedprune.strategies.prunefl import PruneFL
from lightning_fedprune.strategies.registry import (
    STRATEGIES,
    WRAPPERS,
    register_strategy,
    register_wrapper,
    strategy_options,
    wrapper_options,
)
from lightning_fedprune.strategies.robust import ClipUpdates, RobustMean
from lightning_fedprune.strategies.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from lightning_fedprune.strategies.wrappers import FedProx, Proximal, StrategyWrapper

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
    "NestFL",
    "HeteroFL",
    "PerFedAvg",
    "Hermes",
    "DynamicGates",
    "FedDP",
    "StrategyWrapper",
    "Proximal",
    "ClipUpdates",
    "RobustMean",
    "ServerOptimizer",
    "FedAvgM",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "STRATEGIES",
    "WRAPPERS",
    "register_strategy",
    "register_wrapper",
    "strategy_options",
    "wrapper_options",
]
