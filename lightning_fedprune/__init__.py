"""lightning_fedprune: federated learning with model pruning for PyTorch Lightning.

The round contract: a :class:`~lightning_fedprune.strategies.Strategy` builds
:class:`~lightning_fedprune.core.ClientTask` s, a :class:`~lightning_fedprune.runtime.ClientRuntime`
trains them with a Lightning ``Trainer`` and returns :class:`~lightning_fedprune.core.ClientResult` s,
and the strategy aggregates them. The simulation engine and the FedML adapters are two transports
of that same round.
"""

import warnings

# Two warnings about third-party packages' own versions, printed when an optional dependency is
# imported (timm imports wandb when it is installed, and the fedml extra installs it): wandb's use
# of `pkg_resources` and requests' check of urllib3/chardet versions. They are not the user's to act
# on; only these two messages are silenced, every other warning shows as usual.
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated as an API", category=UserWarning)
warnings.filterwarnings("ignore", message=r"urllib3 \(.*\) or chardet \(.*\)/charset_normalizer \(.*\) doesn't match a supported version")

from lightning_fedprune.module import FederatedModuleMixin  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FederatedModuleMixin", "__version__"]
