"""Lightning callbacks carrying the client-side parts of federated algorithms."""

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.compression import TopKUploadCallback
from lightning_fedprune.callbacks.fedprox import FedProxCallback
from lightning_fedprune.callbacks.gates import DynamicGating, GateCallback
from lightning_fedprune.callbacks.heterofl import HeteroFLScaler, StaticBatchNorm
from lightning_fedprune.callbacks.masking import IterativeMagnitudePruning, MaskingCallback
from lightning_fedprune.callbacks.perfedavg import PerFedAvgCallback
from lightning_fedprune.callbacks.personal import PersonalizedModel
from lightning_fedprune.callbacks.registry import CLIENT_CALLBACKS, make_client_callbacks, register_client_callback
from lightning_fedprune.callbacks.scaffold import ScaffoldCallback
from lightning_fedprune.callbacks.server_pruning import run_server_pruning, sample_based_pruning
from lightning_fedprune.callbacks.structured import StructuredPruning

__all__ = [
    "ClientContext",
    "FederatedCallback",
    "FedProxCallback",
    "ScaffoldCallback",
    "GateCallback",
    "DynamicGating",
    "TopKUploadCallback",
    "StructuredPruning",
    "MaskingCallback",
    "HeteroFLScaler",
    "StaticBatchNorm",
    "PersonalizedModel",
    "PerFedAvgCallback",
    "IterativeMagnitudePruning",
    "run_server_pruning",
    "sample_based_pruning",
    "CLIENT_CALLBACKS",
    "make_client_callbacks",
    "register_client_callback",
]
