"""The release bundle: a folder of plain ``.npy`` arrays plus ``metadata.json`` and ``preview.png``.

Writing is sharded so that a killed synthesis run resumes where it stopped: every shard is written
atomically with its sha256 beside it, and a shard counts as done only if that checksum verifies, so
partial or corrupted shards are regenerated. :meth:`ReleaseWriter.finalize` concatenates the shards
into the final arrays and writes ``metadata.json`` last; its presence marks a complete release.

Three kinds of label travel with the images: ``soft_labels.npy`` (the teacher's logits),
``labels.npy`` (the teacher's hard labels, their argmax, computed here from the soft labels) and
``targets.npy`` (the classes the synthesis *optimized towards*, e.g. cyclic 0..C-1). Only the
first two say what the teacher sees in an image, so class counts count ``labels``; the targets
are kept for analysis, with the rate at which the teacher agrees with them.

Reading needs nothing but numpy and torch: :func:`load` memory-maps the arrays and returns a torch
``Dataset`` of ``(image, soft_label, target)`` whose ``labels`` array holds the teacher's labels.
Releases of format version 1 (no ``labels.npy``, class counts of the targets) are read too: their
labels and counts are derived from the soft labels on loading.

``metadata.json`` may name the classes (``class_names``: label i is the i-th name, the private set's
public schema as the teacher records it); a release without names reads as ``"0"``..``"C-1"``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch.utils.data import Dataset

from common.errors import DPImgSynError
from common.files import atomic_path, atomic_write_text, sha256_file

FORMAT = "dpimgsyn.release"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no labels.npy, counts.per_class counted the targets
METADATA_FILE = "metadata.json"
PREVIEW_FILE = "preview.png"
SHARDS_DIR = ".shards"
SETTINGS_FILE = "settings.json"
# Final array files: name -> (dtype, shard key). Order fixes the order they are written and listed.
ARRAY_FILES: dict[str, tuple[np.dtype, str]] = {
    "images.npy": (np.dtype(np.float32), "images"),
    "soft_labels.npy": (np.dtype(np.float32), "soft_labels"),
    "targets.npy": (np.dtype(np.int64), "targets"),
}
LABELS_FILE = "labels.npy"  # derived by finalize() from the soft labels, not written by shards
RELEASE_FILES = (*ARRAY_FILES, LABELS_FILE, PREVIEW_FILE)
# Keys finalize() adds to the caller's metadata; the caller must not use them.
RESERVED_METADATA_KEYS = ("format", "version", "counts", "files", "release_settings")
PREVIEW_MAX_CLASSES = 16
CLASS_NAMES_KEY = "class_names"  # registry.CLASS_NAMES_KEY: the teacher's record, copied into the metadata


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the keys whose values differ between two JSON-like dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in old or key not in new:
                found.append(f"{name}: {'missing' if key not in old else old[key]!r} -> "
                             f"{'missing' if key not in new else new[key]!r}")
            else:
                found.extend(_differences(old[key], new[key], f"{name}."))
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _read_metadata(out_dir: Path) -> dict | None:
    """The release's metadata, ``None`` if there is no ``metadata.json``; unreadable -> DPImgSynError."""
    path = out_dir / METADATA_FILE
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DPImgSynError(f"{path} cannot be read ({exc}); the release is damaged: regenerate it "
                            "or download it again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DPImgSynError(f"{path} is not the metadata of a DP-ImgSyn release "
                            f"(expected \"format\": \"{FORMAT}\"); point to a release folder")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise DPImgSynError(f"{path} has release format version {metadata.get('version')!r}; this code reads "
                            f"versions {', '.join(map(str, READABLE_VERSIONS))}: use the matching version of the code")
    return metadata


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished release (its ``metadata.json`` is written last)."""
    try:
        return _read_metadata(Path(out_dir)) is not None
    except DPImgSynError:
        return False


def check_class_names(names: Any, num_classes: int, what: str, fix: str = "regenerate it") -> list[str] | None:
    """Recorded class names as a list (``None`` when none are recorded); anything but ``num_classes`` distinct,
    non-empty, printable strings is a one-line error, since names become folder names and table cells."""
    if names is None:
        return None
    if not (isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names)):
        raise DPImgSynError(f"{what} records class names that are not a list of strings; {fix}")
    if len(names) != num_classes:
        raise DPImgSynError(f"{what} records {len(names)} class names for {num_classes} classes; {fix}")
    bad = [name for name in names if not name or not name.isprintable()]
    if bad or len(set(names)) != len(names):
        problem = f"empty or unprintable {bad[0]!r}" if bad else "the same name twice"
        raise DPImgSynError(f"{what} records unusable class names ({problem}); {fix}")
    return list(names)


def teacher_labels(soft_labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """The teacher's hard labels: the argmax of its logits (int64; ties go to the lowest class)."""
    return np.asarray(_to_numpy(soft_labels)).argmax(axis=1).astype(np.int64)


