"""THE table of datasets and models, and the one public→private alignment.

Every dataset is one :class:`DatasetSpec` row in :data:`DATASETS`; every model one entry in
:data:`MODELS`. A dataset's images come from a raw source (``sources/``) and are seen through
a view (size, gray/colour, normalization, channels). :func:`get_split` uses the dataset's own
view; :func:`aligned` shows a public set through a *private* set's view, which replaces the
original code's per-pair transform copies.

Privacy: normalization constants are fixed public values (the constants below), never computed
from data; :func:`dataset_info` and :func:`aligned` never open a private split, and every split
that is opened is recorded in :data:`OPENED_SPLITS` so tests can prove it. The one thing read from a
user's ``folder:`` set without a mechanism is its images' *format* when its view is not given
(:func:`folder_view`: the file headers' sizes and colour modes, never a pixel), a public fact like N;
artifacts record the view, so later stages read nothing to know it.

Layout expected under the data root (``--data_root``, else ``$DPIMGSYN_DATA``, else ``./data``)::

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte       mnist   (--download works)
    FashionMNIST/raw/...  (same four IDX files)                  fmnist  (--download works)
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} cifar10 (--download works)
    celeba/img_align_celeba/*.jpg, celeba/list_attr_celeba.txt, list_eval_partition.txt,
        identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt
                                                                 celeba_hair, celeba_gender
    imagenette2[-320|-160]/{train,val}/<wnid>/*.JPEG             imagenette (--download: 320px)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG                 tinyimagenet (unzip the archive)
    places365/categories_places365.txt, places365_train_standard.txt, data_256_standard/...
                                                                 places365 (small 256 px images)
    lsun/<category>/**/*.{jpg,png,webp}                          lsun (images exported from lmdb)
    dtd/dtd/images/<texture>/*.jpg                               textures (--download works)
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn
from torch.utils.data import Dataset

import models
from common.cli import option, positive_int
from common.errors import DPImgSynError
from common.files import atomic_path
from common.tables import unique_table
from sources import embedded, paper
from sources.convert import RawSource, RawTensors, View, view_of
from sources.files import WIDE_GRAY_MODES, class_folders, image_formats, labeled_tree, list_images

REPOSITORY_ROOT = Path(__file__).resolve().parent
SAMPLING_DIR = REPOSITORY_ROOT / "Random_Sampling_List"  # whatever the working folder
DATA_ROOT_ENV = "DPIMGSYN_DATA"
DEFAULT_DATA_ROOT = "data"
FOLDER_PREFIX = "folder:"
PUBLIC_LABEL = -1
SAMPLING_SEED = 0  # which public images a run uses is fixed per (public set, count), as the original lists
ROLES = ("private", "public", "both")
SPLITS = ("train", "test")

MNIST_NORM = ((0.1307,) * 3, (0.3081,) * 3)
FMNIST_NORM = ((0.2860,) * 3, (0.3530,) * 3)
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CELEBA_NORM = ((0.5064, 0.4258, 0.3832), (0.3080, 0.2876, 0.2870))
IMAGENETTE_NORM = ((0.4625, 0.4580, 0.4295), (0.2813, 0.2774, 0.3006))
TINYIMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_NORM = ((0.5,) * 3, (0.5,) * 3)

DOWNLOADABLE = "Pass --download to let torchvision fetch it, or put the files there yourself."
CELEBA_HINT = ("Pass --download (needs the gdown package), or put img_align_celeba/ and the five "
               "list_*/identity_* text files of CelebA there.")

Loader = Callable[[Path, str, bool], "RawTensors | RawSource"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its public shape and normalization, its role, and where its images come from."""

    name: str
    num_classes: int  # 0 for public-only sets (their labels are never used)
    image_size: int  # side of the square images the loader yields
    channels: int  # channels of the yielded tensors (gray content is repeated)
    grayscale: bool  # gray content: public sets aligned to it become gray too
    mean: tuple[float, ...]
    std: tuple[float, ...]
    role: str  # "private", "public" or "both"
    loader: Loader = field(repr=False, compare=False)
    family: str = ""  # sets with the same family share images and must never be aligned to each other
    folders: tuple[str, ...] = ()  # any one of these under the data root means "present"; () = no files
    hint: str = ""  # how to get the data when it is missing
    downloadable: bool = False
    class_names: tuple[str, ...] = ()  # in label order; () = unnamed (artifacts then say "0".."C-1")

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: class_names need one name per class")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel")
        if self.grayscale and (len(set(self.mean)) != 1 or len(set(self.std)) != 1):
            raise ValueError(f"{self.name}: gray content repeated over channels needs equal constants")
        if not self.grayscale and self.channels != 3:
            raise ValueError(f"{self.name}: colour images have 3 channels")
        if not self.family:
            object.__setattr__(self, "family", self.name)

    @property
    def view(self) -> View:
        return View(self.image_size, self.channels, self.grayscale, self.mean, self.std)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) if self.role == "public" else SPLITS


