"""Poisson subsampling: the sampling that the subsampled-Gaussian accounting assumes.

Every example enters each logical batch independently with probability ``sample_rate``,
so batch sizes vary and a batch may be empty; a fixed-size or shuffled batch would not
match the accountant's analysis.

The membership draws come from a seeded ``torch.Generator`` (reproducible), or in secure mode from
:data:`privacy.noise.OS_RANDOM` (fresh OS randomness, one 53-bit uniform -- 8 bytes -- per example
and step; see :mod:`privacy.noise`).
"""
from __future__ import annotations

import math
import secrets

import torch

from common.distributed import Distributed
from common.errors import DPImgSynError
from privacy.noise import RandomSource, is_os_random, uniform

# Shape-stable steps (opt-in): a Poisson batch's chunks are padded to a few fixed sizes in multiples of 8, so
# that a GPU step sees the same few shapes (and can be captured or compiled once per shape) instead of a new
# size every step: the expected batch times BUCKET_FACTORS, and for the rest of a batch split into physical
# chunks, the chunk times CHUNK_FRACTIONS (else a few rows over a chunk would cost a second full chunk).
BUCKET_FACTORS = (1.0, 1.125, 1.25, 1.5, 2.0)
CHUNK_FRACTIONS = (0.125, 0.25, 0.5)
PAD_MULTIPLE = 8


def poisson_batch(num_examples: int, sample_rate: float, generator: RandomSource) -> torch.Tensor:
    """Indices of one Poisson-sampled batch (possibly empty), drawn from ``generator`` (or the OS source)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    mask = uniform(num_examples, generator) < sample_rate
    return mask.nonzero(as_tuple=True)[0]


def global_poisson_batch(num_examples: int, sample_rate: float, source: RandomSource,
                         dist: Distributed = Distributed()) -> torch.Tensor:
    """One step's Poisson batch, the same on every rank of a torchrun.

    Seeded generators agree across ranks by construction; OS draws (secure mode) do not, so there
    rank 0 draws and broadcasts.
    """
    if not (dist.enabled and is_os_random(source)):
        return poisson_batch(num_examples, sample_rate, source)
    drawn = poisson_batch(num_examples, sample_rate, source) if dist.is_main else torch.empty(0, dtype=torch.int64)
    return dist.broadcast_tensor(drawn)


def bucket_sizes(expected_batch: float, largest: int) -> tuple[int, ...]:
    """The few padded chunk sizes of shape-stable steps: the expected batch times :data:`BUCKET_FACTORS` and
    ``largest`` (the physical chunk) times :data:`CHUNK_FRACTIONS`, rounded up to a multiple of
    :data:`PAD_MULTIPLE`, at most ``largest``."""
    if largest < 1:
        raise ValueError(f"largest must be at least 1, got {largest}")
    sizes = [expected_batch * factor for factor in BUCKET_FACTORS] + [largest * part for part in CHUNK_FRACTIONS]
    return tuple(sorted({min(largest, PAD_MULTIPLE * math.ceil(size / PAD_MULTIPLE)) for size in sizes}))


def physical_chunks(rows: int, chunk: int, buckets: tuple[int, ...] | None = None) -> list[tuple[int, int, int]]:
    """``(start, stop, size)`` of each physical chunk of a batch of ``rows``: size is ``stop - start``, or with
    ``buckets`` the smallest bucket that holds the chunk (chunks are then at most the largest bucket).

    Padding happens after the sampling and never changes which records a step sees; the rows beyond
    ``stop - start`` are for the trainer to fill with zero-weight rows.
    """
    if buckets:
        chunk = min(chunk, buckets[-1])
    plan = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        size = next(bucket for bucket in buckets if bucket >= stop - start) if buckets else stop - start
        plan.append((start, stop, size))
    return plan


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Logical steps in one epoch: ceil(N / B), the convention the accountant tests use."""
    return math.ceil(num_examples / batch_size)


def private_seed(seed: int | None, secure_mode: bool = False) -> int | None:
    """The seed of a stage that reads private data: the user's, else fresh OS entropy.

    Sampling and noise of the DP mechanisms derive from it, so it is kept out of every
    artifact; a fixed ``--seed`` buys reproducibility at the price of keeping it secret.
    Secure mode needs no seed at all (``None``): it draws from :data:`privacy.noise.OS_RANDOM`,
    and a seed given with it is refused rather than silently ignored.
    """
    if secure_mode:
        if seed is not None:
            raise DPImgSynError("--secure_mode draws sampling and noise from the operating system and takes no "
                                "--seed; drop --seed (or drop --secure_mode for a reproducible run)")
        return None
    return secrets.randbits(63) if seed is None else seed
