"""Public images that are private ones are refused, by content, before anything is released.

A release is DP only if its public images are independent of the private records. Names cannot
check that: a renamed copy of the private folder, or a public folder scraped from the same source
that holds some private images, passes any comparison of names. So every stage that makes or
ships a release (synthesis, evaluation, export) compares the *content* of the public images it
would release with the private images of both splits, both seen through the private view (size,
gray or colour, channels), and stops with the count of matches and one example file.

Two keys per image. Those of the public images are dropped after the check. Those of a private
``folder:`` set are kept for the next stage in one owner-only file (0600, in a 0700 folder) of
:func:`cache_dir` (the data owner's local state, like the data itself), made again whenever a
file of the set changes. Nothing of them ever enters an artifact: a key of a private image is a
membership oracle.

- exact: a 128-bit BLAKE2 digest of the image quantized to 8 bits;
- near: a :data:`THUMBNAIL` x :data:`THUMBNAIL` area-averaged thumbnail in [0, 1]. Two images are
  near duplicates when their thumbnails differ by at most :data:`NEAR_TOLERANCE` on average (what
  resizing, gray conversion or re-encoding of one image leaves). Candidates come from a coarse key,
  the four quadrant means quantized in steps of ``4 x NEAR_TOLERANCE``: a quadrant is a quarter of
  the thumbnail, so the quadrant means of near duplicates differ by less than one step and lie in
  the same or a neighbouring cell. The 81 neighbouring cells are probed by a sorted search, so the
  cost is O((N + M) log N) plus the candidates, not an N x M comparison.

The check runs when either side is a ``folder:`` set (data the user brings). Registry sets are
fixed benchmarks whose independence is checked by family (``registry.aligned``).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

import registry
from common.batches import stack_items
from common.errors import DPImgSynError
from common.files import CACHE_ENV, atomic_path, cache_root  # noqa: F401  (CACHE_ENV: where tests point it)
from sources.files import list_images

THUMBNAIL = 16
NEAR_TOLERANCE = 0.015  # mean absolute thumbnail difference, in pixel units of [0, 1]
CELL = 4 * NEAR_TOLERANCE  # quadrant means of near duplicates differ by at most this
BATCH = 512  # images converted at once
CHECK_BLOCK = 4096  # checked images whose candidate pairs are compared at once: memory stays bounded


@dataclass(frozen=True)
class ContentKeys:
    """The exact digests of N images and their averages at three scales: thumbnails (N x C*T*T), a 4 x 4 grid
    (N x C*16) and the four quadrant means over every channel (N x 4), with the quadrants' cells (N x 4)."""

    digests: list[bytes]
    thumbnails: np.ndarray
    grids: np.ndarray
    quadrants: np.ndarray

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def cells(self) -> np.ndarray:
        return np.floor(self.quadrants / CELL).astype(np.int64)

    @staticmethod
    def joined(parts: list[ContentKeys]) -> ContentKeys:
        return ContentKeys([digest for part in parts for digest in part.digests],
                           *(np.concatenate([getattr(part, name) for part in parts])
                             for name in ("thumbnails", "grids", "quadrants")))


@dataclass(frozen=True)
class Matches:
    """Indices of the checked images that equal a private image, and of those that nearly equal one."""

    exact: np.ndarray
    near: np.ndarray

    def __len__(self) -> int:
        return len(self.exact) + len(self.near)

    def first(self) -> int:
        return int(min(itertools.chain(self.exact, self.near)))


def needs_check(private: str, public: str) -> bool:
    """Whether a (private, public) pair is checked by content: either side is data the user brings."""
    return any(name.startswith(registry.FOLDER_PREFIX) for name in (private, public))


