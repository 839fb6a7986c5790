"""The table of architectures: every constructor registers itself, with what is known of it, where it is defined."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.tables import register

Constructor = Callable[..., nn.Module]  # constructor(num_classes, in_channels=3) -> model


@dataclass(frozen=True)
class ModelSpec:
    """An architecture: called like its constructor, and carrying the facts the stages and tests rely on."""

    build: Constructor
    min_size: int  # smallest image side it can look at meaningfully (its total downsampling); 1 = any
    norm_layers: int  # GroupNorm layers once private-ready: the layers whose inputs the DP statistics describe

    def __call__(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        return self.build(num_classes, in_channels)


MODELS: dict[str, ModelSpec] = {}


def register_model(*, norm_layers: int, min_size: int = 1) -> Callable[[Constructor], Constructor]:
    """Add ``constructor(num_classes, in_channels=3) -> model`` to :data:`MODELS` under its function name.

    ``norm_layers`` is how many normalization layers the built network has (a test counts them);
    ``min_size`` the smallest image side it needs, so that a too small input is refused in one line
    instead of failing deep inside a pooling layer. A name registered twice is refused.
    """
    def add(function: Constructor) -> Constructor:
        register(MODELS, "model", function.__name__, ModelSpec(function, min_size, norm_layers))
        return function

    return add
