"""VGG with BatchNorm for 32x32 inputs (CIFAR-10)."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from lightning_fedprune.models.registry import check_int_tuple, check_positive_int, register_model

__all__ = ["VGG", "VGG_CFGS", "vgg11_bn", "vgg19_bn"]

#: Layer configurations of Simonyan & Zisserman (2015): ints are 3x3 conv widths, "M" a max-pool.
VGG_CFGS: dict[str, list[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG for 32x32 images.

    ``features``: ``[Conv3x3(pad 1) -> BatchNorm -> ReLU]`` per width in ``cfg``, 2x2 max-pool per
    ``"M"`` (five pools: 32x32 -> 1x1, so the flattened feature is 512-dimensional). ``fc``:
    ``[Linear -> ReLU]`` per hidden width (none by default). ``classifier``: Linear to
    ``num_classes``.

    Args:
        cfg: Layer configuration (see :data:`VGG_CFGS`).
        num_classes: Number of output logits.
        in_channels: Input channels.
        fc_layers: Widths of optional hidden FC layers between the features and the classifier.
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]],
        num_classes: int,
        in_channels: int,
        fc_layers: Sequence[int],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        hidden: list[nn.Module] = []
        width = c_in
        for h in fc_layers:
            hidden += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.fc = nn.Sequential(*hidden)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, in_channels, 32, 32)``."""
        return self.classifier(self.fc(self.flatten(self.features(x))))


def _build(
    name: str, cfg: str, num_classes: int, in_channels: int, fc_layers: Sequence[int]
) -> VGG:
    check_positive_int("num_classes", num_classes, name)
    check_positive_int("in_channels", in_channels, name)
    fc_layers = check_int_tuple("fc_layers", fc_layers, name)
    return VGG(VGG_CFGS[cfg], num_classes, in_channels, fc_layers)


@register_model(input_shape=lambda in_channels, **_: (in_channels, 32, 32))
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, fc_layers: Sequence[int] = ()) -> VGG:
    """VGG-11 (configuration "A") with BatchNorm for CIFAR: 8 convs, ``classifier`` 512 -> classes.

    9,231,114 parameters with the defaults. ``fc_layers=(512, 512)`` gives PruneFL's VGG-11
    head (FC 512x512x512x10, Table 1) plus BatchNorm.
    """
    return _build("vgg11_bn", "A", num_classes, in_channels, fc_layers)


@register_model(input_shape=lambda in_channels, **_: (in_channels, 32, 32))
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, fc_layers: Sequence[int] = ()) -> VGG:
    """VGG-19 (configuration "E") with BatchNorm for CIFAR: 16 convs, ``classifier`` 512 -> classes.

    20,040,522 parameters with the defaults.
    """
    return _build("vgg19_bn", "E", num_classes, in_channels, fc_layers)