class _Counts:
    """The release's ``counts``: images per class by the teacher's labels, per optimization target,
    and the fraction of images whose label equals their target. All of it is computed from the
    teacher's outputs on public-derived images, i.e. from DP outputs only, so it may be published."""

    def __init__(self, num_classes: int) -> None:
        self.per_class = np.zeros(num_classes, dtype=np.int64)
        self.targets_per_class = np.zeros(num_classes, dtype=np.int64)
        self.agreeing = 0

    def add(self, labels: np.ndarray, targets: np.ndarray) -> None:
        self.per_class += np.bincount(labels, minlength=len(self.per_class))
        self.targets_per_class += np.bincount(targets, minlength=len(self.per_class))
        self.agreeing += int(np.count_nonzero(np.asarray(labels) == np.asarray(targets)))

    def as_metadata(self) -> dict:
        total = int(self.per_class.sum())
        return {"num_samples": total, "per_class": self.per_class.tolist(),
                "targets_per_class": self.targets_per_class.tolist(),
                "label_target_agreement": self.agreeing / total if total else 0.0}


def _check_pixels(name: str, array: np.ndarray) -> None:
    """Released images live in pixel space [0, 1]; anything else is a bug upstream."""
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(f"{name} must be finite and within [0, 1] (pixel space); "
                         f"got range [{np.nanmin(array)}, {np.nanmax(array)}]")


