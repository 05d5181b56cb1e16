"""ResNet-32 for CIFAR (He et al. 2016, Sec. 4.2) with projection shortcuts."""

from __future__ import annotations

import torch
from torch import nn

from lightning_fedprune.models.registry import check_positive_int, register_model

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet32_cifar"]


class BasicBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU.

    The shortcut is the identity, or ``conv1x1(stride) -> BN`` when the shape changes. (The
    parameter-free zero-padding shortcut of the original CIFAR ResNets is deliberately not used:
    structured pruners such as torch-pruning cannot trace it.)
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-(6n+2): a 3x3 stem conv with 16 channels, three stages of ``n`` BasicBlocks
    with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average pooling and
    the ``classifier`` Linear.

    Args:
        n: Blocks per stage (5 for ResNet-32).
        num_classes: Number of output logits.
        in_channels: Input channels.
    """

    def __init__(self, n: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, in_channels, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.flatten(self.avgpool(x)))


@register_model(input_shape=lambda in_channels, **_: (in_channels, 32, 32))
def resnet32_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-32 for CIFAR (used by FedDP): 3 stages x 5 BasicBlocks, 16/32/64 channels.

    The "32" counts the weighted layers of the main path: 1 stem conv + 30 block convs + 1 Linear.
    The two 1x1 projection shortcuts (entering stages 2 and 3) add 2 more convolutions, so the
    model has 33 ``nn.Conv2d`` and 1 ``nn.Linear``. 466,906 parameters with the defaults.
    """
    check_positive_int("num_classes", num_classes, "resnet32_cifar")
    check_positive_int("in_channels", in_channels, "resnet32_cifar")
    return ResNetCIFAR(5, num_classes, in_channels)
