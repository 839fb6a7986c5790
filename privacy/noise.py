"""Where the randomness of the DP mechanisms comes from: a seeded torch generator, or the operating system.

Every draw of Poisson sampling and Gaussian noise takes a *source*:

- a ``torch.Generator`` (or ``None``, torch's global one): the default. Runs are reproducible, but the
  generator is a Mersenne Twister (Philox on CUDA), so whoever learns its seed or state can
  regenerate the noise and subtract it from a release.
- :data:`OS_RANDOM`, secure mode: every draw reads fresh bytes from the operating system
  (:func:`os_random_bytes`, i.e. ``os.urandom``: ``getrandom(2)`` on Linux, the kernel's
  cryptographically secure generator). It has no state and no seed, so there is nothing to save,
  leak or regenerate, and no run can be repeated. ``torch.manual_seed`` does not touch it.

Secure draws cost 8 OS bytes per uniform (53 random bits, a double in [0, 1)) and 8 bytes per Gaussian
coordinate (Box-Muller: two uniforms give two coordinates), computed in float64 and then rounded to
the target dtype. A DP-SGD step of an 11M-parameter ResNet-18 reads about 90 MB from the OS: about
0.3 s per step on a machine whose ``os.urandom`` gives 300 MB/s, where a seeded CUDA generator
takes a millisecond. The float64 Box-Muller values are truncated at about 8.6 standard deviations
(the smallest non-zero uniform is 2^-53), a tail of probability below 1e-17. Floating-point attacks
on Gaussian samplers exploit the gaps between the sampler's float64 outputs; what this project
releases is rounded to float32 (or coarser) after the noise, far above that granularity.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Union

import numpy as np
import torch

_MANTISSA_BITS = 53
_LOW_53_BITS = (1 << _MANTISSA_BITS) - 1


def os_random_bytes(count: int) -> bytes:
    """``count`` bytes from the operating system's CSPRNG: the one place secure randomness enters."""
    return os.urandom(count)


class OSRandom:
    """The operating system's randomness as a sampling/noise source: stateless and not seedable."""

    def __repr__(self) -> str:
        return "OS_RANDOM"

    def uniform(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``count`` independent float64 uniforms on [0, 1), each a fresh 53-bit integer over 2^53."""
        words = _os_words(count).to(device or "cpu")
        return (words & _LOW_53_BITS).to(torch.float64) * 2.0 ** -_MANTISSA_BITS

    def gaussian(self, shape: Sequence[int], std: float, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """N(0, std^2) of ``shape`` by Box-Muller in float64, then rounded to ``dtype`` on ``device``."""
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"std must be finite and non-negative, got {std}")
        device = torch.device(device or "cpu")
        count = math.prod(shape)
        pairs = (count + 1) // 2
        # float64 on the target device where it exists (CPU, CUDA); elsewhere (MPS) on the CPU.
        work = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        uniforms = self.uniform(2 * pairs, work)
        radius = torch.sqrt(-2.0 * torch.log1p(-uniforms[:pairs]))  # log(1 - u): u < 1, so never log(0)
        angle = (2.0 * math.pi) * uniforms[pairs:]
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return (normals * std).reshape(tuple(shape)).to(device=device, dtype=dtype)


OS_RANDOM = OSRandom()

RandomSource = Union[torch.Generator, OSRandom, None]


def is_os_random(source: RandomSource) -> bool:
    """Whether ``source`` is the operating system (secure mode) rather than a torch generator."""
    return isinstance(source, OSRandom)


def uniform(count: int, source: RandomSource) -> torch.Tensor:
    """``count`` uniforms on [0, 1): float64 from the OS, or ``torch.rand`` (float32) from a generator."""
    if is_os_random(source):
        return source.uniform(count)
    return torch.rand(count, generator=source)


def gaussian(shape: Sequence[int], std: float, source: RandomSource, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N(0, std^2) of ``shape`` from ``source`` (``torch.normal`` with a generator), as ``dtype`` on ``device``."""
    if is_os_random(source):
        return source.gaussian(shape, std, device, dtype)
    return torch.normal(0.0, std, size=tuple(shape), generator=source, dtype=dtype, device=device)


def _os_words(count: int) -> torch.Tensor:
    """``count`` int64 words of OS randomness (little-endian, so fixed bytes give the same words everywhere)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    data = os_random_bytes(8 * count)
    if len(data) != 8 * count:
        raise RuntimeError(f"the operating system returned {len(data)} random bytes instead of {8 * count}")
    return torch.from_numpy(np.frombuffer(bytearray(data), dtype="<i8").astype(np.int64, copy=False))
