"""Image files on disk as raw sources: explicit file lists, recursive trees, class-folder trees."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from common.errors import DPImgSynError
from sources.convert import RawSource

# What PIL raises for a truncated, corrupt or unknown image file (when opening it or decoding its pixels).
UNREADABLE = (OSError, SyntaxError, ValueError)
# Gray integer modes whose values go up to 65535: PIL's RGB conversion would clip them at 255.
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
WIDE_GRAY_MAX = 65535


def unreadable(path: str, exc: Exception) -> DPImgSynError:
    """The one-line error for an image file PIL cannot read, naming the file."""
    return DPImgSynError(f"cannot read the image {path}: {exc}; replace or remove the file")


def rgb_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) floats in [0, 1]: 16-bit gray scaled by 65535 (values beyond it clipped) and repeated, so that
    it is not saturated by PIL's 8-bit conversion; every other mode through PIL's RGB conversion, / 255."""
    if image.mode in WIDE_GRAY_MODES:
        values = np.clip(np.asarray(image, dtype=np.float32), 0, WIDE_GRAY_MAX) / WIDE_GRAY_MAX
        return torch.from_numpy(values).unsqueeze(0).repeat(3, 1, 1)
    return pil_to_tensor(image.convert("RGB")).float().div_(255)


class ImageFiles(RawSource):
    """Images read one by one with PIL (always RGB; gray conversion is the view's business)."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths, self.labels = list(paths), [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                if min_side is not None:
                    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; it keeps both sides >= min_side.
                    image.draft("RGB", (min_side, min_side))
                pixels = rgb_pixels(image)
        except UNREADABLE as exc:
            raise unreadable(path, exc) from None
        return pixels, self.labels[index]


def image_formats(paths: list[str]) -> list[tuple[int, int, str]]:
    """(width, height, PIL mode) of each file, read from its header: no pixel is decoded."""
    formats = []
    for path in paths:
        try:
            with Image.open(path) as image:
                formats.append((*image.size, image.mode))
        except UNREADABLE as exc:
            raise unreadable(path, exc) from None
    return formats


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: Path) -> list[str]:
    """Every image below ``folder`` (any depth), in a fixed sorted order so indices are stable."""
    found = [
        os.path.join(directory, name)
        for directory, _, names in os.walk(folder, followlinks=True)
        for name in names if _is_image(name)
    ]
    return sorted(found)


def unlabeled_tree(folder: Path) -> ImageFiles:
    """All images below ``folder`` with label -1 (public sets: their labels are never used)."""
    paths = list_images(folder)
    if not paths:
        raise DPImgSynError(f"no images ({', '.join(IMG_EXTENSIONS)}) found below {folder}")
    return ImageFiles(paths, [-1] * len(paths))


def _holds_image(folder: str) -> bool:
    """Whether any image lies below ``folder``; stops at the first one found."""
    return any(_is_image(name) for _, _, names in os.walk(folder, followlinks=True) for name in names)


def class_folders(folder: Path) -> list[str]:
    """Sorted class-folder names of an ImageFolder tree (the label order).

    A class folder without an image is refused: it would be a class that no model can learn, or that
    its split cannot score, while the class count still includes it.
    """
    if not folder.is_dir():
        return []
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    for name in names:
        if not _holds_image(os.path.join(folder, name)):
            raise DPImgSynError(f"class {name!r} has no images in the {folder.name} split ({folder / name}); "
                                "add images to it or remove the folder")
    return names


def labeled_tree(folder: Path, classes: list[str]) -> ImageFiles:
    """``folder/<class>/**/image`` with labels from ``classes`` (the training split's class list).

    Using the training classes for every split keeps label i the same class even when a class
    folder is missing from the test split.
    """
    unknown = sorted(set(class_folders(folder)) - set(classes))
    if unknown:
        raise DPImgSynError(f"{folder} has class folders missing from the training split: {', '.join(unknown)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(folder / name) if (folder / name).is_dir() else []
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DPImgSynError(f"no images found in the class folders of {folder}")
    return ImageFiles(paths, labels)
