"""AlexNet for 32x32 inputs (CIFAR-10)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_fedprune.models.registry import (
    check_int_tuple,
    check_positive_int,
    check_probability,
    register_model,
)

__all__ = ["AlexNetCIFAR", "alexnet_cifar"]


class AlexNetCIFAR(nn.Module):
    """The widely used CIFAR variant of AlexNet.

    ``features``: five 3x3 convolutions with 64-192-384-256-256 channels (the first with stride 2),
    ReLU after each and 2x2 max-pools after the 1st, 2nd and 5th, so a 32x32 image becomes
    256x2x2 (32 -> 16 -> 8 -> 4 -> 2). ``fc``: ``[Dropout -> Linear -> ReLU]`` per hidden width.
    ``classifier``: Linear to ``num_classes``.

    Args:
        num_classes: Number of output logits.
        in_channels: Input channels.
        hidden: Widths of the hidden FC layers.
        dropout: Dropout probability before each hidden FC layer.
    """

    def __init__(
        self, num_classes: int, in_channels: int, hidden: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = 256 * 2 * 2
        for h in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU()]
            width = h
        self.fc = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, in_channels, 32, 32)``."""
        return self.classifier(self.fc(self.flatten(self.features(x))))


@register_model(input_shape=lambda in_channels, **_: (in_channels, 32, 32))
def alexnet_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    hidden: Sequence[int] = (4096, 4096),
    dropout: float = 0.5,
) -> AlexNetCIFAR:
    """AlexNet for CIFAR-10 (used by FedMP): 256*2*2 -> 4096 -> 4096 -> classifier.

    23,272,266 parameters with the defaults (2.25M in convolutions, 21.02M in FC layers; the
    convolutions dominate the FLOPs). Pass e.g. ``hidden=(1024, 1024)`` for a CPU-friendlier
    variant.
    """
    check_positive_int("num_classes", num_classes, "alexnet_cifar")
    check_positive_int("in_channels", in_channels, "alexnet_cifar")
    hidden_t = check_int_tuple("hidden", hidden, "alexnet_cifar")
    dropout = check_probability("dropout", dropout, "alexnet_cifar")
    return AlexNetCIFAR(num_classes, in_channels, hidden_t, dropout)