def _spec(name: str, num_classes: int, image_size: int, grayscale: bool, norm: tuple, role: str,
          loader: Loader, **extra) -> DatasetSpec:
    return DatasetSpec(name, num_classes, image_size, 3, grayscale, norm[0], norm[1], role, loader, **extra)


DATASETS: dict[str, DatasetSpec] = unique_table("dataset", ((spec.name, spec) for spec in (
    _spec("mnist", 10, 32, True, MNIST_NORM, "both", paper.mnist, folders=("MNIST/raw",),
          hint=DOWNLOADABLE, downloadable=True, class_names=paper.DIGITS),
    _spec("fmnist", 10, 32, True, FMNIST_NORM, "both", paper.fmnist, folders=("FashionMNIST/raw",),
          hint=DOWNLOADABLE, downloadable=True, class_names=paper.FMNIST_CLASSES),
    _spec("cifar10", 10, 32, False, CIFAR10_NORM, "private", paper.cifar10, folders=("cifar-10-batches-py",),
          hint=DOWNLOADABLE, downloadable=True, class_names=paper.CIFAR10_CLASSES),
    _spec("celeba_hair", 3, 64, False, CELEBA_NORM, "private", paper.celeba_hair, family="celeba",
          folders=("celeba",), downloadable=True, hint=CELEBA_HINT, class_names=paper.CELEBA_HAIR_CLASSES),
    _spec("celeba_gender", 2, 64, False, CELEBA_NORM, "private", paper.celeba_gender, family="celeba",
          folders=("celeba",), downloadable=True, hint=CELEBA_HINT, class_names=paper.CELEBA_GENDER_CLASSES),
    _spec("imagenette", 10, 224, False, IMAGENETTE_NORM, "private", paper.imagenette,
          folders=tuple(paper.IMAGENETTE_FOLDERS), downloadable=True, class_names=paper.IMAGENETTE_CLASSES,
          hint="Pass --download (fetches imagenette2-320), or extract any ImageNette archive there "
               "(train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)."),
    _spec("tinyimagenet", 0, 64, False, TINYIMAGENET_NORM, "public", paper.tinyimagenet,
          folders=(str(paper.TINYIMAGENET_TRAIN),),
          hint="It cannot be downloaded automatically: unzip tiny-imagenet-200.zip in the data root "
               "(train/<wnid>/images/*.JPEG)."),
    _spec("places365", 0, 256, False, HALF_NORM, "public", paper.places365, folders=(str(paper.PLACES365_FOLDER),),
          downloadable=True,
          hint="Pass --download (large), or put categories_places365.txt, places365_train_standard.txt "
               "and the small images as data_256_standard/ there (rename an extracted data_256/)."),
    _spec("lsun", 0, 256, False, HALF_NORM, "public", paper.lsun, folders=(str(paper.LSUN_FOLDER),),
          hint="It cannot be downloaded automatically: export the LSUN lmdb databases to image files "
               "(lsun/<category>/**/*.jpg|png|webp) with the LSUN tools."),
    _spec("textures", 0, 256, False, HALF_NORM, "public", paper.textures, folders=(str(paper.DTD_IMAGES),),
          hint=DOWNLOADABLE + " (DTD: dtd/dtd/images/<texture>/*.jpg)", downloadable=True),
    _spec("mnist5k", 10, 32, True, MNIST_NORM, "both", embedded.mnist5k, family="mnist", class_names=paper.DIGITS),
    _spec("photos", 0, 64, False, HALF_NORM, "public", embedded.photos),
)))

