"""The DP statistics mechanism (stage 2): a subsampled Gaussian mechanism on per-example vectors.

Per private example i, a function of that example alone gives a vector ``v_i`` (stage 2: the
teacher's per-channel input moments of every normalization layer). Each step Poisson-samples the
training set at rate q, clips every (optionally pre-scaled) ``v_i`` to L2 norm C, sums, adds
N(0, sigma^2 C^2 I) once and divides by the expected batch size qN; the release is the average of
the S noisy estimates. Adding or removing one example moves a step's clipped sum by at most C in
L2, so every step is one subsampled Gaussian mechanism with noise multiplier sigma -- the same
accounting as one DP-SGD step.

The privacy-critical part is small on purpose: :func:`clip_rows` (sensitivity),
:func:`add_gaussian_noise` (the noise) and :func:`privacy.sampling.poisson_batch` (the sampling,
shared with DP-SGD). Everything after the noise is post-processing. Pre-scaling factors and the
clipping norm must come from PUBLIC data only.

Step convention: ``steps = ceil(epochs * ceil(N / batch_size))`` -- for integer epochs this is
``epochs * ceil(N / batch_size)``, the count the accountant tests use -- at sample rate
``batch_size / N``.

Under torchrun every rank holds the same generator (shared seed), so all draw the same Poisson
batch; each clips its share, the partial clipped sums are all-reduced, and only then is the noise
added -- the same draw on every rank, so the release carries one noise sample, never one per rank
and never a noise-free partial sum.

The seed drives both the sampling and the noise: anyone who knows it (and the rest of the data)
can regenerate the noise. Keep it secret for a release, or pass ``seed=None`` to draw it from
the operating system's entropy pool. ``secure_mode=True`` goes further: every Poisson draw and
every noise coordinate comes from the operating system itself (:data:`privacy.noise.OS_RANDOM`, no
seed, no generator state in the resume state), so nothing exists from which the noise could be
regenerated; a run cannot be repeated. Under torchrun rank 0 then draws each batch and each noise
vector and broadcasts them, so the ranks still agree. Cost: 8 OS bytes per example and per
coordinate of the vector, each step.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from common.batches import batches_by_index
from common.distributed import Distributed
from common.errors import DPImgSynError
from privacy.noise import OS_RANDOM, RandomSource, gaussian, is_os_random
from privacy.sampling import global_poisson_batch

PerExample = Callable[[Tensor], Tensor]
"""Images ``(B, ...)`` -> ``(B, D)`` vectors, each row a function of its own image only."""


def clip_rows(per_sample: Tensor, max_norm: float) -> Tensor:
    """Scale each row to L2 norm <= ``max_norm`` (factor ``min(1, C / ||v||)``), in float64.

    This is where the sensitivity bound is enforced. A row with a non-finite entry is zeroed:
    letting inf/NaN through would make the release itself reveal that such an example exists.
    """
    _require_positive("max_norm", max_norm)
    rows = per_sample.to(torch.float64)
    finite = torch.isfinite(rows).all(dim=1, keepdim=True)
    rows = torch.where(finite, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows * (max_norm / (norms + 1e-12)).clamp(max=1.0)


def clipped_sum(per_sample: Tensor, max_norm: float) -> Tensor:
    """Sum of the clipped rows (float64, shape ``(D,)``); an empty batch sums to zeros."""
    return clip_rows(per_sample, max_norm).sum(dim=0)


def add_gaussian_noise(total: Tensor, max_norm: float, noise_multiplier: float, generator: RandomSource) -> Tensor:
    """``total + N(0, (sigma * C)^2 I)`` in float64.

    A torch generator draws on its device (CPU for ``None``); :data:`~privacy.noise.OS_RANDOM` (secure
    mode) draws fresh OS randomness on ``total``'s device.
    """
    _require_positive("max_norm", max_norm)
    _require_positive("noise_multiplier", noise_multiplier)
    if is_os_random(generator):
        device = total.device
    else:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = gaussian(tuple(total.shape), noise_multiplier * max_norm, generator, device, torch.float64)
    return total.to(torch.float64) + noise.to(total.device)


def noisy_global_sum(partial: Tensor, max_norm: float, noise_multiplier: float,
                     generator: RandomSource, dist: Distributed = Distributed()) -> Tensor:
    """Every rank's clipped partial sum added up, then N(0, (sigma * C)^2 I) added once.

    Each rank draws the same noise (``generator`` in the same state everywhere) and adds it to the
    same total, so all ranks hold the one release; adding noise before the all-reduce would add
    ``world_size`` draws, and reducing after it would expose noise-free partial sums. OS draws
    (secure mode) differ by rank, so there rank 0 alone draws and broadcasts the release.
    """
    total = dist.all_reduce_sum(partial)
    if not (dist.enabled and is_os_random(generator)):
        return add_gaussian_noise(total, max_norm, noise_multiplier, generator)
    _require_positive("max_norm", max_norm)  # checked on every rank, so that none waits for a failed rank 0
    _require_positive("noise_multiplier", noise_multiplier)
    released = (add_gaussian_noise(total, max_norm, noise_multiplier, generator) if dist.is_main
                else torch.empty(total.shape, dtype=torch.float64, device=total.device))
    return dist.broadcast_tensor(released)


@dataclass
class MomentsResult:
    """The released average of the per-example vectors (un-scaled), the mechanism's direct output
    (before un-scaling) and the JSON-able description of the mechanism."""

    mean: Tensor
    scaled: Tensor
    mechanism: dict


def private_mean(per_example: PerExample, dimension: int, train_set: Dataset, *, epochs: float,
                 batch_size: int, max_norm: float, noise_multiplier: float, seed: int | None,
                 device: torch.device, scales: Tensor | None = None, progress: bool = True,
                 state: dict | None = None, checkpoint_fn: Callable[[dict], None] | None = None,
                 checkpoint_every: int = 100, max_physical_batch_size: int = 256, num_workers: int = 0,
                 dist: Distributed = Distributed(), secure_mode: bool = False) -> MomentsResult:
    """The DP average over ``train_set`` of ``per_example`` vectors of length ``dimension``.

    ``scales`` (from public data) divide the coordinates before clipping and multiply the result.
    Resumable: ``checkpoint_fn(state)`` is called every ``checkpoint_every`` steps; passing that
    ``state`` back continues the run so that the result equals an uninterrupted one. Under torchrun
    every rank must pass the same ``seed`` and ``state``; all return the result.
    ``secure_mode=True`` draws sampling and noise from the operating system; it takes ``seed=None``
    (a seed raises :class:`DPImgSynError`) and its resume state holds no generator.
    """
    if secure_mode and seed is not None:
        raise DPImgSynError("secure mode draws sampling and noise from the operating system and takes no seed; "
                            "drop the seed, or drop secure mode for a reproducible run")
    num_examples = len(train_set)
    _require_positive("epochs", epochs)
    _require_positive("noise_multiplier", noise_multiplier)
    _require_positive("max_norm", max_norm)
    if not 1 <= batch_size <= num_examples:
        raise DPImgSynError(f"batch size must be between 1 and the training set size {num_examples}, got {batch_size}")
    if scales is not None:
        scales = _checked_scales(scales, dimension)
    if checkpoint_every < 1:
        raise DPImgSynError(f"checkpoint interval must be at least one step, got {checkpoint_every}")
    image_batches(train_set, torch.arange(0), max_physical_batch_size)  # refuses a bad size before any work
    sample_rate = batch_size / num_examples
    steps = math.ceil(round(epochs * math.ceil(num_examples / batch_size), 9))  # 0.3 * 10 is 3 steps, not 4
    config = {"num_examples": num_examples, "batch_size": batch_size, "steps": steps, "max_norm": float(max_norm),
              "noise_multiplier": float(noise_multiplier), "dimension": dimension, "scales": scales}
    if secure_mode:
        config["secure_mode"] = True  # a seeded run's state (it has a generator) cannot resume a secure one
    state = _initial_state(config, seed) if state is None else _checked_state(state, config)
    generator: RandomSource = OS_RANDOM if secure_mode else torch.Generator().set_state(state["generator"])
    # Accumulated where the sums are (float64, so bit for bit as on the host) and read back once at the end:
    # a copy to the host in every step would make each step wait for the device.
    moment_sum = state["moment_sum"].to(device, copy=True)
    divisors = None if scales is None else scales.to(device)

    with tqdm(total=steps, initial=state["step"], desc="DP statistics", unit="step",
              disable=not (progress and dist.is_main)) as bar:
        for step in range(state["step"], steps):
            indices = global_poisson_batch(num_examples, sample_rate, generator, dist)
            total = torch.zeros(dimension, dtype=torch.float64, device=device)
            for images in image_batches(train_set, dist.share(indices), max_physical_batch_size, num_workers):
                vectors = per_example(images.to(device, non_blocking=True))
                if divisors is not None:
                    vectors = vectors / divisors.to(vectors.device)
                total += clipped_sum(vectors, max_norm)  # the only path of private data into the release
            noisy = noisy_global_sum(total, max_norm, noise_multiplier, generator, dist)
            moment_sum += noisy / batch_size  # the expected batch size q * N, whatever was sampled
            bar.update(1)
            bar.set_postfix(batch=len(indices))
            done = step + 1
            if checkpoint_fn is not None and done % checkpoint_every == 0 and done < steps:
                saved = {"step": done, "moment_sum": moment_sum.cpu().clone(), "config": dict(config)}
                if not secure_mode:
                    saved["generator"] = generator.get_state()
                checkpoint_fn(saved)

    moments = moment_sum.cpu() / steps
    mechanism = {"noise_multiplier": float(noise_multiplier), "sample_rate": sample_rate, "steps": steps,
                 "max_norm": float(max_norm), "prescaled": scales is not None}
    return MomentsResult(moments if scales is None else moments * scales.to(torch.float64), moments, mechanism)


def exact_mean(per_example: PerExample, dimension: int, train_set: Dataset, device: torch.device,
               progress: bool = True, max_physical_batch_size: int = 256, num_workers: int = 0,
               dist: Distributed = Distributed()) -> Tensor:
    """The exact float64 average (no clipping, no noise): the non-private ablation, epsilon = inf."""
    total = torch.zeros(dimension, dtype=torch.float64, device=device)
    mine = dist.share(torch.arange(len(train_set)))
    for images in tqdm(image_batches(train_set, mine, max_physical_batch_size, num_workers), unit="batch",
                       desc="exact statistics", disable=not (progress and dist.is_main),
                       total=math.ceil(len(mine) / max_physical_batch_size)):
        total += per_example(images.to(device)).to(torch.float64).sum(dim=0)
    return dist.all_reduce_sum(total).cpu() / len(train_set)


def image_batches(dataset: Dataset, indices: Tensor, physical_batch_size: int, num_workers: int = 0
                  ) -> Iterator[Tensor]:
    """The images of the examples ``indices``, in physical batches (in-memory sets indexed directly)."""
    if physical_batch_size < 1:
        raise DPImgSynError(f"physical batch size must be positive, got {physical_batch_size}")
    chunks = indices.split(physical_batch_size) if len(indices) else ()
    return (images for images, _ in batches_by_index(dataset, chunks, num_workers))


def _initial_state(config: dict, seed: int | None) -> dict:
    """Step 0; a seeded run also records its generator (secure mode has none: each step reads the OS)."""
    state = {"step": 0, "moment_sum": torch.zeros(config["dimension"], dtype=torch.float64), "config": dict(config)}
    if not config.get("secure_mode", False):
        generator = torch.Generator()
        generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        state["generator"] = generator.get_state()
    return state


def _checked_state(state: dict, config: dict) -> dict:
    """A resume state must come from the same configuration, or steps would be miscounted."""
    saved = state.get("config", {})
    same = saved.keys() == config.keys() and all(
        _same_value(saved[key], value) for key, value in config.items())
    if not same or not 0 <= state.get("step", -1) <= config["steps"]:
        raise DPImgSynError("the resume state was written by a run with other settings "
                            "(dataset size, batch size, epochs, clipping, noise, scales or secure mode); "
                            "delete it or rerun with the original settings")
    return state


def _same_value(left: object, right: object) -> bool:
    if isinstance(left, Tensor) or isinstance(right, Tensor):
        return isinstance(left, Tensor) and isinstance(right, Tensor) and torch.equal(left.cpu(), right.cpu())
    return left == right


def _checked_scales(scales: Tensor, dimension: int) -> Tensor:
    scales = torch.as_tensor(scales, dtype=torch.float32).detach().cpu()
    if scales.shape != (dimension,):
        raise DPImgSynError(f"pre-scaling factors have shape {tuple(scales.shape)}, the model's statistics "
                            f"have {dimension} coordinates; compute them with public_scales for this teacher")
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise DPImgSynError("pre-scaling factors must be finite and positive")
    return scales


def _require_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DPImgSynError(f"{name} must be a positive finite number, got {value!r}")
