"""Fully connected models: a configurable MLP and LeNet-300-100."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_fedprune.models.registry import check_int_tuple, check_positive_int, register_model

__all__ = ["MLP", "mlp", "lenet300_100"]


class MLP(nn.Module):
    """Flatten, then ``Linear + ReLU`` hidden layers (``features``), then the ``classifier`` Linear.

    Args:
        in_features: Number of input features after flattening.
        hidden: Widths of the hidden layers (may be empty: a linear classifier).
        num_classes: Number of output logits.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for inputs of ``in_features`` values per sample."""
        return self.classifier(self.features(self.flatten(x)))


@register_model(input_shape=lambda in_features, **_: (in_features,))
def mlp(in_features: int = 64, hidden: Sequence[int] = (300, 100), num_classes: int = 10) -> MLP:
    """Configurable MLP; the default 64-300-100-10 fits scikit-learn's 8x8 digits.

    Example input: ``(B, in_features)`` float32.
    """
    check_positive_int("in_features", in_features, "mlp")
    check_positive_int("num_classes", num_classes, "mlp")
    return MLP(in_features, check_int_tuple("hidden", hidden, "mlp"), num_classes)


@register_model(input_shape=lambda in_features, **_: (in_features,))
def lenet300_100(num_classes: int = 10, in_features: int = 784) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998; PruneFL Table 1): flatten, 784-300-100-10, ReLU.

    266,610 parameters with the defaults. Accepts ``(B, 1, 28, 28)`` images or ``(B, 784)``
    vectors; the registered example input is ``(B, in_features)``.
    """
    check_positive_int("in_features", in_features, "lenet300_100")
    check_positive_int("num_classes", num_classes, "lenet300_100")
    return MLP(in_features, (300, 100), num_classes)
