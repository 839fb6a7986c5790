"""ScatterNet + CNN: DP-SGD on handcrafted features (Tramer & Boneh, ICLR 2021).

"Differentially Private Learning Needs Better Features" trains a small CNN on the coefficients
of a fixed scattering transform instead of on pixels: the wavelet front end has no weights, so
DP-SGD's noise only has to fight a few tens of thousands of parameters that start from good
features. This is their MNIST / FashionMNIST ScatterNet+CNN: scattering with J = 2 and L = 8
(81 channels per input channel at a quarter of the side), GroupNorm without affine parameters,
then conv(3x3, stride 2) 16, conv(3x3) 32, Linear 32, Linear classes, with Tanh activations.

The model is ``frontend`` (the scattering: fixed, per example, no parameters) followed by
``head`` (everything trainable). DP-SGD may therefore train ``head`` on precomputed features
(``training.frontend``); synthesis optimizes images through the whole, differentiable model,
and the DP statistics describe the GroupNorm's input: the scattering coefficients, per channel.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.fast_scattering import MorletBank, build_bank, scattering
from models.private_ready import make_private_ready
from models.zoo import register_model

SCALES = 2  # J: the scattering averages over 2^J pixels, so its maps have a quarter of the side
ANGLES = 8  # L: wavelet orientations
# Channels per GroupNorm group: 27 groups of the 81 coefficients of one gray channel, the GroupNorm
# setting of the paper's FashionMNIST ScatterNet models, for any number of input channels.
GROUP_SIZE = 3
CONV_WIDTHS = (16, 32)
HIDDEN = 32
POOLED_SIDE = 4
FIRST_STRIDE = 2
# The smallest side whose strided conv map still has POOLED_SIDE pixels (the paper's 28 x 28 MNIST):
# smaller images would make the adaptive pool repeat pixels instead of averaging them.
MIN_SIDE = 2**SCALES * (FIRST_STRIDE * (POOLED_SIDE - 1) + 1)


def path_count(scales: int, angles: int) -> int:
    """Coefficients per input channel: order 0, J*L of order 1, L^2 * J(J-1)/2 of order 2 (81 for J=2, L=8)."""
    return 1 + scales * angles + angles**2 * scales * (scales - 1) // 2


class Scattering(nn.Module):
    """The 2-D scattering transform of every channel: (B, C, H, W) -> (B, C * paths, H', W').

    kymatio's transform (``ScatteringTorch2D``), computed by ``models.fast_scattering`` from kymatio's
    own filters in a few batched operations instead of kymatio's path-by-path loop (figures:
    ``benchmarks/bench_scatter.py``, docs/performance.md). The filters of one input shape are kept per (shape,
    device, dtype) in a plain dict, out of the module tree, so they (a function of the shape alone)
    never enter the ``state_dict`` (checkpoints stay small and load for any image size, with
    ``weights_only=True``), follow the input's device without a ``.to()``, and are never buffers that
    a DP-SGD engine must check. The transform has no parameters and treats each example alone.
    """

    def __init__(self, scales: int = SCALES, angles: int = ANGLES) -> None:
        super().__init__()
        self.scales, self.angles = scales, angles
        self.paths = path_count(scales, angles)
        self._banks: dict[tuple, MorletBank] = {}

    def _bank(self, side: tuple[int, int], device: torch.device, dtype: torch.dtype) -> MorletBank:
        key = (side, device, dtype)
        bank = self._banks.get(key)
        if bank is None:
            bank = self._banks[key] = build_bank(side, self.scales, self.angles, device, dtype)
        return bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32: the FFTs have no bf16 kernels, and autocast leaves them alone.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        coefficients = scattering(x, self._bank(tuple(x.shape[-2:]), x.device, x.dtype))  # (B, C, paths, H', W')
        return coefficients.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"J={self.scales}, L={self.angles}, paths={self.paths}"


class ScatterCNN(nn.Module):
    """``head(frontend(x))``: scattering, GroupNorm(affine=False), two Tanh convs, two Linear layers."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.frontend = Scattering()
        channels = in_channels * self.frontend.paths
        self.head = nn.Sequential(OrderedDict([
            ("norm", nn.GroupNorm(channels // GROUP_SIZE, channels, affine=False)),
            ("conv1", nn.Conv2d(channels, CONV_WIDTHS[0], 3, stride=FIRST_STRIDE, padding=1)),
            ("act1", nn.Tanh()),
            ("conv2", nn.Conv2d(CONV_WIDTHS[0], CONV_WIDTHS[1], 3, stride=1, padding=1)),
            ("act2", nn.Tanh()),
            # The identity for 28-35 pixel images (the paper's 4 x 4 map); averages larger maps down to it.
            ("pool", nn.AdaptiveAvgPool2d(POOLED_SIDE)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(CONV_WIDTHS[1] * POOLED_SIDE**2, HIDDEN)),
            ("act3", nn.Tanh()),
            ("fc2", nn.Linear(HIDDEN, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))


@register_model(min_size=MIN_SIDE, norm_layers=1)  # the scattering coefficients'
def scatter_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Tramer & Boneh's ScatterNet+CNN; already Opacus-ready (no BatchNorm, no in-place activation)."""
    return make_private_ready(ScatterCNN(num_classes, in_channels))