MODELS = models.MODELS  # each architecture registers itself where it is defined (models/)
DEFAULT_MODEL = "resnet18"  # the paper's architecture: every stage's and tool's default

FOLDER_OPTIONS = ("image_size", "channels")  # the view of a folder: set; artifacts record it under VIEW_KEY
FOLDER_CHANNELS = (1, 3)
VIEW_KEY = "view"
CLASS_NAMES_KEY = "class_names"  # artifacts record the private set's class names (public schema, like N) under it
# What a folder: set meant before views were given and recorded: artifacts without a record were made so.
LEGACY_FOLDER_VIEW = {"image_size": 32, "channels": 3}
GRAY_MODES = ("1", "L", "LA", *WIDE_GRAY_MODES)  # PIL modes of gray files: a set of mostly such files gets 1 channel
INFER_MAX_FILES = 1000  # headers read to infer a view, evenly spread over the sorted training files


@dataclass(frozen=True, kw_only=True)
class FolderViewOptions:
    """The view of a ``folder:`` set, for every stage config that opens one (flags and pipeline keys).

    Run-only as given: the teacher records the view it resolves, and later stages refuse any other than the
    one their input records.
    """

    image_size: int | None = option(None, "folder: sets only: side of the square images the models see (default: "
                                    "the one the teacher records; for the teacher, inferred from the training "
                                    "images' format: their most common shorter side)", parse=positive_int,
                                    run_only=True)
    channels: int | None = option(None, "folder: sets only: 1 (gray) or 3 (colour) (default: the teacher's record; "
                                  "for the teacher, 1 if most training images are gray files (by their format), "
                                  "else 3; the other files are converted, and the teacher says how many)",
                                  parse=positive_int, run_only=True)


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """Where the fixed lists of public images are kept, for every stage config that draws public images.

    Run-only: a list is drawn from its name's (public set, count, seed), and releases record that name.
    """

    sampling_dir: str | None = option(None, "folder of the public sampling lists (default: Random_Sampling_List/ "
                                      "of the repository, whatever the working folder)", run_only=True)

