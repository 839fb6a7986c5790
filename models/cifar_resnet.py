"""ResNet body shared by both stems, and the CIFAR-style ResNets of the paper.

The CIFAR stem is one 3x3 convolution at stride 1 with no max-pool, so small images keep
full resolution through the first stage. Written with BatchNorm like the original CIFAR
ResNet and converted to GroupNorm by ``make_private_ready``. Adaptive average pooling
before the classifier lets one network serve 32x32 inputs and the 64x64 CelebA crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.private_ready import make_private_ready
from models.zoo import register_model

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGES_STRIDE = 8  # product of STAGE_STRIDES: the last stage sees side / 8


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

    The residual sum is out-of-place: an in-place ``+=`` on a normalization layer's output
    breaks the backward hooks Opacus uses for per-sample gradients.
    """

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


class ResNet(nn.Module):
    """A stem, four stages of basic blocks, global average pooling and a linear classifier."""

    def __init__(self, stem: nn.Module, blocks_per_stage: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.stem = stem
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
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.linear(torch.flatten(self.pool(out), 1))


def build_resnet(stem: nn.Module, depth: int, num_classes: int) -> nn.Module:
    """The GroupNorm ResNet of the given depth behind ``stem`` (which must output 64 channels)."""
    return make_private_ready(ResNet(stem, BLOCKS_PER_STAGE[depth], num_classes))


def cifar_stem(in_channels: int = 3) -> nn.Module:
    """3x3 convolution at stride 1, no max-pool: a 32x32 input stays 32x32 in stage 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(STAGE_WIDTHS[0]),
        nn.ReLU(),
    )


# Normalization layers: the stem's, two per block, one per projection shortcut (stages 2 to 4).
@register_model(min_size=STAGES_STRIDE, norm_layers=1 + 2 * 8 + 3)
def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR-style ResNet-18 with GroupNorm (the paper's teacher and student)."""
    return build_resnet(cifar_stem(in_channels), 18, num_classes)


@register_model(min_size=STAGES_STRIDE, norm_layers=1 + 2 * 16 + 3)
def resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR-style ResNet-34 with GroupNorm."""
    return build_resnet(cifar_stem(in_channels), 34, num_classes)
