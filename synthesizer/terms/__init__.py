"""The loss terms of synthesis, one module each: adding a term is a module here and its weight field.

A term named ``x`` (``@loss_term("x")``) is weighted by the field ``x_weight`` of
:class:`synthesizer.deepinversion.AlignmentConfig` (which gives the flag ``--x_weight`` and the
pipeline key); the total loss sums the terms in the order of those fields.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from common.tables import register

TERMS: dict[str, Callable[[TermInputs], Tensor]] = {}


@dataclass(frozen=True)
class TermInputs:
    """What one optimization step offers every term."""

    teacher: nn.Module  # its stat layers hold this step's statistics-matching loss
    logits: Tensor  # the teacher's float32 logits on the jittered batch
    targets: Tensor
    images: Tensor  # the jittered pixels being optimized (one channel for gray data)
    repeat_scale: float  # sqrt(channels) for gray data: a norm over the repeated channels


def loss_term(name: str) -> Callable:
    """Register ``function(inputs) -> scalar tensor`` as the term ``name`` (a taken name is refused)."""
    def add(function: Callable[[TermInputs], Tensor]) -> Callable[[TermInputs], Tensor]:
        return register(TERMS, "loss term", name, function)
    return add


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
