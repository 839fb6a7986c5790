"""The table of architectures: every constructor registers itself where it is defined."""
from __future__ import annotations

from typing import Callable

from torch import nn

Constructor = Callable[[int], nn.Module]
MODELS: dict[str, Constructor] = {}


def register_model(constructor: Constructor) -> Constructor:
    """Add ``constructor(num_classes) -> model`` to :data:`MODELS` under its function name."""
    MODELS[constructor.__name__] = constructor
    return constructor