class ReleaseWriter:
    """Sharded, resumable, checksummed writer of one release folder.

    ``settings`` are all hyper-parameters that determine the content. They are recorded on first
    use; reopening the folder with the same settings resumes, with different ones it is refused, so
    a resumed run can never mix shards of two different configurations.
    """

    def __init__(self, out_dir: str | Path, *, num_samples: int, shard_size: int,
                 image_shape: tuple[int, int, int], num_classes: int, settings: dict) -> None:
        if num_samples < 1 or shard_size < 1 or num_classes < 1:
            raise ValueError("num_samples, shard_size and num_classes must be positive")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        self.out_dir = Path(out_dir)
        self.num_samples = int(num_samples)
        self.shard_size = int(shard_size)
        self.image_shape = tuple(int(size) for size in image_shape)
        self.num_classes = int(num_classes)
        self.num_shards = math.ceil(self.num_samples / self.shard_size)
        self.identity = json.loads(json.dumps({  # as it reads back from JSON (tuples become lists), for comparisons
            "num_samples": self.num_samples, "shard_size": self.shard_size,
            "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "settings": settings,
        }))
        self._shards_dir = self.out_dir / SHARDS_DIR
        self._adopt_or_refuse()

    def _adopt_or_refuse(self) -> None:
        """Record the settings in a fresh folder, resume a matching one, refuse anything else."""
        metadata = _read_metadata(self.out_dir)
        settings_path = self._shards_dir / SETTINGS_FILE
        if metadata is not None:
            recorded = metadata.get("release_settings")
            what = "a finished release"
        elif settings_path.is_file():
            try:
                recorded = json.loads(settings_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DPImgSynError(f"{settings_path} cannot be read ({exc}); delete {self.out_dir} "
                                    "or choose another --output") from None
            what = "an unfinished release run"
        else:
            strays = [name for name in RELEASE_FILES if (self.out_dir / name).exists()]
            if strays:
                raise DPImgSynError(f"{self.out_dir} holds {', '.join(strays)} but no release settings; "
                                    "choose another --output or delete those files")
            atomic_write_text(settings_path, json.dumps(self.identity, indent=2))
            return
        if recorded != self.identity:
            changes = ("; ".join(_differences(recorded, self.identity)) if isinstance(recorded, dict)
                       else "no settings recorded")
            raise DPImgSynError(f"{what} in {self.out_dir} exists with different settings ({changes}); "
                                "choose another --output or delete it")

    def shard_range(self, index: int) -> tuple[int, int]:
        """``[start, stop)`` sample indices covered by shard ``index``."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index} outside [0, {self.num_shards})")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def _shard_path(self, index: int) -> Path:
        return self._shards_dir / f"shard_{index:06d}.npz"

    def _checksum_path(self, index: int) -> Path:
        return self._shards_dir / f"shard_{index:06d}.sha256"

    def _read_shard_bytes(self, index: int) -> bytes | None:
        """The shard file's bytes if they match the recorded checksum, else ``None``."""
        try:
            expected = self._checksum_path(index).read_text().strip()
            payload = self._shard_path(index).read_bytes()
        except (OSError, UnicodeDecodeError):
            return None
        return payload if hashlib.sha256(payload).hexdigest() == expected else None

    def _load_shard(self, index: int) -> dict[str, np.ndarray] | None:
        """Verified, parsed and shape-checked arrays of one shard, or ``None`` if it is not valid."""
        payload = self._read_shard_bytes(index)
        if payload is None:
            return None
        start, stop = self.shard_range(index)
        expected = self._expected_shapes(stop - start)
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in expected}
        except (ValueError, KeyError, OSError):
            return None
        if any(arrays[key].shape != shape for key, shape in expected.items()):
            return None
        return arrays

    def _expected_shapes(self, count: int) -> dict[str, tuple[int, ...]]:
        return {
            "images": (count, *self.image_shape),
            "initial_images": (count, *self.image_shape),
            "soft_labels": (count, self.num_classes),
            "targets": (count,),
        }

    def pending_shards(self) -> list[int]:
        """Shards still to (re)generate: never written, partially written or failing their checksum."""
        if is_complete(self.out_dir):
            return []
        return [index for index in range(self.num_shards) if self._read_shard_bytes(index) is None]

    def write_shard(self, index: int, *, images: np.ndarray | torch.Tensor,
                    soft_labels: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                    initial_images: np.ndarray | torch.Tensor) -> None:
        """Write shard ``index`` atomically, then its checksum; wrong shapes or values -> ValueError."""
        start, stop = self.shard_range(index)
        arrays = {
            "images": _to_numpy(images).astype(np.float32, copy=False),
            "initial_images": _to_numpy(initial_images).astype(np.float32, copy=False),
            "soft_labels": _to_numpy(soft_labels).astype(np.float32, copy=False),
            "targets": _to_numpy(targets),
        }
        for key, shape in self._expected_shapes(stop - start).items():
            if arrays[key].shape != shape:
                raise ValueError(f"shard {index}: {key} has shape {arrays[key].shape}, expected {shape}")
        _check_pixels("images", arrays["images"])
        _check_pixels("initial_images", arrays["initial_images"])
        if not np.isfinite(arrays["soft_labels"]).all():
            raise ValueError(f"shard {index}: soft_labels contain NaN or infinity")
        labels = arrays["targets"]
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"shard {index}: targets must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"shard {index}: targets must lie in [0, {self.num_classes})")
        arrays["targets"] = labels.astype(np.int64, copy=False)

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        payload = buffer.getvalue()
        # The checksum is written after the shard: a kill in between leaves a shard that fails
        # verification and is therefore regenerated, never trusted.
        with atomic_path(self._shard_path(index)) as tmp:
            tmp.write_bytes(payload)
        atomic_write_text(self._checksum_path(index), hashlib.sha256(payload).hexdigest() + "\n")

    def finalize(self, metadata: dict, preview_per_class: int = 4) -> Path:
        """Assemble the final bundle from the shards; a no-op on a finished release.

        ``metadata`` (JSON-able) is stored with the counts, file checksums, format marker and the
        writer's settings added. ``metadata.json`` is written last, then the shards are removed.
        """
        if is_complete(self.out_dir):
            self.remove_shards()
            return self.out_dir
        clashes = sorted(set(metadata) & set(RESERVED_METADATA_KEYS))
        if clashes:
            raise ValueError(f"metadata keys {clashes} are reserved for the release writer")
        if preview_per_class < 1:
            raise ValueError("preview_per_class must be at least 1")
        pending = self.pending_shards()
        if pending:
            raise DPImgSynError(f"{len(pending)} shard(s) of {self.out_dir} are missing or corrupt "
                                f"(first: {pending[:5]}); rerun the same command to regenerate them")
        self._remove_stale_temp_files()

        counts = _Counts(self.num_classes)
        preview: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        full_shapes = {**self._expected_shapes(self.num_samples), "labels": (self.num_samples,)}
        outputs = {**ARRAY_FILES, LABELS_FILE: (np.dtype(np.int64), "labels")}
        with ExitStack() as stack:
            streams = {
                name: NpyStream(stack.enter_context(open(stack.enter_context(atomic_path(self.out_dir / name)), "wb")),
                                dtype, full_shapes[key])
                for name, (dtype, key) in outputs.items()
            }
            for index in range(self.num_shards):
                shard = self._load_shard(index)
                if shard is None:
                    raise DPImgSynError(f"shard {index} of {self.out_dir} changed while finalizing; "
                                        "rerun the same command to regenerate it")
                shard["labels"] = teacher_labels(shard["soft_labels"])
                for name, (_, key) in outputs.items():
                    streams[name].append(shard[key])
                counts.add(shard["labels"], shard["targets"])
                self._collect_preview(preview, shard, preview_per_class)
            files = {name: stream.hexdigest() for name, stream in streams.items()}

        rows = [np.stack([image for pair in preview[label] for image in pair])
                for label in sorted(preview)[:PREVIEW_MAX_CLASSES]]
        save_image_grid(self.out_dir / PREVIEW_FILE, rows, group=2)
        files[PREVIEW_FILE] = sha256_file(self.out_dir / PREVIEW_FILE)

        document = {
            **metadata,
            "format": FORMAT,
            "version": VERSION,
            "counts": counts.as_metadata(),
            "files": files,
            "release_settings": self.identity,
        }
        atomic_write_text(self.out_dir / METADATA_FILE, json.dumps(document, indent=2) + "\n")
        self.remove_shards()
        return self.out_dir

    def remove_shards(self) -> None:
        """Delete the shards of a finished release (a kill right after ``metadata.json`` was written leaves them)."""
        shutil.rmtree(self._shards_dir, ignore_errors=True)

    @staticmethod
    def _collect_preview(preview: dict[int, list[tuple[np.ndarray, np.ndarray]]],
                         shard: dict[str, np.ndarray], per_class: int) -> None:
        """Keep the first ``per_class`` (initialization, result) pairs of every class, in index order."""
        for row, label in enumerate(shard["targets"].tolist()):
            pairs = preview.setdefault(label, [])
            if len(pairs) < per_class:
                # Copies, so that a rare class seen late does not keep whole shards alive.
                pairs.append((shard["initial_images"][row].copy(), shard["images"][row].copy()))

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a finalize that was killed midway (atomic_path names them ``.<name>.*.tmp``)."""
        for name in (*RELEASE_FILES, METADATA_FILE):
            for leftover in self.out_dir.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)


class NpyStream:
    """Write one ``.npy`` file front to back into ``handle`` (the same bytes as ``np.save``), hashing as it goes.

    Streaming shard by shard (or chunk by chunk, for exports) keeps memory bounded however large the release is.
    """

    def __init__(self, handle: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape, self._rows = dtype, tuple(int(size) for size in shape), 0
        self._hash = hashlib.sha256()
        self._handle = handle
        header = io.BytesIO()
        npy_format.write_array_header_1_0(
            header, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": self.shape})
        self._write(header.getvalue())

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self._hash.update(data)

    def append(self, array: np.ndarray) -> None:
        self._write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self._rows += len(array)

    def hexdigest(self) -> str:
        """The file's sha256, once every row of its shape is written."""
        if self._rows != self.shape[0]:
            raise RuntimeError(f"wrote {self._rows} rows of {self.shape[0]}")
        return self._hash.hexdigest()


