"""ImageNet-style ResNet-18 (7x7 stem and max-pool) for 224x224 inputs such as ImageNette."""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as torchvision_resnet18

from models.private_ready import make_private_ready


def resnet18_imagenet(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18, randomly initialized (no weights are downloaded), with GroupNorm."""
    return make_private_ready(torchvision_resnet18(weights=None, num_classes=num_classes))
