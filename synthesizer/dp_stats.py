"""Stage 2: differentially private normalization statistics (DESIGN.md section 3.2).

Per private example i, ``v_i`` is the concatenation over every stat layer of [per-channel
spatial mean of the layer input, per-channel spatial mean of its square]. Each step
Poisson-samples the training set at rate q, clips every (optionally pre-scaled) ``v_i`` to L2
norm C, sums, adds N(0, sigma^2 C^2 I) once and divides by the expected batch size qN. The
average of the S noisy estimates, un-scaled, gives per-layer means and second moments, hence
variances. Adding or removing one example moves a step's clipped sum by at most C in L2, so
every step is one subsampled Gaussian mechanism with noise multiplier sigma -- the same
accounting as one DP-SGD step.

The privacy-critical part is small on purpose: :func:`clip_rows` (sensitivity),
:func:`add_gaussian_noise` (the noise) and :func:`privacy.sampling.poisson_batch` (the sampling,
shared with DP-SGD). Everything after the noise is post-processing. Pre-scaling coordinates and
the clipping norm may come from PUBLIC data only (:func:`public_scales`, :func:`public_clip_norm`).

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
coordinate of the statistic vector, each step.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from engine.distributed import Distributed
from errors import DPImgSynError
from privacy.noise import OS_RANDOM, RandomSource, gaussian, is_os_random
from privacy.sampling import poisson_batch
from synthesizer.stat_norm import attach_stat_layers, stat_layers

VAR_FLOOR = 1e-5
MECHANISM_NAME = "dp_statistics"


# --------------------------------------------------------------------------- the mechanism
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


def noisy_clipped_sum(per_sample: Tensor, max_norm: float, noise_multiplier: float,
                      generator: RandomSource, dist: Distributed = Distributed()) -> Tensor:
    """The Gaussian mechanism on one batch: sum of clipped rows (this rank's) + N(0, (sigma * C)^2 I)."""
    return noisy_global_sum(clipped_sum(per_sample, max_norm), max_norm, noise_multiplier, generator, dist)


# --------------------------------------------------------------------------- per-sample statistics
def statistic_dimension(model: nn.Module) -> int:
    """D, the length of the per-sample vector: two coordinates per channel of every stat layer."""
    return 2 * sum(layer.num_channels for layer in stat_layers(model).values())


def per_sample_statistics(model: nn.Module, images: Tensor) -> Tensor:
    """``(B, D)`` float32: every stat layer's capture vector, concatenated in :func:`stat_layers` order.

    The model runs in eval mode without gradients, so each row depends on its own image only
    (no batch statistics anywhere) -- a premise of the per-example sensitivity bound.
    """
    layers = list(stat_layers(model).values())
    if not layers:
        raise DPImgSynError("the model has no stat layers; call attach_stat_layers(model) first")
    previous_modes = [layer.mode for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            layer.set_mode("capture")
        with torch.no_grad():
            model(images)
        missing = [layer for layer in layers if layer.per_sample is None]
        if missing:
            raise DPImgSynError(f"{len(missing)} normalization layer(s) were not used by the forward pass; "
                                "their statistics cannot be captured")
        return torch.cat([layer.per_sample for layer in layers], dim=1)
    finally:
        for layer, mode in zip(layers, previous_modes):
            layer.mode = mode
            layer.per_sample = None
        model.train(was_training)


def clipped_statistics_sum(model: nn.Module, images: Tensor, max_norm: float,
                           scales: Tensor | None = None) -> Tensor:
    """Noise-free clipped sum of the (pre-scaled) per-sample statistics of ``images``: float64 ``(D,)``.

    The only path by which private images enter the DP estimate; its L2 sensitivity is ``max_norm``.
    """
    per_sample = per_sample_statistics(model, images)
    if scales is not None:
        per_sample = per_sample / scales.to(per_sample.device)
    return clipped_sum(per_sample, max_norm)


# --------------------------------------------------------------------------- public calibration
def _image_batches(source: Tensor | Dataset | Iterable, batch_size: int) -> Iterator[Tensor]:
    """Image batches from a tensor of images, a dataset of ``(image, label)`` items or an iterable of batches."""
    if isinstance(source, Tensor):
        yield from (batch for batch in source.split(batch_size) if len(batch))
        return
    if isinstance(source, Dataset) and hasattr(source, "__len__"):
        source = DataLoader(source, batch_size=batch_size, shuffle=False)
    for batch in source:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _public_statistics(model: nn.Module, public: Tensor | Dataset | Iterable, batch_size: int,
                       device: torch.device | str | None) -> Tensor:
    attach_stat_layers(model)
    device = _model_device(model) if device is None else torch.device(device)
    rows = [per_sample_statistics(model, images.to(device)).cpu()
            for images in _image_batches(public, batch_size)]
    if not rows:
        raise DPImgSynError("the public set is empty; pre-scaling and clip-norm calibration need public images")
    return torch.cat(rows).to(torch.float64)


def public_scales(model: nn.Module, public: Tensor | Dataset | Iterable, *, batch_size: int = 256,
                  device: torch.device | str | None = None, floor_fraction: float = 0.1) -> Tensor:
    """Per-coordinate pre-scaling factors from PUBLIC images: the RMS of each coordinate, floored.

    Dividing by them before clipping gives every coordinate a comparable share of the clipping
    norm, so noise lands on each statistic in proportion to its size. The floor (``floor_fraction``
    times the RMS of the coordinate's block -- one layer's means or second moments) keeps a
    coordinate that is near zero on public data from dominating private norms.
    """
    rms = _public_statistics(model, public, batch_size, device).pow(2).mean(dim=0).sqrt()
    scales = torch.empty_like(rms)
    for block in _blocks(model):
        block_rms = rms[block]
        floor = max(floor_fraction * float(block_rms.pow(2).mean().sqrt()), 1e-6)
        scales[block] = block_rms.clamp(min=floor)
    return scales.float()


def public_clip_norm(model: nn.Module, public: Tensor | Dataset | Iterable, scales: Tensor | None = None, *,
                     quantile: float = 0.9, batch_size: int = 256,
                     device: torch.device | str | None = None) -> float:
    """A clipping norm from PUBLIC images: the ``quantile`` of their (pre-scaled) per-sample norms."""
    if not 0.0 < quantile <= 1.0:
        raise DPImgSynError(f"clip-norm quantile must be in (0, 1], got {quantile}")
    rows = _public_statistics(model, public, batch_size, device)
    if scales is not None:
        rows = rows / scales.to(torch.float64)
    return float(torch.quantile(torch.linalg.vector_norm(rows, dim=1), quantile))


# --------------------------------------------------------------------------- the stage
@dataclass
class StatsResult:
    """Per-layer statistics plus the JSON-able description of the mechanism that produced them.

    ``moments`` is the averaged moment vector before un-scaling (the mechanism's direct output).
    """

    stats: dict[str, dict[str, Tensor]]
    mechanism: dict
    moments: Tensor


def compute_dp_statistics(model: nn.Module, train_set: Dataset, *, epochs: float, batch_size: int,
                          max_norm: float, noise_multiplier: float, seed: int | None, device: torch.device | str,
                          scales: Tensor | None = None, non_private: bool = False, progress: bool = True,
                          state: dict | None = None, checkpoint_fn: Callable[[dict], None] | None = None,
                          checkpoint_every: int = 100, max_physical_batch_size: int = 256,
                          num_workers: int = 0, dist: Distributed = Distributed(),
                          secure_mode: bool = False) -> StatsResult:
    """Per-layer DP mean/variance of every normalization layer's input over ``train_set``.

    ``model`` is the frozen teacher (its GroupNorms are wrapped in place if not yet). ``scales``
    (from :func:`public_scales`) pre-scale coordinates before clipping. ``non_private=True``
    computes the exact statistics in one pass (no clipping, no noise: epsilon = inf).
    Resumable: ``checkpoint_fn(state)`` is called every ``checkpoint_every`` steps; passing that
    ``state`` back continues the run so that the result equals an uninterrupted one.
    Under torchrun (``dist``), every rank must pass the same ``seed`` and ``state``; all return the result.
    ``secure_mode=True`` draws sampling and noise from the operating system; it takes ``seed=None``
    (a seed raises :class:`DPImgSynError`) and its resume state holds no generator.
    """
    if secure_mode and seed is not None:
        raise DPImgSynError("secure mode draws sampling and noise from the operating system and takes no seed; "
                            "drop the seed, or drop secure mode for a reproducible run")
    device = torch.device(device)
    attach_stat_layers(model)
    model.to(device)
    num_examples = len(train_set)
    if num_examples == 0:
        raise DPImgSynError("the training set is empty")
    source = _ExampleSource(train_set, max_physical_batch_size, num_workers)
    dimension = statistic_dimension(model)
    if non_private:
        moments = _exact_moments(model, source, num_examples, dimension, device, progress, dist)
        mechanism = {"name": MECHANISM_NAME, "non_private": True, "sample_rate": 1.0, "steps": 1}
        return StatsResult(_split_moments(model, moments), mechanism, moments.float())

    _require_positive("epochs", epochs)
    _require_positive("noise_multiplier", noise_multiplier)
    _require_positive("max_norm", max_norm)
    if not 1 <= batch_size <= num_examples:
        raise DPImgSynError(f"batch size must be between 1 and the training set size {num_examples}, got {batch_size}")
    if scales is not None:
        scales = _checked_scales(scales, dimension)
    sample_rate = batch_size / num_examples
    if checkpoint_every < 1:
        raise DPImgSynError(f"checkpoint interval must be at least one step, got {checkpoint_every}")
    steps = math.ceil(round(epochs * math.ceil(num_examples / batch_size), 9))  # 0.3 * 10 is 3 steps, not 4
    config = {"num_examples": num_examples, "batch_size": batch_size, "steps": steps, "max_norm": float(max_norm),
              "noise_multiplier": float(noise_multiplier), "dimension": dimension, "scales": scales}
    if secure_mode:
        config["secure_mode"] = True  # a seeded run's state (it has a generator) cannot resume a secure one
    state = _initial_state(config, seed) if state is None else _checked_state(state, config)
    generator: RandomSource = OS_RANDOM if secure_mode else torch.Generator().set_state(state["generator"])
    moment_sum = state["moment_sum"].clone()

    with tqdm(total=steps, initial=state["step"], desc="DP statistics", unit="step",
              disable=not (progress and dist.is_main)) as bar:
        for step in range(state["step"], steps):
            indices = _poisson_batch(num_examples, sample_rate, generator, dist)
            total = torch.zeros(dimension, dtype=torch.float64, device=device)
            for images in source.batches(dist.share(indices)):
                total += clipped_statistics_sum(model, images.to(device, non_blocking=True), max_norm, scales)
            noisy = noisy_global_sum(total, max_norm, noise_multiplier, generator, dist).cpu()
            moment_sum += noisy / batch_size  # the expected batch size q * N, whatever was sampled
            bar.update(1)
            bar.set_postfix(batch=len(indices))
            done = step + 1
            if checkpoint_fn is not None and done % checkpoint_every == 0 and done < steps:
                saved = {"step": done, "moment_sum": moment_sum.clone(), "config": dict(config)}
                if not secure_mode:
                    saved["generator"] = generator.get_state()
                checkpoint_fn(saved)

    moments = moment_sum / steps
    unscaled = moments if scales is None else moments * scales.to(torch.float64)
    mechanism = {"name": MECHANISM_NAME, "non_private": False, "noise_multiplier": float(noise_multiplier),
                 "sample_rate": sample_rate, "steps": steps, "max_norm": float(max_norm),
                 "prescaled": scales is not None}
    return StatsResult(_split_moments(model, unscaled), mechanism, moments.float())


def relative_errors(dp_stats: dict[str, dict[str, Tensor]],
                    exact_stats: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Per layer ``{"mean": ||DP - exact|| / ||exact||, "var": ...}`` -- a local diagnostic only.

    It reads the exact (non-private) statistics, so its numbers must never be released.
    """
    errors = {}
    for name, exact in exact_stats.items():
        errors[name] = {}
        for key in ("mean", "var"):
            reference = exact[key].to(torch.float64)
            difference = dp_stats[name][key].to(torch.float64) - reference
            errors[name][key] = float(torch.linalg.vector_norm(difference)
                                      / torch.linalg.vector_norm(reference).clamp(min=1e-12))
    return errors


# --------------------------------------------------------------------------- helpers
class _ExampleSource:
    """Images of chosen training examples in physical batches; in-memory sets are indexed directly."""

    def __init__(self, dataset: Dataset, physical_batch_size: int, num_workers: int) -> None:
        if physical_batch_size < 1:
            raise DPImgSynError(f"physical batch size must be positive, got {physical_batch_size}")
        self.dataset = dataset
        self.physical_batch_size = physical_batch_size
        self.num_workers = num_workers
        tensors = getattr(dataset, "tensors", None)
        self.images = tensors[0] if tensors else None

    def batches(self, indices: Tensor) -> Iterator[Tensor]:
        if len(indices) == 0:
            return
        if self.images is not None:
            for chunk in indices.split(self.physical_batch_size):
                yield self.images[chunk]
            return
        loader = DataLoader(Subset(self.dataset, indices.tolist()), batch_size=self.physical_batch_size,
                            shuffle=False, num_workers=self.num_workers)
        for images, *_ in loader:
            yield images


def _exact_moments(model: nn.Module, source: _ExampleSource, num_examples: int, dimension: int,
                   device: torch.device, progress: bool, dist: Distributed) -> Tensor:
    total = torch.zeros(dimension, dtype=torch.float64, device=device)
    mine = dist.share(torch.arange(num_examples))
    batches = source.batches(mine)
    for images in tqdm(batches, desc="exact statistics", unit="batch", disable=not (progress and dist.is_main),
                       total=math.ceil(len(mine) / source.physical_batch_size)):
        total += per_sample_statistics(model, images.to(device)).to(torch.float64).sum(dim=0)
    return dist.all_reduce_sum(total).cpu() / num_examples


def _blocks(model: nn.Module) -> list[slice]:
    """Slices of the moment vector: per layer, its means then its second moments."""
    blocks, start = [], 0
    for layer in stat_layers(model).values():
        channels = layer.num_channels
        blocks += [slice(start, start + channels), slice(start + channels, start + 2 * channels)]
        start += 2 * channels
    return blocks


def _split_moments(model: nn.Module, moments: Tensor) -> dict[str, dict[str, Tensor]]:
    """Moment vector -> per layer mean and variance (second moment - mean^2, floored)."""
    names = list(stat_layers(model))
    blocks = _blocks(model)
    stats = {}
    for index, name in enumerate(names):
        mean = moments[blocks[2 * index]].to(torch.float64)
        second = moments[blocks[2 * index + 1]].to(torch.float64)
        stats[name] = {"mean": mean.float(), "var": (second - mean * mean).clamp(min=VAR_FLOOR).float()}
    return stats


def _poisson_batch(num_examples: int, sample_rate: float, generator: RandomSource, dist: Distributed) -> Tensor:
    """One step's global Poisson batch, the same on every rank (OS draws: rank 0's, broadcast)."""
    if not (dist.enabled and is_os_random(generator)):
        return poisson_batch(num_examples, sample_rate, generator)
    drawn = poisson_batch(num_examples, sample_rate, generator) if dist.is_main else torch.empty(0, dtype=torch.int64)
    return dist.broadcast_tensor(drawn)


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


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _require_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DPImgSynError(f"{name} must be a positive finite number, got {value!r}")
