"""A 1-D CNN for sensor windows (UCI HAR: 9 channels x 128 samples, 6 activities)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_fedprune.models.registry import check_positive_int, register_model

__all__ = ["SensorCNN", "cnn_har"]


class SensorCNN(nn.Module):
    """``[conv1d -> ReLU -> maxpool2] x 2 -> global average pool -> classifier``.

    Args:
        in_channels: sensor channels.
        channels: output channels of the two convolutions.
        kernel_size: kernel size of both convolutions (padding keeps the length).
        num_classes: output logits.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int], kernel_size: int, num_classes: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels[0], kernel_size, padding=pad), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(channels[0], channels[1], kernel_size, padding=pad), nn.ReLU(), nn.MaxPool1d(2),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for windows ``(B, in_channels, length)``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _har_shape(in_channels: int, seq_len: int, **_: object) -> tuple[int, int]:
    return (in_channels, seq_len)


@register_model(input_shape=_har_shape)
def cnn_har(num_classes: int = 6, in_channels: int = 9, seq_len: int = 128, width: int = 32) -> SensorCNN:
    """A 1-D CNN for HAR windows: ``conv1d(9, w, 5) -> conv1d(w, 2w, 5)``, global average pooling,
    a linear classifier (``width=32``: 12,166 parameters). The length is free (average pooling)."""
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("seq_len", seq_len), ("width", width)):
        check_positive_int(name, v, "cnn_har")
    return SensorCNN(in_channels, (width, 2 * width), 5, num_classes)
