"""Architectures of the teacher and the student, all returned ready for DP-SGD.

Every constructor builds the network with the layers of the original (BatchNorm for the
ResNets) and passes it through ``make_private_ready``, so the model trained by stage 1, the
one whose normalization inputs stage 2 measures and the one stage 3 inverts are the same
GroupNorm network the paper used.

Adding an architecture: a module here whose constructor ``name(num_classes, in_channels=3)`` is
decorated ``@register_model(norm_layers=L, min_size=S)`` (its L normalization layers; S when it needs
images of at least S x S), and its import below.
"""
from models import small, cifar_resnet, imagenet_resnet, scatter  # noqa: F401  (each registers its constructors)
from models.private_ready import make_private_ready
from models.zoo import MODELS, ModelSpec, register_model

__all__ = ["MODELS", "ModelSpec", "make_private_ready", "register_model"]
