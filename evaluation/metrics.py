"""Obfuscation and fidelity metrics for a release, measured against the private data.

Everything here reads private data, so its results are *internal* diagnostics for the data
owner and never part of a release. Functions accept torch tensors or NumPy arrays (including
memory-mapped release images) and work in chunks, so that comparing two 60,000-image sets never
builds a 60,000 x 60,000 matrix.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common.errors import DPImgSynError
from common.runtime import in_mode

ArrayLike = Tensor | np.ndarray

SSIM_K1 = 0.01
SSIM_K2 = 0.03

# The matmul form of L2 distances loses precision for near-duplicates (large norms cancel), so the
# top-k search keeps a few spare candidates and re-ranks them with exact differences.
_RERANK_MARGIN = 4

SUMMARY_KEYS = ("min", "p05", "p25", "median", "mean", "p75", "max", "n")


def _take(data: ArrayLike, indices: Tensor) -> ArrayLike:
    """Rows ``indices`` (a CPU tensor) of a tensor, on its device, or of an array or memory map."""
    return data[indices.to(data.device)] if isinstance(data, Tensor) else data[indices.numpy()]


def _chunk(data: ArrayLike, start: int, stop: int, device: torch.device) -> Tensor:
    """Rows ``start:stop`` as a float tensor on ``device``; memory-mapped arrays are read lazily."""
    rows = data[start:stop]
    tensor = rows if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows))
    tensor = tensor.to(device=device)
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor


def _resolve(data: ArrayLike, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return data.device if isinstance(data, Tensor) else torch.device("cpu")


def _check_rows(name: str, data: ArrayLike, minimum: int = 1) -> None:
    if len(data) < minimum:
        raise DPImgSynError(f"{name} has {len(data)} rows but at least {minimum} are needed")


def _flat_dim(data: ArrayLike) -> int:
    return int(np.prod(tuple(data.shape[1:]), dtype=np.int64))


def _sq_dist_blocks(queries: ArrayLike, references: ArrayLike, chunk: int, device: torch.device
                   ) -> Iterator[tuple[int, Tensor, Iterator[tuple[int, Tensor]]]]:
    """Yield, per query chunk, its start and rows, and an iterator of squared-distance blocks.

    Each block is ``(ref_start, d2)`` with ``d2[i, j] = ||q_i - r_j||^2`` for one reference chunk,
    computed as ``|q|^2 + |r|^2 - 2 q.r`` so that the work is one matrix product per block.
    """
    def blocks(q: Tensor, q_sq: Tensor) -> Iterator[tuple[int, Tensor]]:
        for ref_start in range(0, len(references), chunk):
            r = _chunk(references, ref_start, ref_start + chunk, device).flatten(1).to(q.dtype)
            d2 = q_sq[:, None] + (r * r).sum(1)[None, :] - 2.0 * (q @ r.T)
            yield ref_start, d2.clamp_min_(0.0)

    for q_start in range(0, len(queries), chunk):
        q = _chunk(queries, q_start, q_start + chunk, device).flatten(1)
        yield q_start, q, blocks(q, (q * q).sum(1))


def nearest_neighbours(queries: ArrayLike, references: ArrayLike, k: int = 1, chunk: int = 1024,
                       device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """L2 distances (flattened pixels) and indices of the ``k`` nearest references per query.

    Returns ``(distances, indices)``, both ``(len(queries), k)`` on the CPU, sorted by distance.
    The search is chunked over queries and references; the final candidates are re-ranked with
    exact differences, so near-duplicates (the case the obfuscation check is about) are precise.
    """
    if k < 1 or chunk < 1:
        raise DPImgSynError(f"k and chunk must be positive (got k={k}, chunk={chunk})")
    _check_rows("queries", queries)
    _check_rows("references", references, minimum=k)
    if _flat_dim(queries) != _flat_dim(references):
        raise DPImgSynError(
            f"queries {tuple(queries.shape[1:])} and references {tuple(references.shape[1:])} "
            "have different sizes; compare images of the same shape"
        )
    device = _resolve(queries, device)
    pool = min(len(references), k + _RERANK_MARGIN)
    all_dists, all_indices = [], []
    for _, q, blocks in _sq_dist_blocks(queries, references, chunk, device):
        best_d2 = torch.full((len(q), 0), math.inf, device=device, dtype=q.dtype)
        best_idx = torch.empty((len(q), 0), device=device, dtype=torch.long)
        for ref_start, d2 in blocks:
            idx = torch.arange(ref_start, ref_start + d2.shape[1], device=device).expand_as(d2)
            merged_d2 = torch.cat([best_d2, d2], 1)
            merged_idx = torch.cat([best_idx, idx], 1)
            keep = merged_d2.topk(min(pool, merged_d2.shape[1]), dim=1, largest=False).indices
            best_d2, best_idx = merged_d2.gather(1, keep), merged_idx.gather(1, keep)
        gathered = _take(references, best_idx.reshape(-1).cpu())
        r = _chunk(gathered, 0, len(gathered), device).flatten(1).to(q.dtype).view(*best_idx.shape, -1)
        exact = (q[:, None, :] - r).norm(dim=2)  # from differences, not from the matmul identity
        order = exact.argsort(dim=1, stable=True)[:, :k]
        all_dists.append(exact.gather(1, order).cpu())
        all_indices.append(best_idx.gather(1, order).cpu())
    return torch.cat(all_dists), torch.cat(all_indices)


def _gaussian_filter_matrix(size: int, window_size: int, sigma: float, dtype: torch.dtype, device: torch.device
                           ) -> Tensor:
    """Banded ``(size - window_size + 1, size)`` matrix whose rows are the shifted, normalized window.

    ``M_h @ image @ M_w.T`` is the separable Gaussian filter over the positions where the window
    fits: two matrix products, much faster than a grouped convolution on small images.
    """
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    positions = size - window_size + 1
    columns = torch.arange(positions)[:, None] + torch.arange(window_size)[None, :]
    matrix = torch.zeros(positions, size, dtype=torch.float64).scatter_(1, columns, weights.expand(positions, -1))
    return matrix.to(dtype=dtype, device=device)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity of Wang et al. (2004), one value per image pair: ``(B,C,H,W) -> (B,)``.

    Gaussian-weighted local statistics (population covariance), K1 = 0.01, K2 = 0.03, computed per
    channel over the positions where the whole window fits, then averaged over channels and
    positions. This is the usual definition (it equals scikit-image's ``structural_similarity``
    with ``gaussian_weights=True`` once its padded border is cropped, which it does).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise DPImgSynError(
            f"ssim needs two (B,C,H,W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < window_size:
        raise DPImgSynError(
            f"images of size {tuple(x.shape[-2:])} are smaller than the {window_size}-pixel SSIM window"
        )
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    filter_h = _gaussian_filter_matrix(x.shape[-2], window_size, sigma, dtype, x.device)
    filter_w = _gaussian_filter_matrix(x.shape[-1], window_size, sigma, dtype, x.device)

    def local_mean(img: Tensor) -> Tensor:
        return filter_h @ img @ filter_w.T

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def distribution_summary(values: ArrayLike | Sequence[float]) -> dict:
    """Quantiles, mean and count of a 1-D sample, as plain floats for reports and JSON."""
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = array.astype(np.float64).reshape(-1)
    if array.size == 0:
        raise DPImgSynError("cannot summarize an empty set of values")
    p05, p25, median, p75 = np.percentile(array, [5, 25, 50, 75])
    values = (array.min(), p05, p25, median, array.mean(), p75, array.max())
    return {**{key: float(value) for key, value in zip(SUMMARY_KEYS, values)}, "n": int(array.size)}


def nn_report(synthetic: ArrayLike, private_train: ArrayLike, k_ssim: int = 5, chunk: int = 1024,
              device: str | torch.device | None = None) -> dict:
    """Nearest private training image of every synthetic image, by L2 and by SSIM.

    Both sets are images in pixel space [0, 1] with the same (C, H, W). SSIM is evaluated only on
    each image's ``k_ssim`` nearest L2 candidates (all pairs would be quadratic in SSIM cost).
    Returns per-image arrays (``l2``, ``l2_index``, ``ssim``, ``ssim_index``) and their summaries.
    """
    if tuple(synthetic.shape[1:]) != tuple(private_train.shape[1:]):
        raise DPImgSynError(
            f"synthetic images {tuple(synthetic.shape[1:])} and private images "
            f"{tuple(private_train.shape[1:])} differ in shape; bring both to the teacher's input shape"
        )
    if k_ssim < 1:
        raise DPImgSynError(f"k_ssim must be positive, got {k_ssim}")
    k_ssim = min(k_ssim, len(private_train))
    compute_device = _resolve(synthetic, device)
    distances, indices = nearest_neighbours(synthetic, private_train, k=k_ssim, chunk=chunk, device=compute_device)
    best_ssim, best_ssim_index = [], []
    ssim_chunk = max(1, chunk // k_ssim)
    for start in range(0, len(synthetic), ssim_chunk):
        queries = _chunk(synthetic, start, start + ssim_chunk, compute_device)
        candidate_idx = indices[start : start + len(queries)]
        candidates = _take(private_train, candidate_idx.reshape(-1))
        candidates = _chunk(candidates, 0, len(candidates), compute_device)
        repeated = queries.repeat_interleave(k_ssim, dim=0)
        scores = ssim(repeated, candidates).view(len(queries), k_ssim).cpu()
        best, position = scores.max(dim=1)
        best_ssim.append(best)
        best_ssim_index.append(candidate_idx.gather(1, position[:, None]).squeeze(1))
    l2 = distances[:, 0].numpy()
    ssim_values = torch.cat(best_ssim).numpy()
    return {
        "l2": l2,
        "l2_index": indices[:, 0].numpy(),
        "ssim": ssim_values,
        "ssim_index": torch.cat(best_ssim_index).numpy(),
        "k_ssim": k_ssim,
        "summary": {"l2": distribution_summary(l2), "ssim": distribution_summary(ssim_values)},
    }


def obfuscation_verdict(synthetic_nn: dict, private_test_nn: dict, max_close_fraction: float = 0.05) -> dict:
    """Decide whether synthetic images stay farther from the private training set than fresh private data does.

    The reference is the private test set's nearest-training-image distances: that is what
    "looks like the private data" means. The release is *not* obfuscated when its median distance
    is at or below the reference median, or when more than ``max_close_fraction`` of the synthetic
    images are closer than the reference's 5th percentile (genuinely fresh private images land
    there 5% of the time; copies of training images land there almost always).
    """
    synthetic = np.asarray(_l2_of(synthetic_nn, "synthetic_nn"), dtype=np.float64)
    reference = np.asarray(_l2_of(private_test_nn, "private_test_nn"), dtype=np.float64)
    if synthetic.size == 0 or reference.size == 0:
        raise DPImgSynError("obfuscation verdict needs at least one synthetic and one reference distance")
    synthetic_median = float(np.median(synthetic))
    reference_median = float(np.median(reference))
    reference_p05 = float(np.percentile(reference, 5))
    close_fraction = float(np.mean(synthetic <= reference_p05))
    reasons = []
    if synthetic_median <= reference_median:
        reasons.append(
            f"median nearest-private distance {synthetic_median:.4g} is at or below the private-test "
            f"reference median {reference_median:.4g}"
        )
    if close_fraction > max_close_fraction:
        reasons.append(
            f"{close_fraction:.1%} of synthetic images are closer than the private-test 5th percentile "
            f"{reference_p05:.4g} (allowed: {max_close_fraction:.1%})"
        )
    obfuscated = not reasons
    if obfuscated:
        reasons.append(
            f"median nearest-private distance {synthetic_median:.4g} exceeds the private-test reference "
            f"median {reference_median:.4g}, and {close_fraction:.1%} of synthetic images are closer "
            f"than its 5th percentile {reference_p05:.4g}"
        )
    return {
        "obfuscated": obfuscated,
        "reason": "; ".join(reasons),
        "synthetic_median_l2": synthetic_median,
        "reference_median_l2": reference_median,
        "reference_p05_l2": reference_p05,
        "median_ratio": synthetic_median / reference_median if reference_median > 0 else math.inf,
        "close_fraction": close_fraction,
        "max_close_fraction": max_close_fraction,
    }


def _l2_of(report: dict, name: str) -> np.ndarray:
    if "l2" not in report:
        raise DPImgSynError(f"{name} must be an nn_report result (a dict with per-image 'l2' distances)")
    values = report["l2"]
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


def gallery_rows(synthetic: ArrayLike, private_train: ArrayLike, report: dict, n: int = 16, by: str = "l2") -> dict:
    """The ``n`` synthetic images closest to the private set, each beside its nearest private image.

    ``by`` is ``"l2"`` (smallest distance first) or ``"ssim"`` (highest similarity first). Returns
    ``pairs`` (2n, C, H, W: synthetic, neighbour, synthetic, ...) ready for a two-column grid, the
    two halves separately, and the indices and scores of every row. Internal diagnostics only.
    """
    orderings = {"l2": ("l2", "l2_index", 1.0), "ssim": ("ssim", "ssim_index", -1.0)}
    if by not in orderings:
        raise DPImgSynError(f"unknown gallery order {by!r}; use one of {sorted(orderings)}")
    score_key, index_key, sign = orderings[by]
    scores = np.asarray(report[score_key], dtype=np.float64)
    order = np.argsort(sign * scores, kind="stable")[: max(0, n)]
    neighbour_index = np.asarray(report[index_key])[order]
    synthetic_rows = _to_numpy(synthetic, order)
    neighbour_rows = _to_numpy(private_train, neighbour_index)
    pairs = np.stack([synthetic_rows, neighbour_rows], axis=1).reshape(-1, *synthetic_rows.shape[1:])
    return {
        "pairs": pairs,
        "synthetic": synthetic_rows,
        "neighbours": neighbour_rows,
        "synthetic_index": order,
        "neighbour_index": neighbour_index,
        "l2": np.asarray(report["l2"])[order],
        "ssim": np.asarray(report["ssim"])[order],
    }


def _to_numpy(data: ArrayLike, rows: np.ndarray) -> np.ndarray:
    if isinstance(data, Tensor):
        return data[torch.as_tensor(rows, dtype=torch.long, device=data.device)].detach().cpu().float().numpy()
    return np.asarray(data[rows], dtype=np.float32)


def _mean_cov(features: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(features, Tensor):
        array = features.detach().cpu().double().numpy()
    else:
        array = np.asarray(features, np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise DPImgSynError(f"{name} must be a (n, d) feature matrix with n >= 2, got shape {array.shape}")
    return array.mean(0), np.atleast_2d(np.cov(array, rowvar=False))


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})``. The trace of the matrix square
    root is taken from the eigenvalues of the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}`` (same
    spectrum as ``S_a S_b``), which stays real and finite for singular covariances — the usual case
    when there are fewer images than feature dimensions — where ``sqrtm(S_a S_b)`` goes complex.
    """
    mu_a, cov_a = _mean_cov(feats_a, "feats_a")
    mu_b, cov_b = _mean_cov(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise DPImgSynError(f"feature sets have different widths ({mu_a.size} vs {mu_b.size})")
    eigvals_a, eigvecs_a = scipy.linalg.eigh(cov_a)
    sqrt_a = (eigvecs_a * np.sqrt(np.clip(eigvals_a, 0.0, None))) @ eigvecs_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    cross_eigvals = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(cross_eigvals, 0.0, None)).sum())
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def _within_any_ball(points: ArrayLike, centers: ArrayLike, radii: Tensor, chunk: int, device: torch.device) -> Tensor:
    """For every point: does it lie inside at least one ball ``(centers[j], radii[j])``?"""
    radii_sq = radii.to(device=device, dtype=torch.float64) ** 2
    inside = []
    for _, q, blocks in _sq_dist_blocks(points, centers, chunk, device):
        hit = torch.zeros(len(q), dtype=torch.bool, device=device)
        for ref_start, d2 in blocks:
            hit |= (d2.double() <= radii_sq[ref_start : ref_start + d2.shape[1]][None, :]).any(1)
        inside.append(hit.cpu())
    return torch.cat(inside)


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3, chunk: int = 1024,
                     device: str | torch.device | None = None) -> dict:
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision: share of fake points inside the real
    manifold (are the fakes realistic?). Recall: share of real points inside the fake manifold
    (do the fakes cover the real data?).
    """
    _check_rows("real_feats", real_feats, minimum=k + 1)
    _check_rows("fake_feats", fake_feats, minimum=k + 1)
    if k < 1:
        raise DPImgSynError(f"k must be positive, got {k}")
    compute_device = _resolve(real_feats, device)
    real_radii = nearest_neighbours(real_feats, real_feats, k=k + 1, chunk=chunk, device=compute_device)[0][:, k]
    fake_radii = nearest_neighbours(fake_feats, fake_feats, k=k + 1, chunk=chunk, device=compute_device)[0][:, k]
    precision = _within_any_ball(fake_feats, real_feats, real_radii, chunk, compute_device).double().mean()
    recall = _within_any_ball(real_feats, fake_feats, fake_radii, chunk, compute_device).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}


def _batches(images: ArrayLike | Dataset, batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Dataset):
        for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
            yield batch[0] if isinstance(batch, (list, tuple)) else batch
        return
    for start in range(0, len(images), batch_size):
        rows = images[start : start + batch_size]
        yield rows if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows))


def penultimate_features(model: nn.Module, images: ArrayLike | Dataset, batch_size: int = 256,
                         device: str | torch.device = "cpu", preprocess: Callable[[Tensor], Tensor] | None = None
                        ) -> Tensor:
    """Inputs of the model's final ``nn.Linear`` for every image, as a CPU float tensor ``(N, d)``.

    ``images`` is a tensor/array (N, C, H, W) or a dataset yielding ``(image, label)``; it must be
    in the model's input space, or ``preprocess`` (applied per batch on ``device``) brings it there,
    e.g. normalization of pixel-space release images. The model runs in eval mode without gradients
    and its training flag is restored afterwards.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise DPImgSynError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
    device = torch.device(device)
    captured: list[Tensor] = []
    hook = linears[-1].register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].detach().flatten(1).float().cpu())
    )
    try:
        with in_mode(model, training=False), torch.no_grad():
            for batch in _batches(images, batch_size):
                batch = batch.to(device=device, dtype=torch.float32)
                model(preprocess(batch) if preprocess is not None else batch)
    finally:
        hook.remove()
    if not captured:
        raise DPImgSynError("no images given to extract features from")
    return torch.cat(captured)
