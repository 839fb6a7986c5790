"""Architectures of the teacher and the student, all returned ready for DP-SGD.

Every constructor builds the network with the layers of the original (BatchNorm for the
ResNets) and passes it through ``make_private_ready``, so the model trained by stage 1, the
one whose normalization inputs stage 2 measures and the one stage 3 inverts are the same
GroupNorm network the paper used.
"""
from models.cifar_resnet import resnet18, resnet34
from models.imagenet_resnet import resnet18_imagenet
from models.private_ready import make_private_ready
from models.small import small_cnn

__all__ = ["make_private_ready", "resnet18", "resnet18_imagenet", "resnet34", "small_cnn"]