OPENED_SPLITS: list[tuple[str, str]] = []


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """``--data_root`` if given, else ``$DPIMGSYN_DATA``, else ``./data``."""
    return Path(data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser()


def dataset_choices(role: str) -> str:
    """``one of: a, b, folder:PATH``: the sets that can be ``role`` ("private" or "public"), for a flag's help."""
    return "one of: " + ", ".join([name for name, spec in DATASETS.items() if spec.role in (role, "both")]
                                  + [f"{FOLDER_PREFIX}PATH"])


def model_choices() -> str:
    """``one of: a, b``: the registered architectures, for a flag's help."""
    return "one of: " + ", ".join(MODELS)


FOLDER_HINT = "A folder dataset needs <path>/train/<class>/* and <path>/test/<class>/* image files."


def _folder_path(name: str) -> Path:
    if not name[len(FOLDER_PREFIX):]:
        raise DPImgSynError(f"{FOLDER_PREFIX} needs a path, e.g. {FOLDER_PREFIX}/data/my_images")
    return Path(name[len(FOLDER_PREFIX):]).expanduser().absolute()


def _folder_spec(name: str, view: dict, num_classes: int | None = None) -> DatasetSpec:
    """A user's ImageFolder tree seen through ``view`` (``image_size``, ``channels``); its class count is the
    number of class folders in ``train/`` unless ``num_classes`` is known already (an artifact's record)."""
    image_size, channels = view["image_size"], view["channels"]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DPImgSynError(f"image size of {name} must be a positive integer, got {image_size!r}")
    if channels not in FOLDER_CHANNELS:
        raise DPImgSynError(f"channels of {name} must be one of {FOLDER_CHANNELS}, got {channels!r}")
    path = _folder_path(name)
    if num_classes is None:
        num_classes = len(class_folders(path / "train"))
    return DatasetSpec(
        name, num_classes, image_size, channels, channels == 1,
        HALF_NORM[0][:channels], HALF_NORM[1][:channels], "both",
        lambda root, split, download: labeled_tree(path / split, class_folders(path / "train")),
        family=FOLDER_PREFIX + str(path.resolve()), folders=(str(path / "train"),), hint=FOLDER_HINT,
    )


def infer_folder_view(name: str) -> tuple[dict, int, int]:
    """The view of a ``folder:`` set read from its training images' headers, how many files were read, and
    how many of those the channel rule converts.

    Image size: the most common shorter side (the smaller on a tie), i.e. the side itself when all
    images are equal squares. Channels: 1 when most files read are gray (mode L and kin; the colour
    ones are then converted to luma), else 3 (gray files are repeated over 3 channels). Only the file
    format is read, never a pixel: a public fact like the number of images N. A colour file with gray
    content counts as colour, since only its pixels could tell.
    """
    folder = _folder_path(name) / "train"
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise DPImgSynError(f"dataset {name!r} has no training images below {folder}. {FOLDER_HINT}")
    chosen = paths[::-(-len(paths) // INFER_MAX_FILES)]
    formats = image_formats(chosen)
    sides = Counter(min(width, height) for width, height, _ in formats)
    image_size = max(sides, key=lambda side: (sides[side], -side))
    gray = sum(mode in GRAY_MODES for _, _, mode in formats)
    channels = 1 if 2 * gray > len(formats) else 3
    converted = len(formats) - gray if channels == 1 else gray
    return {"image_size": image_size, "channels": channels}, len(chosen), converted


def dataset_info(name: str, **folder_opts) -> DatasetSpec:
    """The spec of ``name`` without opening any of its images (safe to call on the private set anywhere).

    ``folder_opts`` (``image_size``, ``channels``; ``None`` means unset) shape ``folder:`` sets only;
    every other dataset has a fixed shape and ignores them. An unset one is inferred from the training
    files' headers (:func:`infer_folder_view`); stages call :func:`folder_view` once instead.
    """
    unknown = set(folder_opts) - set(FOLDER_OPTIONS)
    if unknown:
        raise DPImgSynError(f"unknown dataset option(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(FOLDER_OPTIONS)}")
    if name.startswith(FOLDER_PREFIX):
        given = {key: value for key, value in folder_opts.items() if value is not None}
        view = given if len(given) == len(FOLDER_OPTIONS) else {**infer_folder_view(name)[0], **given}
        return _folder_spec(name, view)
    if name not in DATASETS:
        raise DPImgSynError(f"unknown dataset {name!r}; valid names: "
                            f"{', '.join([*DATASETS, FOLDER_PREFIX + '<path>'])}")
    return DATASETS[name]


def source_spec(name: str) -> DatasetSpec:
    """The spec of a set used only for its images and role (a public set aligned to a private view)."""
    return _folder_spec(name, LEGACY_FOLDER_VIEW) if name.startswith(FOLDER_PREFIX) else dataset_info(name)


def describe_view(spec: DatasetSpec) -> str:
    """``48 x 48 x 1`` (side x side x channels)."""
    return f"{spec.image_size} x {spec.image_size} x {spec.channels}"


def _refuse_other_view(spec: DatasetSpec, image_size: int | None, channels: int | None, what: str,
                       fix: str = "image_size and channels shape folder: sets only; drop them") -> None:
    """One line when a given image size or channel count differs from the view ``spec`` already has."""
    for key, value in (("image_size", image_size), ("channels", channels)):
        if value is not None and value != getattr(spec, key):
            raise DPImgSynError(f"{what} sees {spec.name} as {describe_view(spec)} images, but {key} {value} was "
                                f"given: {fix}")


def folder_view(name: str, image_size: int | None = None, channels: int | None = None) -> tuple[dict, str | None]:
    """The ``folder_opts`` a stage that opens ``name`` by itself passes everywhere, and a note to print.

    A ``folder:`` set gets both options, each given or inferred (:func:`infer_folder_view`); the note
    says what was inferred and how many files an inferred channel count converts (``None`` when nothing
    was inferred). Any other set has its own fixed view, so it gets ``{}``, and a given value that
    differs from that view is refused.
    """
    if not name.startswith(FOLDER_PREFIX):
        _refuse_other_view(dataset_info(name), image_size, channels, "the registry")
        return {}, None
    given = {key: value for key, value in (("image_size", image_size), ("channels", channels)) if value is not None}
    if len(given) == len(FOLDER_OPTIONS):
        _folder_spec(name, given, num_classes=0)
        return given, None
    inferred, files, converted = infer_folder_view(name)
    view = {**inferred, **given}
    spec = _folder_spec(name, view, num_classes=0)
    what = " and ".join(key.replace("_", " ") for key in FOLDER_OPTIONS if key not in given)
    rule = ""
    if converted and "channels" not in given:
        rule = (f"; most files read are gray: the colour ones ({converted} of {files}) are converted to gray (luma)"
                if spec.grayscale else
                f"; most files read are colour: the gray ones ({converted} of {files}) are repeated over 3 channels")
    note = (f"{artifact_name(name)}: images seen as {describe_view(spec)} ({'gray' if spec.grayscale else 'colour'}); "
            f"{what} inferred from the format of {files} training files (public, like N){rule}; "
            f"pass --image_size/--channels to choose")
    return view, note


def recorded_view(recorded: str, record: dict | None, image_size: int | None = None, channels: int | None = None,
                  what: str = "the artifact") -> dict:
    """The ``folder_opts`` of the set an artifact records (``{}`` for registry sets); given values must agree.

    ``record`` is the artifact's :data:`VIEW_KEY` entry; a ``folder:`` artifact without one predates
    recorded views and was made with :data:`LEGACY_FOLDER_VIEW`.
    """
    if not recorded.startswith(FOLDER_PREFIX):
        _refuse_other_view(dataset_info(recorded), image_size, channels, what)
        return {}
    complete = isinstance(record, dict) and all(isinstance(record.get(key), int) for key in FOLDER_OPTIONS)
    view = {key: int(record[key]) for key in FOLDER_OPTIONS} if complete else dict(LEGACY_FOLDER_VIEW)
    spec = _folder_spec(recorded, view, num_classes=0)
    _refuse_other_view(spec, image_size, channels, what,
                       "drop --image_size/--channels (later stages take the view the teacher records)")
    return view


def shape_view(image_shape) -> dict:
    """The ``folder_opts`` of images of shape (C, H, W), e.g. a release's images."""
    return {"image_size": int(image_shape[-1]), "channels": int(image_shape[0])}


def artifact_name(name: str) -> str:
    """How artifacts name a dataset: a ``folder:`` set by its folder's name, never by a local path."""
    if not name.startswith(FOLDER_PREFIX):
        return name
    return FOLDER_PREFIX + Path(name[len(FOLDER_PREFIX):]).expanduser().absolute().name


def recorded_spec(recorded: str, num_classes: int, view: dict | None = None) -> DatasetSpec:
    """The spec of the private set an artifact names, without opening its files (synthesis reads none).

    A ``folder:`` set is recorded by its folder name only, so its class count and its view (the
    :func:`recorded_view` of the artifact's record) come from the artifact.
    """
    if recorded.startswith(FOLDER_PREFIX):
        return _folder_spec(recorded, view or recorded_view(recorded, None), num_classes)
    return dataset_info(recorded)


def local_dataset(recorded: str, given: str | None, what: str) -> str:
    """The dataset to open for an artifact that records ``recorded``: ``given`` (``--dataset``) if it
    is the same set, else ``recorded``. A ``folder:`` set must be given, since artifacts name it by
    its folder name only."""
    if given is not None:
        if artifact_name(given) != recorded:
            raise DPImgSynError(f"{what} was made for dataset {recorded!r}, not {artifact_name(given)!r}; "
                                f"drop --dataset, or pass the dataset it was made for")
        return given
    if recorded.startswith(FOLDER_PREFIX):
        raise DPImgSynError(f"{what} was made for the folder dataset {recorded!r}, recorded by its folder name "
                            f"only; pass --dataset {FOLDER_PREFIX}PATH with the path of that folder on this machine")
    return recorded


def _open_source(spec: DatasetSpec, split: str, data_root, download: bool) -> RawTensors | RawSource:
    if split not in spec.splits:
        raise DPImgSynError(f"dataset {spec.name!r} has no {split!r} split (it has: {', '.join(spec.splits)})")
    OPENED_SPLITS.append((spec.name, split))
    root = resolve_data_root(data_root)
    fetching = download and spec.downloadable
    if spec.folders and not fetching and not any((root / folder).exists() for folder in spec.folders):
        expected = " or ".join(str(root / folder) for folder in spec.folders)
        where = "" if Path(spec.folders[0]).is_absolute() else \
            f" (data root from --data_root, else ${DATA_ROOT_ENV}, else ./{DEFAULT_DATA_ROOT})"
        raise DPImgSynError(f"dataset {spec.name!r} not found: expected {expected}{where}. {spec.hint}")
    try:
        return spec.loader(root, split, fetching)
    except (RuntimeError, OSError) as exc:
        raise DPImgSynError(f"could not read dataset {spec.name!r} under {root}: {exc}. {spec.hint}") from None


def get_split(name: str, split: str, data_root=None, download: bool = False, **folder_opts) -> Dataset:
    """One split as (normalized float tensor C×H×W, int label) items; small sets are held in memory."""
    spec = dataset_info(name, **folder_opts)
    return view_of(_open_source(spec, split, data_root, download), spec.view)


def train_size(name: str, data_root=None, download: bool = False) -> int:
    """The number of training images of a set (a public fact), without converting any of them."""
    source = _open_source(source_spec(name), "train", data_root, download)
    return len(source.labels) if isinstance(source, RawTensors) else len(source)


def get_dataset(name: str, data_root=None, download: bool = False,
                **folder_opts) -> tuple[int, Dataset, Dataset | None]:
    """``(num_classes, train_set, test_set)``; public-only sets have no test set (``None``)."""
    spec = dataset_info(name, **folder_opts)
    test = get_split(name, "test", data_root, download, **folder_opts) if "test" in spec.splits else None
    return spec.num_classes, get_split(name, "train", data_root, download, **folder_opts), test


def class_names(name: str) -> list[str]:
    """The class names of ``name`` in label order, without opening an image; ``[]`` when the set has none.

    A ``folder:`` set's names are its sorted class folders in ``train/`` (label i is the i-th), a public
    schema like N; a registry set's are those its loader labels by.
    """
    if name.startswith(FOLDER_PREFIX):
        return class_folders(_folder_path(name) / "train")
    return list(dataset_info(name).class_names)


def check_model_input(name: str, image_size: int) -> None:
    """Refuse, in one line, images smaller than the architecture ``name`` can look at."""
    if name not in MODELS:
        raise DPImgSynError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    minimum = MODELS[name].min_size
    if image_size < minimum:
        raise DPImgSynError(f"model {name!r} needs images of at least {minimum} x {minimum} (its pooling and strides "
                            f"shrink the side {minimum}-fold), got {image_size} x {image_size}; pass --image_size "
                            f"{minimum} or more, or choose another model")


def get_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """A fresh, Opacus-ready model for ``num_classes`` outputs on ``in_channels``-channel images.

    ``image_size`` (the side of the images it will see), when given, is checked against the
    architecture's minimum (:func:`check_model_input`).
    """
    if name not in MODELS:
        raise DPImgSynError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DPImgSynError(f"a model needs a positive number of classes, got {num_classes!r}")
    if in_channels not in FOLDER_CHANNELS:
        raise DPImgSynError(f"a model takes images of {' or '.join(map(str, FOLDER_CHANNELS))} channels, "
                            f"got {in_channels!r}")
    if image_size is not None:
        check_model_input(name, image_size)
    return MODELS[name](num_classes, in_channels)


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> nn.Module:
    """The checkpoint's architecture with its weights; weights that do not fit are a user error."""
    record = checkpoint.get(VIEW_KEY)  # input channels: the recorded view's, else 3 (registry sets, older folder sets)
    channels = int(record["channels"]) if isinstance(record, dict) and "channels" in record else 3
    model = get_model(checkpoint["architecture"], checkpoint["num_classes"], channels)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DPImgSynError(f"{path}: weights do not fit architecture {checkpoint['architecture']!r} ({first}); "
                            "the checkpoint is damaged or was edited") from None
    return model


def aligned(public_name: str, private_name: str | DatasetSpec, data_root=None, download: bool = False,
            **folder_opts) -> Dataset:
    """The public set's training images seen through the private set's eyes; labels are -1.

    Gray if the private set is gray, the private image size, the private normalization constants,
    the private channel count. Only the private set's *spec* is used: no private image is opened.
    ``folder_opts`` describe the private set when it is a ``folder:`` set. A ``folder:`` set may be the
    public side too (the images of its ``train/`` class folders, labels unused).
    """
    public = source_spec(public_name)  # only its images are used: a folder: public set needs no view
    private = private_name if isinstance(private_name, DatasetSpec) else dataset_info(private_name, **folder_opts)
    private_name = private.name
    if public.role == "private":
        raise DPImgSynError(f"{public_name!r} is a private dataset; public sets: "
                            f"{', '.join(name for name, spec in DATASETS.items() if spec.role != 'private')}")
    if private.role == "public":
        raise DPImgSynError(f"{private_name!r} is a public dataset and has no private domain to align to")
    if public.family == private.family:
        raise DPImgSynError(f"public set {public_name!r} shares its images with private set {private_name!r}; "
                            "choose a public set that is independent of the private data")
    return view_of(_open_source(public, "train", data_root, download), private.view, label=PUBLIC_LABEL)


def sampling_list_path(public_name: str, count: int, seed: int, directory: str | os.PathLike | None = None) -> Path:
    """Where :func:`sampling_list` keeps the list: ``directory``, else the repository's :data:`SAMPLING_DIR`.

    The file name is recorded in release metadata, so a ``folder:`` set appears by its folder name only,
    made file-safe (``folder:/data/pets`` -> ``folder_pets_<count>_<seed>.npy``).
    """
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", artifact_name(public_name)).strip("_")
    return Path(directory if directory is not None else SAMPLING_DIR) / f"{safe_name}_{count}_{seed}.npy"


def sampling_list(public_name: str, count: int, seed: int, available: int,
                  directory: str | os.PathLike | None = None) -> np.ndarray:
    """Deterministic indices of ``count`` public images, stored as ``<public>_<count>_<seed>.npy``.

    Drawn without replacement when ``count <= available``, else as whole shuffled passes over the
    set. Created on first use (atomically) and reused afterwards, so every run that names the same
    (public set, count, seed) starts from the same public images.
    """
    if count < 1 or available < 1 or seed < 0:
        raise DPImgSynError(f"a sampling list needs a positive count and set size and a non-negative seed; "
                            f"got count {count}, size {available}, seed {seed}")
    path = sampling_list_path(public_name, count, seed, directory)
    if path.exists():
        indices = np.load(path, allow_pickle=False)
        if indices.shape != (count,) or indices.dtype.kind not in "iu" or indices.min() < 0 \
                or indices.max() >= available:
            raise DPImgSynError(f"{path} does not fit {public_name!r} with {available} images "
                                f"(made for another version of the set?); delete it to draw a new list")
        return indices.astype(np.int64)
    rng = np.random.default_rng(seed)
    if count <= available:
        indices = rng.choice(available, size=count, replace=False)
    else:
        passes = -(-count // available)
        indices = np.concatenate([rng.permutation(available) for _ in range(passes)])[:count]
    indices = indices.astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, indices)
    return indices
