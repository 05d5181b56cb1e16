"""lightning_fedprune: federated learning with model pruning for PyTorch Lightning.

The round contract: a :class:`~lightning_fedprune.strategies.Strategy` builds
:class:`~lightning_fedprune.core.ClientTask` s, a :class:`~lightning_fedprune.runtime.ClientRuntime`
trains them with a Lightning ``Trainer`` and returns :class:`~lightning_fedprune.core.ClientResult` s,
and the strategy aggregates them. The simulation engine and the FedML adapters are two transports
of that same round.
"""

from lightning_fedprune.module import FederatedModuleMixin

__version__ = "0.1.0"

__all__ = ["FederatedModuleMixin", "__version__"]
