"""Raw sources of the paper's datasets, read from their real on-disk formats under the data root.

Each loader has the signature ``(root, split, download) -> RawTensors | RawSource`` with
``split`` in {"train", "test"}. Small sets (MNIST, FashionMNIST, CIFAR-10) come back as whole
tensors so the registry can preprocess them in one vectorized pass; the others are read per item.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torchvision import datasets as tv

from sources.convert import RawTensors
from sources.files import ImageFiles, class_folders, labeled_tree, unlabeled_tree

HAIR_ATTRIBUTES = ("Black_Hair", "Blond_Hair", "Brown_Hair")
GENDER_ATTRIBUTE = "Male"

# Class names in label order, as each loader labels its images (public facts of the sets).
DIGITS = tuple(str(digit) for digit in range(10))
FMNIST_CLASSES = tuple(tv.FashionMNIST.classes)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CELEBA_HAIR_CLASSES = HAIR_ATTRIBUTES
CELEBA_GENDER_CLASSES = ("female", "male")  # 0: attribute Male unset, 1: set
# The ten ImageNette classes by their sorted WordNet ids (the class folders, hence the label order).
IMAGENETTE_CLASSES = ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                      "garbage truck", "gas pump", "golf ball", "parachute")

# ImageNette archives by folder name; any one of them may be present (all are resized to 224).
IMAGENETTE_FOLDERS = {"imagenette2": "full", "imagenette2-320": "320px", "imagenette2-160": "160px"}
IMAGENETTE_DOWNLOAD = "320px"  # the smallest archive whose images are at least 224 px
IMAGENETTE_SPLITS = {"train": "train", "test": "val"}

TINYIMAGENET_TRAIN = Path("tiny-imagenet-200", "train")
LSUN_FOLDER = Path("lsun")
PLACES365_FOLDER = Path("places365")
DTD_IMAGES = Path("dtd", "dtd", "images")


def _idx_digits(dataset_class: type) -> Callable:
    def load(root: Path, split: str, download: bool) -> RawTensors:
        data = dataset_class(str(root), train=split == "train", download=download)
        return RawTensors(data.data.unsqueeze(1), data.targets)

    return load


mnist = _idx_digits(tv.MNIST)
fmnist = _idx_digits(tv.FashionMNIST)


def cifar10(root: Path, split: str, download: bool) -> RawTensors:
    data = tv.CIFAR10(str(root), train=split == "train", download=download)
    return RawTensors(torch.from_numpy(data.data).permute(0, 3, 1, 2), torch.as_tensor(data.targets))


def hair_label(attributes: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Hair colour class: argmax over (black, blond, brown); ties and none-set go to the first (black)."""
    columns = [names.index(name) for name in HAIR_ATTRIBUTES]
    return attributes[:, columns].argmax(dim=1)


def gender_label(attributes: torch.Tensor, names: list[str]) -> torch.Tensor:
    """1 for the ``Male`` attribute, else 0."""
    return attributes[:, names.index(GENDER_ATTRIBUTE)]


def _celeba(label_of: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> Callable:
    def load(root: Path, split: str, download: bool) -> ImageFiles:
        data = tv.CelebA(str(root), split=split, target_type="attr", download=download)
        folder = Path(root, tv.CelebA.base_folder, "img_align_celeba")
        return ImageFiles([str(folder / name) for name in data.filename], label_of(data.attr, data.attr_names).tolist())

    return load


celeba_hair = _celeba(hair_label)
celeba_gender = _celeba(gender_label)


def imagenette(root: Path, split: str, download: bool) -> ImageFiles:
    present = [name for name in IMAGENETTE_FOLDERS if (root / name / "train").is_dir()]
    if not present and download:
        tv.Imagenette(str(root), size=IMAGENETTE_DOWNLOAD, download=True)
        present = [name for name, size in IMAGENETTE_FOLDERS.items() if size == IMAGENETTE_DOWNLOAD]
    if not present:
        raise FileNotFoundError(f"none of {', '.join(IMAGENETTE_FOLDERS)} under {root} has a train/ folder")
    folder = root / present[0]
    return labeled_tree(folder / IMAGENETTE_SPLITS[split], class_folders(folder / "train"))


def tinyimagenet(root: Path, split: str, download: bool) -> ImageFiles:
    return unlabeled_tree(root / TINYIMAGENET_TRAIN)


def lsun(root: Path, split: str, download: bool) -> ImageFiles:
    return unlabeled_tree(root / LSUN_FOLDER)


def places365(root: Path, split: str, download: bool) -> ImageFiles:
    data = tv.Places365(str(root / PLACES365_FOLDER), split="train-standard", small=True, download=download)
    return ImageFiles([path for path, _ in data.imgs], [-1] * len(data.imgs))


def textures(root: Path, split: str, download: bool) -> ImageFiles:
    """All DTD images (every official split: labels are not used, so nothing needs holding out)."""
    if download:
        tv.DTD(str(root), download=True)
    return unlabeled_tree(root / DTD_IMAGES)
