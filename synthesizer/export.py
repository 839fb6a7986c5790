"""Export a release into formats that other tools read as they are, without this project's code.

Formats (``x``/``y``, folders and CSV rows all carry the *teacher's hard labels*, the argmax of the
release's soft labels; the synthesis targets are never exported as labels, see
:mod:`synthesizer.release`):

- ``imagefolder``: ``train/<class>/<index>.png`` (8-bit PNG, ``round(255 x)``), ``train/metadata.csv``
  (``file_name,label``, names relative to that file, in index order) and ``train/soft_labels.npy``.
  ``torchvision.datasets.ImageFolder(out / "train")`` numbers the class folders in sorted order, so the
  folder names sort in label order and folder ``i`` is label ``i`` (pass ``allow_empty=True`` when
  ``export.json`` lists empty classes: their folders are kept so that the mapping holds). The folders
  (listed in ``export.json``'s ``class_folders``) are named so:

  * a release that names its classes, whose names already sort in label order and are safe folder names
    (no ``/ \\ : * ? " < > |``, no leading ``.``, no trailing space or ``.``, distinct ignoring case):
    the names themselves. A ``folder:`` set's names always sort so (its labels are its sorted class
    folders), so its export has the private set's layout;
  * a release with other names (e.g. FashionMNIST's ``T-shirt/top``, ``Trouser``, ...): the zero-padded
    label, ``_``, and the name with unsafe characters replaced by ``_`` (``0_T-shirt_top``, ``1_Trouser``);
    equal-width numbers sort in label order whatever follows them;
  * a release without names: the zero-padded labels (``0``..``9``, ``00``..``99``).

  HuggingFace ``datasets.load_dataset("imagefolder", data_dir=out)`` takes the labels from the CSV; it reads
  a metadata file only inside the split's folder, hence ``train/metadata.csv`` rather than one at the root.
- ``npz``: ``dataset.npz`` with ``x`` uint8 N x H x W x C (``round(255 x)``), ``y`` int64, ``soft`` and
  ``class_names``.
- ``gen_npz``: ``gen.npz`` with ``x`` float32 N x C x H x W in [0, 1] (the release's values, not
  quantized), ``y`` int64, ``soft`` and ``class_names``: the file DPImageBench's ``eval.py`` loads
  (``np.load(...)["x"]``, ``["y"]``, which ignores the other keys; its classifiers take ``in_c = x.shape[1]``
  and feed ``2 x - 1``).

Soft labels travel in every format, so that a student can distil from an export as from the release: the
release's ``soft_labels.npy`` (the teacher's logits, float32 N x classes, row i for image i) as
``train/soft_labels.npy`` of an image folder (row i: the file numbered i, the i-th row of metadata.csv) and as
the key ``soft`` of both ``.npz`` files; ``export.json``'s ``soft_labels`` names the file (and key). Class
names travel too: in ``export.json``'s ``class_names`` (label order) and as the key ``class_names`` of both
``.npz`` files, a numpy unicode array, so ``np.load(..., allow_pickle=False)`` reads it; a release without
names gives ``"0"``..``"C-1"``.

Gray stays one channel in every format: a release stores gray content repeated over three channels,
and the export keeps one of them when the release's dataset is gray (by its registry entry; for a
dataset this code does not know, when its normalization constants are equal over the channels) and
every image's channels are indeed equal. A ``folder:`` set is gray exactly when its release has one
channel.

Every export writes ``export.json`` beside the images: the release's privacy block (re-verified
against its ledger), the format, the counts and class names the release records, where the soft labels
are, and the sha256 of every exported file and of the release files it came from -- nothing else
derived from private data. The export is
built in a hidden folder beside ``output`` and renamed into place when complete, so ``output`` is
either absent or a whole export; an existing non-empty ``output`` is never overwritten.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import privacy
import registry
from common.cli import option
from common.errors import DPImgSynError
from common.files import atomic_path, atomic_write_text, sha256_file
from synthesizer import overlap, release as release_io

FORMATS = ("imagefolder", "npz", "gen_npz")
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "dpimgsyn.export"
EXPORT_VERSION = 2  # 2: soft labels and class names in every format
SPLIT = "train"
CSV_FILE = "metadata.csv"
NPZ_FILE = "dataset.npz"
GEN_NPZ_FILE = "gen.npz"
SOFT_LABELS_FILE = "soft_labels.npy"  # beside metadata.csv in an image folder
SOFT_KEY, CLASS_NAMES_KEY = "soft", "class_names"  # keys of the .npz formats
UNSAFE_FOLDER_CHARACTERS = '/\\:*?"<>|'
CHUNK = 1024  # images read from the memory map at a time: memory stays bounded for any release size
LABELS_NOTE = ("the teacher's hard labels: the argmax of the release's soft labels (soft_labels.npy). The "
               "synthesis targets (targets.npy) are what the optimization aimed at, not labels.")
SOFT_LABELS_NOTE = ("the teacher's logits (float32 N x classes, the release's soft_labels.npy), row i for image i: "
                    "distil a student from them as from the release")
STORAGE = {
    "imagefolder": "8-bit PNG per image, pixel = round(255 x); train/<class>/<index>.png, labels also in "
                   "train/metadata.csv, soft labels in train/soft_labels.npy",
    "npz": "dataset.npz: x uint8 N x H x W x C, pixel = round(255 x); y int64; soft float32; class_names unicode",
    "gen_npz": "gen.npz: x float32 N x C x H x W in [0, 1] (the release's values); y int64; soft float32; "
               "class_names unicode",
}
SOFT_LABELS_AT = {"imagefolder": {"file": f"{SPLIT}/{SOFT_LABELS_FILE}"},
                  "npz": {"file": NPZ_FILE, "key": SOFT_KEY}, "gen_npz": {"file": GEN_NPZ_FILE, "key": SOFT_KEY}}


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """One export of one release. It reads the release and, when the release involves a ``folder:`` set, the
    private images for one check (no exported image may be a private one), never anything else private."""

    release: str = option(help="release folder written by synthesize.py (only read)")
    format: str = option(help="imagefolder: PNG files in train/<class>/ plus train/metadata.csv and "
                              "train/soft_labels.npy; npz: dataset.npz with x uint8 NHWC, y, soft and class_names; "
                              "gen_npz: DPImageBench's gen.npz, x float32 NCHW in [0, 1], y, soft and class_names",
                         choices=FORMATS)
    output: str = option(help="new folder for the export (must not exist, or be empty)")
    dataset: str | None = option(None, "the release's private dataset on this machine (default: the release's; "
                                 "required for a folder: set, which releases record by its folder name only): when "
                                 "either set is a folder: set, no exported image may be a private one")
    data_root: str | None = option(None, "dataset folder of a registry private set (default: $DPIMGSYN_DATA, else "
                                   "./data)")
    progress: bool = option(True, "progress bars")


def _refuse_private_images(release: Path, bundle: release_io.ReleaseDataset, dataset: str | None,
                           data_root: str | os.PathLike | None) -> None:
    """No exported image may be a private image of the release's private set (checked when a set is a folder)."""
    recorded, public = str(bundle.metadata.get("dataset", "")), str(bundle.metadata.get("public_set", ""))
    if dataset is None and not overlap.needs_check(recorded, public):
        return
    local = registry.local_dataset(recorded, dataset, f"release {release}")
    options = registry.recorded_view(recorded, registry.shape_view(bundle.images.shape[1:]), what=f"release {release}")
    overlap.check_release_images(bundle.images, public, local, data_root, options, f"release {release}")


