"""A release made by any method: one ``.npz`` of images ``x`` and hard labels ``y``, fitted to the private view.

Two layouts are read as they are written by other tools: ``x`` float N x C x H x W in [0, 1]
(DPImageBench's ``gen.npz``) and ``x`` uint8 N x H x W x C (``export_release.py --format npz``);
N x H x W is read as one gray channel. The images must already have the private set's size: a
resize would change every figure, so a mismatch is refused, never silently fixed. A ``folder:``
private set has no fixed view: it is seen at the release's size and channel count, and the card says
so when that is not its own view. Such a file carries no privacy ledger, and only ``x`` and ``y`` are
read (the ``soft`` labels of an export are not); the evaluation says so instead of guessing.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.errors import DPImgSynError
from common.files import sha256_file
from registry import DatasetSpec

SUFFIX = ".npz"
IMAGE_KEY, LABEL_KEY = "x", "y"
CHANNEL_COUNTS = (1, 3)
RANGE_TOLERANCE = 1e-4  # float images a rounding error outside [0, 1] are clipped, not refused


def is_foreign(path: str | Path) -> bool:
    """A release given as an ``.npz`` file (this project's releases are folders)."""
    return Path(path).suffix.lower() == SUFFIX


@dataclass
class ForeignRelease:
    """The file's images as N x C x H x W float32 in [0, 1] (C as read), its labels, and how it was read."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    layout: str
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


def _layout(x: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    """``x`` as N x C x H x W and the layout's name; a uint8 array that fits both reads as N x H x W x C."""
    if x.ndim == 3:
        return x[:, None], "N x H x W (gray)"
    if x.ndim == 4:
        channels_first, channels_last = x.shape[1] in CHANNEL_COUNTS, x.shape[-1] in CHANNEL_COUNTS
        if channels_last and (not channels_first or x.dtype == np.uint8):
            return x.transpose(0, 3, 1, 2), "N x H x W x C"
        if channels_first:
            return x, "N x C x H x W"
    raise DPImgSynError(f"{path}: x has shape {x.shape}; expected images N x C x H x W or N x H x W x C with C = 1 "
                        "or 3 (or N x H x W gray)")


def _pixels(x: np.ndarray, path: Path) -> np.ndarray:
    """uint8 0..255 or float 0..1 as float32 in [0, 1]; anything else is refused (no guessing of scales)."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DPImgSynError(f"{path}: x has dtype {x.dtype}; expected uint8 (0-255) or float (0-1) images")
    low, high = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DPImgSynError(f"{path}: x holds NaN or infinite values; expected float images in [0, 1]")
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise DPImgSynError(f"{path}: float x lies in [{low:.4g}, {high:.4g}], expected [0, 1]; rescale it (or "
                            "save 0-255 images as uint8)")
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _labels(y: np.ndarray, count: int, path: Path) -> np.ndarray:
    """``y`` as int64 class indices: one integer (or integral float) per image."""
    if y.shape != (count,):
        raise DPImgSynError(f"{path}: y has shape {y.shape}, expected ({count},): one class index per image")
    integers = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
    if integers or (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        return y.astype(np.int64)
    raise DPImgSynError(f"{path}: y has dtype {y.dtype} with non-integer values; expected class indices")


def read_foreign(path: str | Path) -> ForeignRelease:
    """Read and check the file on its own (the private set is not needed yet, and not read)."""
    path = Path(path)
    if not path.is_file():
        raise DPImgSynError(f"--release {path} is not a file; pass an .npz of images x and labels y, or a release "
                            "folder of this project")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array")
        with archive:
            files = archive.files
            arrays = {key: archive[key] for key in (IMAGE_KEY, LABEL_KEY) if key in files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DPImgSynError(f"{path} cannot be read as an .npz ({reason}); pass an .npz of images x and labels "
                            "y") from None
    missing = [key for key in (IMAGE_KEY, LABEL_KEY) if key not in arrays]
    if missing:
        raise DPImgSynError(f"{path} has no {' or '.join(missing)} (it holds: {', '.join(files) or 'nothing'}); "
                            "pass an .npz with images x and labels y")
    x, y = arrays[IMAGE_KEY], arrays[LABEL_KEY]
    if len(x) == 0:
        raise DPImgSynError(f"{path}: x holds no images")
    read = f"x {x.dtype} {' x '.join(map(str, x.shape))}"
    images, layout = _layout(x, path)
    if images.shape[1] not in CHANNEL_COUNTS or images.shape[2] != images.shape[3]:
        raise DPImgSynError(f"{path}: x read as {layout} gives images of shape {images.shape[1:]}; expected square "
                            "images with 1 or 3 channels")
    return ForeignRelease(path=path, images=_pixels(images, path), labels=_labels(y, len(x), path),
                          layout=f"{read} read as {layout}, y {y.dtype}", sha256=sha256_file(path))


def fit_view(release: ForeignRelease, spec: DatasetSpec, dataset: str) -> Tensor:
    """The images in the private view's shape (gray repeated over its channels); a mismatch is one line.

    ``spec.num_classes`` bounds the labels too, so a release of another task is refused here.
    """
    channels, height, _ = release.image_shape
    if height != spec.image_size:
        raise DPImgSynError(f"{release.path} images are {height} x {height} but {dataset} is seen at "
                            f"{spec.image_size} x {spec.image_size}; resize them, or pass the --dataset they were "
                            "made for")
    if channels != spec.channels and not (channels == 1 and spec.grayscale):
        raise DPImgSynError(f"{release.path} images have {channels} channel(s) but {dataset} is seen with "
                            f"{spec.channels} ({'gray' if spec.grayscale else 'colour'}); pass the --dataset they "
                            "were made for")
    if release.labels.min() < 0 or release.labels.max() >= spec.num_classes:
        raise DPImgSynError(f"{release.path}: y holds labels in [{release.labels.min()}, {release.labels.max()}] "
                            f"but {dataset} has {spec.num_classes} classes (0 to {spec.num_classes - 1})")
    images = torch.from_numpy(release.images)
    return images.expand(-1, spec.channels, -1, -1).contiguous() if channels != spec.channels else images
