"""CIFAR-style ResNet (3x3 stem, stride 1, no max-pool), the teacher and student of the paper.

Written with BatchNorm like the original CIFAR ResNet and converted to GroupNorm by
``make_private_ready``. Adaptive average pooling before the classifier lets the same
network serve 32x32 inputs and the 64x64 CelebA crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.private_ready import make_private_ready

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: full resolution through the first stage."""

    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for width, stride, blocks in zip(STAGE_WIDTHS, STAGE_STRIDES, blocks_per_stage):
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_channels, width, block_stride))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def _cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    return make_private_ready(CifarResNet(BLOCKS_PER_STAGE[depth], num_classes))


def resnet18(num_classes: int) -> nn.Module:
    """CIFAR-style ResNet-18 with GroupNorm (the paper's teacher and student)."""
    return _cifar_resnet(18, num_classes)


def resnet34(num_classes: int) -> nn.Module:
    """CIFAR-style ResNet-34 with GroupNorm."""
    return _cifar_resnet(34, num_classes)
