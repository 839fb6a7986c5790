"""The one conversion that makes a network trainable with DP-SGD."""
from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from common.errors import DPImgSynError
from common.runtime import in_mode


def make_private_ready(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` that Opacus can compute per-sample gradients for.

    BatchNorm mixes the examples of a batch, so no per-sample gradient exists for it;
    Opacus's own fixer replaces each BatchNorm by ``GroupNorm(gcd(32, C), C)``, which is
    the teacher of the paper. In-place activations are turned off because they overwrite
    tensors that the per-sample gradient hooks and the statistics hooks of stage 2 read.
    """
    fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    with in_mode(fixed, training=True):
        errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise DPImgSynError(
            f"model {type(model).__name__} cannot be trained with DP-SGD: "
            + "; ".join(str(error) for error in errors)
            + "; replace the unsupported layers by ones Opacus supports")
    return fixed