def export(config: ExportConfig) -> Path:
    """The CLI's stage: :func:`export_release` of the config."""
    return export_release(Path(config.release), config.format, Path(config.output), progress=config.progress,
                          dataset=config.dataset, data_root=config.data_root)


def export_release(release: Path, fmt: str, output: Path, *, progress: bool = True, dataset: str | None = None,
                   data_root: str | os.PathLike | None = None) -> Path:
    """Export the release folder ``release`` in format ``fmt`` (one of :data:`FORMATS`) to the new folder
    ``output``; returns ``output``. Rerunning the same export finds it done (after checking its
    checksums); an ``output`` holding anything else is refused. A release that involves a ``folder:`` set is
    compared with its private images first (``dataset``: that set on this machine, :mod:`synthesizer.overlap`)."""
    release, output = Path(release), Path(output)
    if fmt not in FORMATS:
        raise DPImgSynError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output.resolve() == release.resolve() or release.resolve() in output.resolve().parents:
        raise DPImgSynError(f"--output {output} is inside the release {release}; a release is only read: "
                            "choose a folder outside it")
    bundle = release_io.load(release, verify=True)
    block = privacy.require_privacy_block(bundle.metadata, f"release {release}", allow_non_private=True)
    source = _source(release, bundle)
    _refuse_private_images(release, bundle, dataset, data_root)
    if _finished(output, fmt, source):
        print(f"{output} already holds this export ({fmt} of {release}); nothing to do")
        return output

    gray = is_gray(bundle)
    staging = output.parent / f".{output.name}.export-{secrets.token_hex(4)}.tmp"
    staging.mkdir(parents=True)
    try:
        files = {name: sha256_file(staging / name) for name in WRITERS[fmt](bundle, gray, staging, progress)}
        document = _document(fmt, bundle, block, source, gray, files)
        atomic_write_text(staging / EXPORT_FILE, json.dumps(document, indent=2) + "\n")
        _move_into_place(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    empty = document["empty_classes"]
    note = f"; no image has the label(s) {empty}" if empty else ""
    if empty and fmt == "imagefolder":
        note += " (their folders are empty: torchvision's ImageFolder needs allow_empty=True)"
    print(f"export written to {output} ({fmt}, {len(bundle)} images, {'gray' if gray else 'colour'}, labels: the "
          f"teacher's){note}")
    return output


def verify_export(output: Path) -> dict:
    """The export record of ``output`` after checking every exported file against its sha256."""
    document = _read_record(Path(output))
    for name, digest in document["files"].items():
        file = Path(output) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DPImgSynError(f"{output / EXPORT_FILE} lists {name!r}, outside the export; it was altered: "
                                f"delete {output} and export again")
        if not file.is_file() or sha256_file(file) != digest:
            raise DPImgSynError(f"{file} is missing or does not match its sha256 in {EXPORT_FILE}; delete {output} "
                                "and export again")
    return document


def _read_record(output: Path) -> dict:
    """``export.json`` of ``output``, unchecked against the files; unreadable or foreign -> DPImgSynError."""
    path = output / EXPORT_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DPImgSynError(f"{path} cannot be read ({exc}); delete {output} and export again") from None
    if not (isinstance(document, dict) and document.get("format") == EXPORT_FORMAT
            and isinstance(document.get("files"), dict)):
        raise DPImgSynError(f"{path} is not the record of an export; delete {output} or choose another --output")
    return document


# --------------------------------------------------------------------------- what is exported

def is_gray(bundle: release_io.ReleaseDataset) -> bool:
    """Whether the release's images are gray content (then exported with one channel)."""
    channels = bundle.images.shape[1]
    if channels == 1:
        return True
    if channels != 3:
        raise DPImgSynError(f"{bundle.root} holds images with {channels} channels; exports take 1 or 3")
    recorded = _dataset_is_gray(bundle.metadata)
    if recorded is False:
        return False
    if recorded is None and not _equal_constants(bundle.metadata):
        return False
    return all(np.array_equal(chunk[:, 0], chunk[:, 1]) and np.array_equal(chunk[:, 0], chunk[:, 2])
               for chunk in (bundle.images[part] for part in _parts(len(bundle))))


def _dataset_is_gray(metadata: dict) -> bool | None:
    """Gray or colour by the registry's entry of the release's dataset; ``None`` if this code does not know it."""
    name = metadata.get("dataset")
    if not isinstance(name, str):
        return None
    if name.startswith(registry.FOLDER_PREFIX):
        return False  # a folder: set is gray exactly when its release has one channel (checked before)
    try:
        return registry.dataset_info(name).grayscale
    except DPImgSynError:
        return None


def _equal_constants(metadata: dict) -> bool:
    """Gray content is normalized alike on every channel; constants that differ (or are missing) mean colour."""
    values = [metadata.get(key) for key in ("mean", "std")]
    return all(isinstance(value, list) and value and all(isinstance(item, (int, float)) for item in value)
               and len({float(item) for item in value}) == 1 for value in values)


def _parts(count: int) -> Iterator[slice]:
    return (slice(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK))


def _pixels(bundle: release_io.ReleaseDataset, part: slice, gray: bool) -> np.ndarray:
    """Images ``part`` as float32 N x C x H x W in [0, 1], one channel when gray."""
    images = np.asarray(bundle.images[part], dtype=np.float32)
    if images.size and not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise DPImgSynError(f"{bundle.root / 'images.npy'} holds pixels outside [0, 1]; the release is damaged: "
                            "regenerate it or download it again")
    return images[:, :1] if gray else images


def _uint8(images: np.ndarray) -> np.ndarray:
    """N x C x H x W in [0, 1] -> N x H x W x C uint8, ``round(255 x)``."""
    return np.rint(images * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def _bar(total: int, what: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="img", desc=f"export {what}", disable=not progress, dynamic_ncols=True)


def _safe_folder(name: str) -> bool:
    """A name usable as a folder as it is on common file systems (names are printable: the release checks)."""
    return not (name.startswith(".") or name.endswith((" ", ".")) or set(name) & set(UNSAFE_FOLDER_CHARACTERS))


def class_folders(bundle: release_io.ReleaseDataset) -> list[str]:
    """Folder name of every class in label order, chosen so that sorted order is label order (module docstring)."""
    width = len(str(bundle.num_classes - 1))
    names = bundle.recorded_class_names
    if names is None:
        return [f"{label:0{width}d}" for label in range(bundle.num_classes)]
    if (names == sorted(names) and len({name.casefold() for name in names}) == len(names)
            and all(map(_safe_folder, names))):
        return list(names)
    cleaned = ("".join("_" if char in UNSAFE_FOLDER_CHARACTERS else char for char in name).rstrip(" .")
               for name in names)
    return [f"{label:0{width}d}_{name}" if name else f"{label:0{width}d}" for label, name in enumerate(cleaned)]


def _write_imagefolder(bundle: release_io.ReleaseDataset, gray: bool, out: Path, progress: bool) -> list[str]:
    from PIL import Image  # only an export writes PNG files

    labels = np.asarray(bundle.labels)
    width = len(str(len(bundle) - 1))
    split = out / SPLIT
    folders = class_folders(bundle)
    for folder in folders:  # empty classes too, so that folder i is label i
        (split / folder).mkdir(parents=True)
    names = []
    with _bar(len(bundle), "PNG", progress) as bar:
        for part in _parts(len(bundle)):
            for offset, pixels in enumerate(_uint8(_pixels(bundle, part, gray))):
                index = part.start + offset
                name = f"{folders[int(labels[index])]}/{index:0{width}d}.png"
                Image.fromarray(pixels[..., 0] if gray else pixels).save(split / name, format="PNG")
                names.append(name)
            bar.update(part.stop - part.start)
    rows = io.StringIO(newline="")
    csv.writer(rows, lineterminator="\n").writerows([("file_name", "label"), *zip(names, labels.tolist())])
    atomic_write_text(split / CSV_FILE, rows.getvalue())
    np.save(split / SOFT_LABELS_FILE, np.asarray(bundle.soft_labels, dtype=np.float32))
    return [f"{SPLIT}/{name}" for name in names] + [f"{SPLIT}/{CSV_FILE}", f"{SPLIT}/{SOFT_LABELS_FILE}"]


def _labels_and_names(bundle: release_io.ReleaseDataset) -> dict[str, tuple[np.dtype, tuple[int, ...], list]]:
    """The members every ``.npz`` format shares beside ``x``: hard labels, soft labels and class names."""
    names = np.array(bundle.class_names, dtype=np.str_)
    soft = np.asarray(bundle.soft_labels, dtype=np.float32)
    return {"y": (np.dtype(np.int64), (len(bundle),), [np.asarray(bundle.labels)]),
            SOFT_KEY: (soft.dtype, soft.shape, [soft]),
            CLASS_NAMES_KEY: (names.dtype, names.shape, [names])}


def _write_npz(bundle: release_io.ReleaseDataset, gray: bool, out: Path, progress: bool) -> list[str]:
    channels, height, width = (1 if gray else 3), *bundle.images.shape[2:]
    with _bar(len(bundle), "npz", progress) as bar:
        images = (_counted(_uint8(_pixels(bundle, part, gray)), bar) for part in _parts(len(bundle)))
        _stream_npz(out / NPZ_FILE, {"x": (np.dtype(np.uint8), (len(bundle), height, width, channels), images),
                                     **_labels_and_names(bundle)})
    return [NPZ_FILE]


def _write_gen_npz(bundle: release_io.ReleaseDataset, gray: bool, out: Path, progress: bool) -> list[str]:
    shape = (len(bundle), 1 if gray else 3, *bundle.images.shape[2:])
    with _bar(len(bundle), "gen.npz", progress) as bar:
        images = (_counted(_pixels(bundle, part, gray), bar) for part in _parts(len(bundle)))
        _stream_npz(out / GEN_NPZ_FILE, {"x": (np.dtype(np.float32), shape, images), **_labels_and_names(bundle)})
    return [GEN_NPZ_FILE]


WRITERS = {"imagefolder": _write_imagefolder, "npz": _write_npz, "gen_npz": _write_gen_npz}


def _counted(chunk: np.ndarray, bar: tqdm) -> np.ndarray:
    bar.update(len(chunk))
    return chunk


def _stream_npz(path: Path, members: dict[str, tuple[np.dtype, tuple[int, ...], Iterator[np.ndarray]]]) -> None:
    """Write an ``.npz`` as ``np.savez`` does (stored, zip64), array by array and chunk by chunk, so that
    a release larger than memory exports too."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (dtype, shape, chunks) in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                stream = release_io.NpyStream(member, dtype, shape)
                for chunk in chunks:
                    stream.append(chunk)
                stream.hexdigest()  # refuses a member with missing rows


# --------------------------------------------------------------------------- the record and the folder

def _source(release: Path, bundle: release_io.ReleaseDataset) -> dict:
    """Which release the export came from: its name (no local path) and its files' sha256."""
    return {"name": release.resolve().name, "format": bundle.metadata["format"],
            "version": bundle.metadata["version"],
            "metadata_sha256": sha256_file(release / release_io.METADATA_FILE),
            "files": dict(bundle.metadata["files"])}


def _document(fmt: str, bundle: release_io.ReleaseDataset, block: dict, source: dict, gray: bool,
              files: dict[str, str]) -> dict:
    """The content of ``export.json``: public facts of the release and of the export, nothing else."""
    counts = bundle.metadata["counts"]
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "export_format": fmt,
        "storage": STORAGE[fmt],
        "release": source,
        "dataset": bundle.metadata.get("dataset"),
        "public_set": bundle.metadata.get("public_set"),
        "k": bundle.metadata.get("k"),
        "num_classes": bundle.num_classes,
        "class_names": bundle.class_names,
        **({"class_folders": class_folders(bundle)} if fmt == "imagefolder" else {}),
        "images": {"count": len(bundle), "channels": 1 if gray else 3, "height": int(bundle.images.shape[2]),
                   "width": int(bundle.images.shape[3]), "gray": gray},
        "labels": LABELS_NOTE,
        "soft_labels": {**SOFT_LABELS_AT[fmt], "content": SOFT_LABELS_NOTE},
        "counts": counts,
        "empty_classes": [label for label, count in enumerate(counts["per_class"]) if count == 0],
        "privacy": block,
        "files": files,
    }


def _finished(output: Path, fmt: str, source: dict) -> bool:
    """True if ``output`` holds this very export (checked file by file); ``False`` if it is absent or an
    empty folder; anything else in it is refused, never overwritten."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise DPImgSynError(f"--output {output} is a file; choose a new folder for the export")
    if not any(output.iterdir()):
        return False
    if not (output / EXPORT_FILE).is_file():
        raise DPImgSynError(f"--output {output} exists and is not empty; choose a new folder for the export")
    document = _read_record(output)
    if document.get("version") != EXPORT_VERSION:
        raise DPImgSynError(f"{output} holds an export of format version {document.get('version')!r}, this code "
                            f"writes version {EXPORT_VERSION}; delete it and export again")
    if document.get("export_format") != fmt or document.get("release") != source:
        raise DPImgSynError(f"{output} holds another export ({document.get('export_format')} of release "
                            f"{(document.get('release') or {}).get('name')!r}); choose another --output or delete it")
    verify_export(output)
    return True


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the finished export to ``output`` in one step (an empty ``output`` folder is replaced)."""
    if output.is_dir():
        output.rmdir()  # empty, checked by _finished; rmdir refuses otherwise
    try:
        os.rename(staging, output)
    except OSError as exc:
        raise DPImgSynError(f"cannot create {output} ({exc.strerror}); choose another --output") from None
