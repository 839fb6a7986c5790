"""Poisson subsampling: the sampling that the subsampled-Gaussian accounting assumes.

Every example enters each logical batch independently with probability ``sample_rate``,
so batch sizes vary and a batch may be empty; a fixed-size or shuffled batch would not
match the accountant's analysis.
"""
from __future__ import annotations

import math
import secrets
from typing import Iterator

import torch


def poisson_batch(num_examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch (possibly empty), drawn from ``generator``."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    mask = torch.rand(num_examples, generator=generator) < sample_rate
    return mask.nonzero(as_tuple=True)[0]


def poisson_batches(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` independent Poisson batches."""
    for _ in range(steps):
        yield poisson_batch(num_examples, sample_rate, generator)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Logical steps in one epoch: ceil(N / B), the convention the accountant tests use."""
    return math.ceil(num_examples / batch_size)


def private_seed(seed: int | None) -> int:
    """The seed of a stage that reads private data: the user's, else fresh OS entropy.

    Sampling and noise of the DP mechanisms derive from it, so it is kept out of every
    artifact; a fixed ``--seed`` buys reproducibility at the price of keeping it secret.
    """
    return secrets.randbits(63) if seed is None else seed
