"""The teacher's per-layer input moments: their DP estimate (stage 2) and public calibration.

Per private example i, ``v_i`` is the concatenation over every stat layer of [per-channel
spatial mean of the layer input, per-channel spatial mean of its square]; the mechanism that
releases their average is :mod:`privacy.moments`. The average, un-scaled, gives per-layer means
and second moments, hence variances. Pre-scaling coordinates and the clipping norm may come from
PUBLIC data only (:func:`public_scales`, :func:`public_clip_norm`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.batches import in_memory_tensors, random_transform, sequential_batches
from common.distributed import Distributed
from common.errors import DPImgSynError
from privacy.moments import exact_mean, private_mean
from synthesizer.stat_norm import attach_stat_layers, stat_layers
from training.frontend import MAX_FEATURE_BYTES, cache_free_bytes, rows_in_order

VAR_FLOOR = 1e-5
MECHANISM_NAME = "dp_statistics"


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
    return _scales(model, _public_statistics(model, public, batch_size, device), floor_fraction)


def public_clip_norm(model: nn.Module, public: Tensor | Dataset | Iterable, scales: Tensor | None = None, *,
                     quantile: float = 0.9, batch_size: int = 256,
                     device: torch.device | str | None = None) -> float:
    """A clipping norm from PUBLIC images: the ``quantile`` of their (pre-scaled) per-sample norms."""
    _check_quantile(quantile)
    return _clip_norm(_public_statistics(model, public, batch_size, device), scales, quantile)


def public_calibration(model: nn.Module, public: Tensor | Dataset | Iterable, quantile: float | None, *,
                       batch_size: int = 256, device: torch.device | str | None = None,
                       floor_fraction: float = 0.1) -> tuple[Tensor, float | None]:
    """:func:`public_scales` and, for a ``quantile``, :func:`public_clip_norm` of those scales (else None), from
    one pass of the teacher over the PUBLIC images instead of two."""
    if quantile is not None:
        _check_quantile(quantile)
    rows = _public_statistics(model, public, batch_size, device)
    scales = _scales(model, rows, floor_fraction)
    return scales, None if quantile is None else _clip_norm(rows, scales, quantile)


def _scales(model: nn.Module, rows: Tensor, floor_fraction: float) -> Tensor:
    rms = rows.pow(2).mean(dim=0).sqrt()
    scales = torch.empty_like(rms)
    for block in _blocks(model):
        block_rms = rms[block]
        floor = max(floor_fraction * float(block_rms.pow(2).mean().sqrt()), 1e-6)
        scales[block] = block_rms.clamp(min=floor)
    return scales.float()


def _clip_norm(rows: Tensor, scales: Tensor | None, quantile: float) -> float:
    if scales is not None:
        rows = rows / scales.to(torch.float64)
    return float(torch.quantile(torch.linalg.vector_norm(rows, dim=1), quantile))


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise DPImgSynError(f"clip-norm quantile must be in (0, 1], got {quantile}")


# --------------------------------------------------------------------------- the estimate
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
                          non_private: bool = False, dist: Distributed = Distributed(),
                          say: Callable[[str], None] = lambda line: None, **mechanism) -> StatsResult:
    """Per-layer DP mean/variance of every normalization layer's input over ``train_set``.

    ``model`` is the frozen teacher (its GroupNorms are wrapped in place if not yet); ``mechanism``
    holds the options of :func:`privacy.moments.private_mean` (``scales`` from :func:`public_scales`,
    resume state, secure mode, ...). ``non_private=True`` computes the exact statistics in one pass
    (no clipping, no noise: epsilon = inf). ``say`` gets one line on the path taken: the teacher run
    once per record (:func:`precomputed_vectors`) or on every sampled batch.
    """
    device = torch.device(device)
    attach_stat_layers(model)
    model.to(device)
    if len(train_set) == 0:
        raise DPImgSynError("the training set is empty")
    dimension = statistic_dimension(model)

    def per_example(images: Tensor) -> Tensor:
        return per_sample_statistics(model, images)

    if non_private:
        options = {key: mechanism[key] for key in ("progress", "max_physical_batch_size", "num_workers")
                   if key in mechanism}
        moments = exact_mean(per_example, dimension, train_set, device, dist=dist, **options)
        record = {"name": MECHANISM_NAME, "non_private": True, "sample_rate": 1.0, "steps": 1}
        return StatsResult(_split_moments(model, moments), record, moments.float())
    reason = precompute_refusal(train_set, dimension, epochs, dist)
    if reason is None:
        size = _table_bytes(dimension, len(train_set))
        where = "in memory" if size <= MAX_FEATURE_BYTES else "in an owner-only file, removed with the run"
        say(f"DP statistics: the teacher runs once on each of the {len(train_set)} records, whose statistics "
            f"vectors the Poisson steps then read ({size / 2**20:,.1f} MiB, {where})")
        progress = mechanism.get("progress", True) and dist.is_main
        train_set = precomputed_vectors(model, train_set, device, mechanism.get("max_physical_batch_size", 256),
                                        mechanism.get("num_workers", 0), progress)
        per_example = _vectors_as_read
    else:
        say(f"DP statistics: the teacher runs on every sampled batch ({reason})")
    result = private_mean(per_example, dimension, train_set, epochs=epochs, batch_size=batch_size,
                          max_norm=max_norm, noise_multiplier=noise_multiplier, seed=seed, device=device,
                          dist=dist, **mechanism)
    record = {"name": MECHANISM_NAME, "non_private": False, **result.mechanism}
    return StatsResult(_split_moments(model, result.mean), record, result.scaled.float())


def precompute_refusal(train_set: Dataset, dimension: int, epochs: float, dist: Distributed = Distributed(),
                       max_bytes: int = MAX_FEATURE_BYTES) -> str | None:
    """Why the records' statistics vectors are not computed once before the Poisson steps; None when they are.

    ``v_i`` is a fixed function of record i alone (the frozen teacher in eval mode), so the mechanism may read
    it from a table as well as recompute it each time i is sampled: the same vectors, clipped, summed and
    noised the same way, hence the same guarantee. The table costs one pass over the set on every process;
    the steps, ``epochs`` passes in expectation shared by the processes. Beyond ``max_bytes`` the table goes
    to an owner-only file of the cache folder, unlinked at once (as the front end's features).
    """
    if epochs <= dist.world_size:
        return (f"{epochs:g} expected passes over the set on {dist.world_size} process(es): computing each "
                "record's vector once would not save work")
    if in_memory_tensors(train_set) is None:
        transform = random_transform(train_set)
        if transform:
            return f"the dataset applies a random transform ({transform}) when read: one view would be frozen"
    size = _table_bytes(dimension, len(train_set))
    if size > max_bytes and size > cache_free_bytes():
        return (f"the vectors would take {size / 2**30:.1f} GiB: more than {max_bytes / 2**30:.1f} GiB in memory "
                "and more than the cache folder's disk has free")
    return None


def _table_bytes(dimension: int, records: int) -> int:
    """The size of the records' statistics vectors, float32 as :func:`per_sample_statistics` gives them."""
    return 4 * dimension * records


def precomputed_vectors(model: nn.Module, train_set: Dataset, device: torch.device, batch_size: int = 256,
                        num_workers: int = 0, progress: bool = True,
                        max_bytes: int = MAX_FEATURE_BYTES) -> TensorDataset:
    """``(v_i, label_i)`` of every record in order, on the CPU: the teacher run once per record (see
    :func:`precompute_refusal`), kept as the front end's features are (:func:`training.frontend.rows_in_order`).
    A row depends on its own image alone (no batch statistics); only its last bits may depend on the batch's size
    (a convolution's algorithm; not scatter_cnn's rows)."""
    vectors, labels = rows_in_order(lambda images: per_sample_statistics(model, images), train_set, device,
                                    batch_size, max_bytes, num_workers, "statistics vectors" if progress else None)
    return TensorDataset(vectors, labels)


def _vectors_as_read(vectors: Tensor) -> Tensor:
    return vectors


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


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
