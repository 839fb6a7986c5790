"""Image files on disk as raw sources: explicit file lists, recursive trees, class-folder trees."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from common.errors import DPImgSynError
from sources.convert import RawSource


class ImageFiles(RawSource):
    """Images read one by one with PIL (always RGB; gray conversion is the view's business)."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths, self.labels = list(paths), [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            if min_side is not None:
                # JPEG can decode at 1/2, 1/4, 1/8 scale for free; it keeps both sides >= min_side.
                image.draft("RGB", (min_side, min_side))
            pixels = pil_to_tensor(image.convert("RGB"))
        return pixels.float().div_(255), self.labels[index]


def image_formats(paths: list[str]) -> list[tuple[int, int, str]]:
    """(width, height, PIL mode) of each file, read from its header: no pixel is decoded."""
    formats = []
    for path in paths:
        try:
            with Image.open(path) as image:
                formats.append((*image.size, image.mode))
        except (OSError, ValueError) as exc:
            raise DPImgSynError(f"cannot read the image {path}: {exc}") from None
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


def class_folders(folder: Path) -> list[str]:
    """Sorted class-folder names of an ImageFolder tree (the label order)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()) if folder.is_dir() else []


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
