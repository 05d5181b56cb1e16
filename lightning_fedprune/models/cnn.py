"""Small CNNs for 28x28 grey-scale images (MNIST, FashionMNIST, FEMNIST).

All three share one layout: ``features`` (conv / ReLU / max-pool), ``flatten``, ``fc`` (hidden
Linear + ReLU layers) and the ``classifier`` Linear producing logits (the softmax lives in the
loss).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_fedprune.models.registry import check_positive_int, register_model

__all__ = ["SmallCNN", "DigitsCNN", "cnn_mnist", "cnn_mnist_large", "conv_fmnist", "conv_femnist", "cnn_digits"]


class SmallCNN(nn.Module):
    """Two-conv CNN.

    ``[conv -> ReLU -> maxpool2] x 2 -> flatten -> [Linear -> ReLU]* -> classifier``.

    Args:
        in_channels: Input channels.
        channels: Output channels of the two convolutions.
        kernel_sizes: Kernel sizes of the two convolutions.
        paddings: Zero paddings of the two convolutions.
        fc: Widths of the hidden fully connected layers.
        num_classes: Number of output logits.
        image_size: Input height/width (square), used to size the first FC layer.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        paddings: Sequence[int],
        fc: Sequence[int],
        num_classes: int,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c_out, k, p in zip(channels, kernel_sizes, paddings):
            layers += [nn.Conv2d(c_in, c_out, k, padding=p), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = c_out, (size + 2 * p - k + 1) // 2
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        hidden: list[nn.Module] = []
        width = c_in * size * size
        for h in fc:
            hidden += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.fc = nn.Sequential(*hidden)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, in_channels, 28, 28)``."""
        return self.classifier(self.fc(self.flatten(self.features(x))))


def _mnist_shape(in_channels: int, **_: object) -> tuple[int, int, int]:
    return (in_channels, 28, 28)


@register_model(input_shape=_mnist_shape)
def cnn_mnist(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """FedMP's MNIST CNN: two 5x5 convolutions, a 256-unit FC layer and a 10-way output.

    ``conv(in,32,5) ReLU pool2 -> conv(32,64,5) ReLU pool2 -> fc(64*4*4 -> 256) ReLU -> classifier``
    on 28x28 inputs (no padding: 28 -> 24 -> 12 -> 8 -> 4). 317,066 parameters with the defaults.
    Source: FedMP (Jiang et al.), Sec. V "Models and datasets", after McMahan et al.'s FedAvg CNN.
    """
    check_positive_int("num_classes", num_classes, "cnn_mnist")
    check_positive_int("in_channels", in_channels, "cnn_mnist")
    return SmallCNN(in_channels, (32, 64), (5, 5), (0, 0), (256,), num_classes)


@register_model(input_shape=_mnist_shape)
def cnn_mnist_large(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """The larger MNIST CNN common in FL code: two 5x5 convolutions with padding 2, FC 512.

    ``conv(in,32,5,pad 2) ReLU pool2 -> conv(32,64,5,pad 2) ReLU pool2 -> fc(64*7*7 -> 512) ReLU ->
    classifier`` on 28x28 inputs (28 -> 28 -> 14 -> 14 -> 7). 1,663,370 parameters with the
    defaults, 5.2x :func:`cnn_mnist` (the FC layer holds 97%). FedMP's text describes
    :func:`cnn_mnist` (FC 256); this variant is what many FL code bases ship under the same name.
    """
    check_positive_int("num_classes", num_classes, "cnn_mnist_large")
    check_positive_int("in_channels", in_channels, "cnn_mnist_large")
    return SmallCNN(in_channels, (32, 64), (5, 5), (2, 2), (512,), num_classes)


@register_model(input_shape=_mnist_shape)
def conv_fmnist(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """PruneFL's Conv-FashionMNIST (Jiang et al., "Model Pruning Enables Efficient Federated
    Learning on Edge Devices", Table 1): convolutions "32, pool, 64, pool", FC 2304x300x100x10.

    Table 1 lists neither kernel sizes nor paddings; they are derived from its counts:
    18.8K conv parameters = (1*32*9 + 32) + (32*64*9 + 64) = 18,816 means 3x3 kernels, and the
    2304 = 64*6*6 FC input on 28x28 images means 28 -(3x3, pad 1)-> 28 -pool-> 14 -(3x3, pad 0)->
    12 -pool-> 6. FC: 2304*300+300 + 300*100+100 + 100*10+10 = 722,610 (Table 1: 722.6K).
    741,426 parameters in total (Table 1: 741.4K).
    """
    check_positive_int("num_classes", num_classes, "conv_fmnist")
    check_positive_int("in_channels", in_channels, "conv_fmnist")
    return SmallCNN(in_channels, (32, 64), (3, 3), (1, 0), (300, 100), num_classes)


@register_model(input_shape=_mnist_shape)
def conv_femnist(num_classes: int = 62, in_channels: int = 1) -> SmallCNN:
    """PruneFL's Conv-FEMNIST (Jiang et al., "Model Pruning Enables Efficient Federated Learning
    on Edge Devices", Table 1): convolutions "32, pool, 128, pool", FC 2048x1024x512x62.

    Kernel size derived from Table 1's counts: 103.4K conv parameters = (1*32*25 + 32) +
    (32*128*25 + 128) = 103,360 means 5x5 kernels, and 2048 = 128*4*4 means no padding
    (28 -> 24 -> 12 -> 8 -> 4). FC: 2,654,782 (Table 1: 2654.8K). 2,758,142 parameters in total,
    exactly the figure given in the paper's text.
    """
    check_positive_int("num_classes", num_classes, "conv_femnist")
    check_positive_int("in_channels", in_channels, "conv_femnist")
    return SmallCNN(in_channels, (32, 128), (5, 5), (0, 0), (1024, 512), num_classes)


class DigitsCNN(nn.Module):
    """A small BatchNorm CNN for flattened 8x8 images (scikit-learn's digits).

    ``view(1, 8, 8) -> [conv3x3 -> BN -> ReLU] x 2 (16, 32 channels) -> global average pool ->
    classifier``. Accepts ``(B, 64)`` vectors or ``(B, 1, 8, 8)`` images.
    """

    def __init__(self, channels: Sequence[int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)``."""
        return self.classifier(self.flatten(self.pool(self.features(x.reshape(-1, 1, 8, 8)))))


@register_model(input_shape=lambda **_: (64,))
def cnn_digits(num_classes: int = 10, channels: Sequence[int] = (16, 32)) -> DigitsCNN:
    """A two-conv BatchNorm CNN on scikit-learn's 8x8 digits (64 features per sample): the
    smallest registry model with gateable convolutions (FedDP tests and the digits recipes).
    5,226 parameters with the defaults."""
    check_positive_int("num_classes", num_classes, "cnn_digits")
    return DigitsCNN(tuple(int(c) for c in channels), num_classes)