class ReleaseDataset(Dataset):
    """A release as a torch Dataset of ``(image CxHxW float32 in [0,1], soft_label, target)``.

    ``labels`` holds the teacher's hard labels (what a classifier trained on the release should
    learn); ``targets`` the classes the synthesis optimized towards. The item keeps the target in
    third place so that existing training loops stay unchanged; ``labels[index]`` is beside it.
    Arrays are memory-mapped, so opening a release costs almost nothing and workers of a
    ``DataLoader`` share the page cache instead of copying the data (pickling reopens the files).
    """

    def __init__(self, root: str | Path, metadata: dict) -> None:
        self.root = Path(root)
        self.images, self.soft_labels, self.targets, self.labels = _open_arrays(self.root, metadata)
        # The names the release records (None: unnamed, e.g. releases made before names were recorded).
        self.recorded_class_names = check_class_names(metadata.get(CLASS_NAMES_KEY), self.num_classes,
                                                      str(self.root / METADATA_FILE), "regenerate the release")
        if _is_legacy(metadata):  # version 1 counted the targets: present its counts in today's meaning
            counts = _Counts(self.num_classes)
            counts.add(self.labels, np.asarray(self.targets))
            metadata = {**metadata, "counts": counts.as_metadata()}
        self.metadata = metadata

    @property
    def num_classes(self) -> int:
        return self.soft_labels.shape[1]

    @property
    def class_names(self) -> list[str]:
        """The recorded class names in label order, else ``"0"``..``"C-1"``."""
        return self.recorded_class_names or [str(label) for label in range(self.num_classes)]

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = int(index)
        return (torch.from_numpy(np.array(self.images[index])),
                torch.from_numpy(np.array(self.soft_labels[index])),
                int(self.targets[index]))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole release in memory as ``(images, soft_labels, targets)`` for fast training loops.

        Each file is read straight into a torch-allocated tensor with one read: for a whole-array
        copy that is several times faster and steadier than faulting in the memory map page by page.
        """
        return tuple(_read_into_tensor(self.root / name, mapped)
                     for name, mapped in zip(ARRAY_FILES, (self.images, self.soft_labels, self.targets)))

    def labels_tensor(self) -> torch.Tensor:
        """The teacher's hard labels in memory (int64): the labels to train on with a hard-label loss."""
        if isinstance(self.labels, np.memmap):
            return _read_into_tensor(self.root / LABELS_FILE, self.labels)
        return torch.from_numpy(np.array(self.labels, dtype=np.int64))

    def __getstate__(self) -> dict:
        return {"root": self.root, "metadata": self.metadata}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["metadata"])


