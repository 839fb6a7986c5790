"""The DP-SGD optimizers: Opacus's, with the noise of all parameters drawn at once.

Opacus's optimizers add the Gaussian noise once per logical step (on rank 0 alone under torchrun),
one ``torch.normal`` per parameter tensor. Here one draw of N(0, (sigma * C)^2) per coordinate covers
every parameter (one draw per device and dtype), split into the parameters' shapes and added with one
``foreach`` add: the same distribution, two kernels instead of two per parameter tensor on a GPU.
The source is the run's seeded torch generator, or in secure mode :data:`privacy.noise.OS_RANDOM`,
whose draws no seed or leaked state regenerates. Clipping, scaling and the rank-0 gate stay Opacus's.
A seed gives the same noise run after run, but not the noise of the per-parameter draws that came
before: the generator's stream is cut into the parameters differently.
"""
from __future__ import annotations

import torch
from opacus.optimizers import (DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping, DPOptimizer,
                               DPOptimizerFastGradientClipping)
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privacy.noise import OS_RANDOM, gaussian


class _OneDrawNoise:
    """Opacus's ``add_noise`` with one draw for all parameters.

    Same contract as Opacus's: ``p.grad = p.summed_grad + N(0, (sigma * C)^2)`` once per logical step,
    in the gradient's dtype (zero noise draws nothing, as there). Listed before the Opacus class, so
    that the distributed variants below still reach it through their rank-0-only ``add_noise``.
    """

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        source = OS_RANDOM if self.secure_mode else self.generator
        params = self.params
        summed = []
        for param in params:
            _check_processed_flag(param.summed_grad)
            summed.append(param.summed_grad)
        noisy = list(summed)
        if std:
            groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for index, total in enumerate(summed):
                groups.setdefault((total.device, total.dtype), []).append(index)
            for (device, dtype), indices in groups.items():
                sizes = [summed[index].numel() for index in indices]
                noise = gaussian((sum(sizes),), std, source, device, dtype).split(sizes)
                added = torch._foreach_add([summed[index] for index in indices],
                                           [part.view_as(summed[index]) for part, index in zip(noise, indices)])
                for index, value in zip(indices, added):
                    noisy[index] = value
        for param, value in zip(params, noisy):
            param.grad = value.view_as(param)
            _mark_as_processed(param.summed_grad)


class OneDrawDPOptimizer(_OneDrawNoise, DPOptimizer):
    """Opacus's ``DPOptimizer`` (it clips the per-sample gradients) with one noise draw."""


class OneDrawDPOptimizerFastGradientClipping(_OneDrawNoise, DPOptimizerFastGradientClipping):
    """Opacus's ``DPOptimizerFastGradientClipping`` (it takes clipped sums) with one noise draw."""


class OneDrawDistributedDPOptimizer(DistributedDPOptimizer, OneDrawDPOptimizer):
    """Rank 0 adds the noise (Opacus's ``add_noise`` gate comes first in the MRO); the others add none."""


class OneDrawDistributedDPOptimizerFastGradientClipping(DistributedDPOptimizerFastGradientClipping,
                                                        OneDrawDPOptimizerFastGradientClipping):
    """Rank 0 adds the noise (Opacus's ``add_noise`` gate comes first in the MRO); the others add none."""


# (fused clipper, distributed) -> optimizer class; secure mode is the optimizer's ``secure_mode`` flag
OPTIMIZERS = {
    (True, False): OneDrawDPOptimizerFastGradientClipping,
    (True, True): OneDrawDistributedDPOptimizerFastGradientClipping,
    (False, False): OneDrawDPOptimizer,
    (False, True): OneDrawDistributedDPOptimizer,
}


def dp_optimizer_class(fused: bool, distributed: bool) -> type:
    """The optimizer for a run: clipped sums left by our engine (``fused``) or per-sample gradients."""
    return OPTIMIZERS[fused, distributed]