def _pooled(thumbnails: np.ndarray, side: int, over_channels: bool) -> np.ndarray:
    """Averages of ``side`` x ``side`` blocks of (N, C, T, T) thumbnails, per channel or over every channel."""
    count, channels = thumbnails.shape[:2]
    blocks = thumbnails.reshape(count, channels, side, THUMBNAIL // side, side, THUMBNAIL // side)
    return blocks.mean(axis=(1, 3, 5) if over_channels else (3, 5)).reshape(count, -1)


def content_keys(batches: Iterable[torch.Tensor]) -> ContentKeys:
    """Keys of images in pixel space [0, 1], given in batches (N, C, H, W) of the view's content channels."""
    digests, thumbnails = [], []
    for images in batches:
        images = images.float().clamp(0, 1)
        quantized = (images * 255).round().to(torch.uint8).numpy()
        digests += [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in quantized]
        thumbnails.append(F.adaptive_avg_pool2d(images, THUMBNAIL).numpy())
    thumbs = np.concatenate(thumbnails) if thumbnails else np.empty((0, 1, THUMBNAIL, THUMBNAIL), np.float32)
    return ContentKeys(digests, thumbs.reshape(len(thumbs), -1), _pooled(thumbs, 4, False), _pooled(thumbs, 2, True))


def _codes(cells: np.ndarray) -> np.ndarray:
    """One integer per cell (coordinates are >= -1 and < 1 / CELL + 2 after an offset of at most one)."""
    base = int(1 / CELL) + 4
    return ((cells + 1) * base ** np.arange(cells.shape[1])).sum(axis=1)


def _near(checked: ContentKeys, private: ContentKeys, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The ``rows`` whose pair is a near duplicate. Each coarser average bounds the finer one's mean absolute
    difference from below, so the cheap scales discard most pairs before the thumbnails are compared."""
    for scale in ("quadrants", "grids", "thumbnails"):
        mine, theirs = getattr(checked, scale), getattr(private, scale)
        keep = np.abs(mine[rows] - theirs[columns]).mean(axis=1) <= NEAR_TOLERANCE
        rows, columns = rows[keep], columns[keep]
    return rows


def find_matches(checked: ContentKeys, private: ContentKeys) -> Matches:
    """Which of the ``checked`` images equal (exact digest) or nearly equal (thumbnails) a private image."""
    known = set(private.digests)
    exact = np.array([i for i, digest in enumerate(checked.digests) if digest in known], dtype=np.int64)
    near_found = np.zeros(len(checked), dtype=bool)
    private_codes = _codes(private.cells)
    order = np.argsort(private_codes, kind="stable")
    sorted_codes = private_codes[order]
    cells = checked.cells
    for first in range(0, len(checked), CHECK_BLOCK):
        block = np.arange(first, min(first + CHECK_BLOCK, len(checked)))
        for offset in itertools.product((-1, 0, 1), repeat=4):
            probes = _codes(cells[block] + np.array(offset))
            low = np.searchsorted(sorted_codes, probes, "left")
            counts = np.searchsorted(sorted_codes, probes, "right") - low
            if counts.any():
                rows = np.repeat(block, counts)
                columns = order[np.arange(len(rows)) + np.repeat(low - np.cumsum(counts) + counts, counts)]
                near_found[_near(checked, private, rows, columns)] = True
    near_found[exact] = False
    return Matches(exact, np.flatnonzero(near_found))


def dataset_keys(dataset, spec: registry.DatasetSpec, indices: np.ndarray | None = None) -> ContentKeys:
    """Keys of a dataset's items (``indices``, else all) seen through ``spec``'s view, back in pixel space."""
    content = spec.view.content_channels
    mean, std = (torch.tensor(values[:content]).view(1, -1, 1, 1) for values in (spec.mean, spec.std))
    chosen = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    return content_keys(stack_items(dataset, chosen[start:start + BATCH])[:, :content] * std + mean
                        for start in range(0, len(chosen), BATCH))


def cache_dir() -> Path:
    """Where the keys of private folder sets are kept between runs: ``$DPIMGSYN_CACHE``, else
    ``$XDG_CACHE_HOME/dpimgsyn``, else ``~/.cache/dpimgsyn``; then ``overlap/`` (0700, files 0600)."""
    return cache_root() / "overlap"


def folder_signature(name: str) -> str:
    """What a folder set's keys depend on besides the view: its files' names, sizes and modification times
    (a digest; ``""`` for a registry set, whose keys are not kept on disk)."""
    if not name.startswith(registry.FOLDER_PREFIX):
        return ""
    digest = hashlib.sha256()
    for path in list_images(Path(name[len(registry.FOLDER_PREFIX):]).expanduser()):
        status = os.stat(path)
        digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_file(name: str, options: tuple) -> Path:
    folder = Path(name[len(registry.FOLDER_PREFIX):]).expanduser().resolve()
    return cache_dir() / f"{hashlib.sha256(repr((str(folder), options)).encode()).hexdigest()[:32]}.npz"


def _read_cache(path: Path, signature: str) -> ContentKeys | None:
    """The kept keys, if they were made from exactly these files (else ``None``: they are made again)."""
    try:
        with np.load(path, allow_pickle=False) as kept:
            if str(kept["signature"]) != signature:
                return None
            return ContentKeys([bytes(row) for row in kept["digests"]], kept["thumbnails"], kept["grids"],
                               kept["quadrants"])
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path, signature: str, keys: ContentKeys) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    digests = np.frombuffer(b"".join(keys.digests), dtype=np.uint8).reshape(len(keys), -1)
    with atomic_path(path, private=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, signature=np.array(signature), digests=digests, thumbnails=keys.thumbnails,
                 grids=keys.grids, quadrants=keys.quadrants)


@functools.lru_cache(maxsize=2)
def _private_keys(name: str, data_root: str | None, options: tuple, signature: str) -> ContentKeys:
    cache = _cache_file(name, options) if signature else None
    kept = _read_cache(cache, signature) if cache is not None and cache.is_file() else None
    if kept is not None:
        return kept
    spec = registry.dataset_info(name, **dict(options))
    splits = [registry.get_split(name, split, data_root, **dict(options)) for split in spec.splits]
    print(f"reading the {sum(map(len, splits))} private images of {registry.artifact_name(name)} once, to compare "
          "public images with them by content", flush=True)
    keys = ContentKeys.joined([dataset_keys(split, spec) for split in splits])
    if cache is not None:
        _write_cache(cache, signature, keys)
    return keys


def private_keys(name: str, data_root: str | os.PathLike | None, options: dict) -> ContentKeys:
    """Keys of every private image (both splits) of ``name`` in its view. Kept in memory for this process, and
    for a ``folder:`` set in an owner-only file of :func:`cache_dir`, while its files are unchanged: the stages
    of a run read the private set once."""
    root = None if data_root is None else str(data_root)
    return _private_keys(name, root, tuple(sorted(options.items())), folder_signature(name))


def refuse_private_images(checked: ContentKeys, describe: Callable[[int], str], private: str,
                          data_root: str | os.PathLike | None, options: dict, what: str) -> None:
    """Raise a user error when any ``checked`` image (``describe(i)`` names image i) is a private image."""
    matches = find_matches(checked, private_keys(private, data_root, options))
    if not matches:
        return
    raise DPImgSynError(
        f"{what}: {len(matches)} of {len(checked)} images are private images of {registry.artifact_name(private)} "
        f"({len(matches.exact)} equal, {len(matches.near)} nearly equal once seen through its view), e.g. "
        f"{describe(matches.first())}; public images must share nothing with the private data: remove them from "
        "the public set or choose another; no artifact was written")


def check_public_items(public_name: str, public, indices: np.ndarray, private: str,
                       data_root: str | os.PathLike | None, options: dict, what: str) -> None:
    """Refuse when any item ``indices`` of ``public`` (the set ``public_name`` aligned to ``private``, seen through
    ``options``) is a private image; pairs of registry sets pass unread (:func:`needs_check`)."""
    if not needs_check(private, public_name):
        return
    paths = getattr(getattr(public, "source", None), "paths", None)

    def describe(position: int) -> str:
        item = int(indices[position])
        return f"public file {paths[item]}" if paths is not None else f"public image {item} of {public_name}"

    keys = dataset_keys(public, registry.dataset_info(private, **options), indices)
    refuse_private_images(keys, describe, private, data_root, options, what)


def check_release_images(images: np.ndarray, public_name: str, private: str, data_root: str | os.PathLike | None,
                         options: dict, what: str) -> None:
    """Refuse a release whose images (N x C x H x W in [0, 1], an array or memory map) hold private images."""
    if not needs_check(private, public_name):
        return
    content = registry.dataset_info(private, **options).view.content_channels
    batches = (torch.from_numpy(np.array(images[start:start + BATCH, :content]))
               for start in range(0, len(images), BATCH))
    refuse_private_images(content_keys(batches), lambda position: f"release image {position}", private, data_root,
                          options, what)
