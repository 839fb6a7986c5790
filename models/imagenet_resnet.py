"""ImageNet-style ResNet-18 (7x7 stem and max-pool) for 224x224 inputs such as ImageNette.

Same layers as torchvision's ``resnet18`` (random init, nothing downloaded), built on our
own block: torchvision's block adds the shortcut in place, which Opacus's per-sample
gradient hooks reject.
"""
from __future__ import annotations

from torch import nn

from models.cifar_resnet import STAGE_WIDTHS, STAGES_STRIDE, build_resnet
from models.zoo import register_model

STEM_STRIDE = 4  # the stem divides the side by 4, the stages by 8 more: 32 in all


def imagenet_stem(in_channels: int = 3) -> nn.Module:
    """7x7 convolution at stride 2 and a 3x3 max-pool at stride 2: 224x224 becomes 56x56."""
    return nn.Sequential(
        nn.Conv2d(in_channels, STAGE_WIDTHS[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(STAGE_WIDTHS[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )


@register_model(min_size=STEM_STRIDE * STAGES_STRIDE, norm_layers=20)  # like resnet18's
def resnet18_imagenet(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ImageNet-style ResNet-18 with GroupNorm."""
    return build_resnet(imagenet_stem(in_channels), 18, num_classes)
