"""The table of architectures: every constructor registers itself where it is defined."""
from __future__ import annotations

from typing import Callable

from torch import nn

Constructor = Callable[..., nn.Module]  # constructor(num_classes, in_channels=3) -> model
MODELS: dict[str, Constructor] = {}
# Smallest image side an architecture can look at meaningfully (its total downsampling); 1 = any.
MIN_SIZES: dict[str, int] = {}


def register_model(constructor: Constructor | None = None, *, min_size: int = 1):
    """Add ``constructor(num_classes, in_channels=3) -> model`` to :data:`MODELS` under its function name.

    Used bare (``@register_model``) or with the smallest image side the network needs
    (``@register_model(min_size=32)``), so that a too small input is refused in one line instead of
    failing deep inside a pooling layer.
    """
    def register(function: Constructor) -> Constructor:
        MODELS[function.__name__] = function
        MIN_SIZES[function.__name__] = min_size
        return function

    return register if constructor is None else register(constructor)
