"""A small GroupNorm CNN sized for DP-SGD on a CPU (the offline demo's network).

DP-SGD adds noise of the same size to every coordinate, so fewer parameters mean a better
signal-to-noise ratio per step; tens of thousands of weights are enough for digits and
keep Opacus's per-sample gradients cheap. Three conv blocks, each followed by GroupNorm,
give the DP-statistics stage several normalization layers to record and to match.
"""
from __future__ import annotations

import torch
from torch import nn

from models.private_ready import make_private_ready
from models.zoo import register_model

CONV_WIDTHS = (16, 32, 64)
GROUPS_PER_NORM = 4
POOLED_SIDE = 2
# Two 2x2 average pools, then the adaptive pool needs at least POOLED_SIDE pixels a side to average.
MIN_SIDE = POOLED_SIDE * 2 ** (len(CONV_WIDTHS) - 1)


def _conv_block(in_channels: int, out_channels: int, pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(GROUPS_PER_NORM, out_channels),
        nn.Tanh(),
        pool,
    )


class SmallCNN(nn.Module):
    """conv-GN-tanh-pool x3, then a linear classifier on a 2x2 adaptive pool of any input size."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        in_widths = (in_channels,) + CONV_WIDTHS[:-1]
        pools = [nn.AvgPool2d(2) for _ in CONV_WIDTHS[:-1]] + [nn.AdaptiveAvgPool2d(POOLED_SIDE)]
        self.features = nn.Sequential(*(
            _conv_block(in_width, out_width, pool)
            for in_width, out_width, pool in zip(in_widths, CONV_WIDTHS, pools)
        ))
        self.classifier = nn.Linear(CONV_WIDTHS[-1] * POOLED_SIDE**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(min_size=MIN_SIDE, norm_layers=len(CONV_WIDTHS))
def small_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """The small DP-SGD network; already Opacus-ready (it has no BatchNorm to replace)."""
    return make_private_ready(SmallCNN(num_classes, in_channels))