def _is_legacy(metadata: dict) -> bool:
    """Format version 1: no ``labels.npy``, and ``counts.per_class`` counted the targets."""
    return metadata.get("version") == 1


def _array_files(metadata: dict) -> dict[str, np.dtype]:
    """The array files a release of this metadata's version holds, with their dtypes."""
    files = {name: dtype for name, (dtype, _) in ARRAY_FILES.items()}
    return files if _is_legacy(metadata) else {**files, LABELS_FILE: np.dtype(np.int64)}


def _read_into_tensor(path: Path, mapped: np.memmap) -> torch.Tensor:
    """Read the data of an ``.npy`` file already validated as ``mapped`` into a new tensor."""
    tensor = torch.empty(mapped.shape, dtype=torch.from_numpy(np.empty(0, mapped.dtype)).dtype)
    buffer = memoryview(tensor.numpy()).cast("B")
    with open(path, "rb") as handle:
        handle.seek(mapped.offset)
        read = handle.readinto(buffer)
    if read != len(buffer):
        raise DPImgSynError(f"{path} changed since the release was opened; load it again")
    return tensor


def _open_arrays(root: Path, metadata: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Memory-map the arrays and check them against each other and the metadata.

    Returns ``(images, soft_labels, targets, labels)``; a version-1 release's labels are the argmax
    of its soft labels, computed here.
    """
    arrays = {}
    for name, dtype in _array_files(metadata).items():
        path = root / name
        if not path.is_file():
            raise DPImgSynError(f"{path} is missing; the release is incomplete: regenerate it or "
                                "download it again")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DPImgSynError(f"{path} cannot be read ({exc}); the file is truncated or corrupt: "
                                "regenerate the release or download it again") from None
        if array.dtype != dtype:
            raise DPImgSynError(f"{path} has dtype {array.dtype}, expected {dtype}; "
                                "regenerate the release")
        arrays[name] = array
    images, soft_labels, targets = (arrays[name] for name in ARRAY_FILES)
    counts = metadata.get("counts")
    if not isinstance(counts, dict) or not isinstance(counts.get("per_class"), list):
        raise DPImgSynError(f"{root / METADATA_FILE} lacks \"counts\"; regenerate the release")
    expected_ndim = {"images.npy": 4, "soft_labels.npy": 2, "targets.npy": 1, LABELS_FILE: 1}
    for name, array in arrays.items():
        if array.ndim != expected_ndim[name]:
            raise DPImgSynError(f"{root / name} has {array.ndim} dimensions, expected {expected_ndim[name]}; "
                                "regenerate the release")
    for name, array in arrays.items():
        if array.shape[0] != counts.get("num_samples"):
            raise DPImgSynError(f"{root / name} holds {array.shape[0]} samples but metadata.json "
                                f"counts {counts.get('num_samples')}; the release is inconsistent: "
                                "regenerate it or download it again")
    num_classes = len(counts["per_class"])
    if soft_labels.shape[1] != num_classes:
        raise DPImgSynError(f"{root / 'soft_labels.npy'} has {soft_labels.shape[1]} columns but the "
                            f"release has {num_classes} classes; regenerate the release")
    labels = arrays[LABELS_FILE] if LABELS_FILE in arrays else teacher_labels(soft_labels)
    for name, values in (("targets.npy", targets), (LABELS_FILE, labels)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise DPImgSynError(f"{root / name} holds labels outside [0, {num_classes}); "
                                "regenerate the release")
    return images, soft_labels, targets, labels


def load(path: str | Path, verify: bool = False) -> ReleaseDataset:
    """Open a release folder (memory-mapped); ``verify`` also checks every file's sha256, that the
    labels are the argmax of the soft labels, and that the recorded counts are those of the arrays.

    A version-1 release loads with its labels derived from the soft labels and its ``metadata``'s
    ``counts`` recomputed in today's meaning: ``per_class`` by the teacher's labels, plus
    ``targets_per_class`` and ``label_target_agreement``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DPImgSynError(f"{root} is not a folder; pass the release folder written by synthesize.py")
    metadata = _read_metadata(root)
    if metadata is None:
        raise DPImgSynError(f"{root / METADATA_FILE} is missing; the release is unfinished or not a "
                            "release: rerun synthesize.py with the same --output to finish it")
    if verify:
        _verify_checksums(root, metadata)
    dataset = ReleaseDataset(root, metadata)
    if verify:
        _verify_labels(dataset)
    return dataset


# What releases trained on together must share: the one DP output they all post-process (the stage-2
# teacher and its privacy block), and what a student needs to read them as one set ("view": a folder:
# set's recorded image size and channels, registry.VIEW_KEY).
SHARED_KEYS = ("teacher_sha256", "privacy", "dataset", "mean", "std", "num_classes", "view")


def refuse_mixed_sources(releases: Sequence[ReleaseDataset]) -> None:
    """Refuse releases that may not train one student together.

    Several releases of one DP teacher with its DP statistics (e.g. k = 0 and k = 10 of one run) are
    post-processing of the same DP outputs: their union keeps the epsilon each of them has. Releases
    of different teachers or statistics are different DP outputs of (possibly) the same records,
    whose union would cost the composition of their budgets, which no release records: refused. So
    are a release given twice (it would count double) and releases the student cannot read as one set.
    """
    first = releases[0]
    for other in releases[1:]:
        differing = [key for key in SHARED_KEYS if first.metadata.get(key) != other.metadata.get(key)]
        if first.images.shape[1:] != other.images.shape[1:]:
            differing.append("image shape")
        if differing:
            raise DPImgSynError(
                f"releases {first.root} and {other.root} differ in {', '.join(differing)}: only releases of the same "
                "DP teacher and statistics (one run's releases) train a student together, at their one epsilon")
    seen: dict[str, Path] = {}
    for release in releases:
        key = json.dumps(release.metadata.get("files"), sort_keys=True)
        if key in seen:
            raise DPImgSynError(f"{release.root} and {seen[key]} are the same release: give each release once")
        seen[key] = release.root


def _verify_checksums(root: Path, metadata: dict) -> None:
    files, required = metadata.get("files"), _array_files(metadata)
    if not isinstance(files, dict) or not set(required) <= set(files):
        raise DPImgSynError(f"{root / METADATA_FILE} lacks checksums for {', '.join(required)}; "
                            "cannot verify: regenerate the release")
    for name, digest in files.items():
        if name not in (*required, PREVIEW_FILE):
            raise DPImgSynError(f"{root / METADATA_FILE} lists an unexpected file {name!r}; "
                                "the metadata was tampered with: download the release again")
        path = root / name
        if not path.is_file():
            raise DPImgSynError(f"{path} is missing; regenerate the release or download it again")
        if sha256_file(path) != digest:
            raise DPImgSynError(f"{path} does not match its sha256 in metadata.json; the file is "
                                "corrupt or was modified: regenerate the release or download it again")


def _verify_labels(dataset: ReleaseDataset) -> None:
    """Labels that mean what they say: the soft labels' argmax, counted as the metadata records."""
    root, labels = dataset.root, np.asarray(dataset.labels)
    if not np.array_equal(labels, teacher_labels(dataset.soft_labels)):
        raise DPImgSynError(f"{root / LABELS_FILE} is not the argmax of soft_labels.npy; the release is "
                            "inconsistent: regenerate it or download it again")
    counts = _Counts(dataset.num_classes)
    counts.add(labels, np.asarray(dataset.targets))
    recorded = dataset.metadata["counts"]
    if any(recorded.get(key) != value for key, value in counts.as_metadata().items()):  # floats survive JSON exactly
        raise DPImgSynError(f"the counts in {root / METADATA_FILE} are not those of its labels and targets; "
                            "the metadata was altered: regenerate the release or download it again")


def save_image_grid(path: str | Path, rows: Sequence[np.ndarray | torch.Tensor], *,
                    min_tile: int = 64, padding: int = 2, group: int = 1, private: bool = False) -> None:
    """Write a PNG grid; each row is an (K, C, H, W) batch in [0, 1] with C = 1 or 3; ``private``: a grid
    showing private images, owner-only (0600).

    Tiles are upscaled (nearest neighbour) to at least ``min_tile`` pixels so that 28-32 px images
    stay readable; an extra gap after every ``group`` tiles separates e.g. (before, after) pairs.
    """
    from PIL import Image  # only writers need PIL; readers of a release need numpy and torch only

    batches = [np.clip(_to_numpy(row).astype(np.float32, copy=False), 0.0, 1.0) for row in rows]
    if not batches or any(batch.ndim != 4 or len(batch) == 0 for batch in batches):
        raise ValueError("rows must be a non-empty list of non-empty (K, C, H, W) arrays")
    shapes = {batch.shape[1:] for batch in batches}
    if len(shapes) != 1:
        raise ValueError(f"all images must share one (C, H, W) shape, got {sorted(shapes)}")
    channels, height, width = shapes.pop()
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    scale = max(1, math.ceil(min_tile / max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    columns = max(len(batch) for batch in batches)

    group_gap = padding if group > 1 else 0

    def offset(position: int, tile: int) -> int:
        return padding + position * (tile + padding) + (position // group) * group_gap

    canvas_h = padding + len(batches) * (tile_h + padding)
    canvas_w = offset(columns - 1, tile_w) + tile_w + padding
    canvas = np.full((canvas_h, canvas_w, channels), 255, dtype=np.uint8)
    for row, batch in enumerate(batches):
        pixels = np.rint(batch * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        top = padding + row * (tile_h + padding)
        for column, tile in enumerate(pixels):
            left = offset(column, tile_w)
            canvas[top:top + tile_h, left:left + tile_w] = tile
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    with atomic_path(path, private=private) as tmp:
        image.save(tmp, format="PNG")
