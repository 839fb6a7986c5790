"""The DP-SGD optimizers: Opacus's, and the same with the noise read from the operating system.

Opacus's optimizers add the Gaussian noise once per logical step (on rank 0 alone under torchrun)
from a torch generator, which a seed or a leaked state regenerates. Secure mode replaces only that
draw by :data:`privacy.noise.OS_RANDOM`; clipping, scaling and the rank-0 gate stay Opacus's.
"""
from __future__ import annotations

from opacus.optimizers import (DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping, DPOptimizer,
                               DPOptimizerFastGradientClipping)
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privacy.noise import OS_RANDOM, gaussian


class _OSNoise:
    """Opacus's ``add_noise`` with the noise read from the operating system (secure mode).

    Same contract as Opacus's: ``p.grad = p.summed_grad + N(0, (sigma * C)^2)`` once per logical
    step, in the gradient's dtype; only the source differs. Listed before the Opacus class, so that
    the distributed variants below still reach it through their rank-0-only ``add_noise``.
    """

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for param in self.params:
            _check_processed_flag(param.summed_grad)
            summed = param.summed_grad
            param.grad = (summed + gaussian(summed.shape, std, OS_RANDOM, summed.device, summed.dtype)).view_as(param)
            _mark_as_processed(param.summed_grad)


class SecureDPOptimizer(_OSNoise, DPOptimizer):
    """Opacus's ``DPOptimizer`` with OS noise."""


class SecureDPOptimizerFastGradientClipping(_OSNoise, DPOptimizerFastGradientClipping):
    """Opacus's ``DPOptimizerFastGradientClipping`` with OS noise."""


class SecureDistributedDPOptimizer(DistributedDPOptimizer, SecureDPOptimizer):
    """Rank 0 adds OS noise (Opacus's ``add_noise`` gate comes first in the MRO); the others add none."""


class SecureDistributedDPOptimizerFastGradientClipping(DistributedDPOptimizerFastGradientClipping,
                                                       SecureDPOptimizerFastGradientClipping):
    """Rank 0 adds OS noise (Opacus's ``add_noise`` gate comes first in the MRO); the others add none."""


# (fused clipper, distributed, secure) -> optimizer class
OPTIMIZERS = {
    (True, False, False): DPOptimizerFastGradientClipping,
    (True, True, False): DistributedDPOptimizerFastGradientClipping,
    (False, False, False): DPOptimizer,
    (False, True, False): DistributedDPOptimizer,
    (True, False, True): SecureDPOptimizerFastGradientClipping,
    (True, True, True): SecureDistributedDPOptimizerFastGradientClipping,
    (False, False, True): SecureDPOptimizer,
    (False, True, True): SecureDistributedDPOptimizer,
}


def dp_optimizer_class(fused: bool, distributed: bool, secure: bool) -> type:
    """The optimizer for a run: clipped sums left by our engine (``fused``) or per-sample gradients."""
    return OPTIMIZERS[fused, distributed, secure]
