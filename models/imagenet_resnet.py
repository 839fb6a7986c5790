"""ImageNet-style ResNet-18 (7x7 stem and max-pool) for 224x224 inputs such as ImageNette.

Same layers as torchvision's ``resnet18`` (random init, nothing downloaded), built on our
own block: torchvision's block adds the shortcut in place, which Opacus's per-sample
gradient hooks reject.
"""
from __future__ import annotations

from torch import nn

from models.cifar_resnet import STAGE_WIDTHS, build_resnet
from models.zoo import register_model


def imagenet_stem() -> nn.Module:
    """7x7 convolution at stride 2 and a 3x3 max-pool at stride 2: 224x224 becomes 56x56."""
    return nn.Sequential(
        nn.Conv2d(3, STAGE_WIDTHS[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(STAGE_WIDTHS[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )


@register_model
def resnet18_imagenet(num_classes: int) -> nn.Module:
    """ImageNet-style ResNet-18 with GroupNorm."""
    return build_resnet(imagenet_stem(), 18, num_classes)
