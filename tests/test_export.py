"""export_release: every format read back without this project's code (numpy, PIL, torchvision), the
teacher's labels rather than the synthesis targets, gray kept one channel, checksums, and refusals."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import export_release
from common.errors import DPImgSynError
from privacy import mechanism_entry, privacy_block
from synthesizer.export import EXPORT_FILE, ExportConfig, export, is_gray
from synthesizer.export import export_release as run_export
from synthesizer.release import ReleaseWriter, load

BLOCK = privacy_block([mechanism_entry("dp_sgd", 1.0, 0.01, 100, 1.0)], 1e-5, accountant="rdp")
GRAY = {"dataset": "mnist5k", "mean": [0.1307] * 3, "std": [0.3081] * 3}
COLOUR = {"dataset": "cifar10", "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
EXPORT_KEYS = {"format", "version", "export_format", "storage", "release", "dataset", "public_set", "k",
               "num_classes", "class_names", "images", "labels", "soft_labels", "counts", "empty_classes", "privacy",
               "files"}


def make_release(root: Path, *, gray: bool, num_classes: int = 3, count: int = 20, side: int = 8,
                 dataset: dict | None = None, channels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A finished release whose teacher disagrees with the cyclic targets; gray content is repeated."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, 1 if gray else channels, side, side), dtype=np.float32)
    if gray and channels == 3:
        images = np.repeat(images, 3, axis=1)
    images[0] = 0.0
    images[1] = 1.0  # the ends of the pixel range survive every format
    teacher = rng.permutation(np.arange(count) % max(num_classes - 1, 1))  # the last class stays empty
    soft = (np.eye(num_classes, dtype=np.float32)[teacher] * 4 + rng.standard_normal((count, num_classes)) * 0.1)
    data = {"images": images, "initial_images": images, "soft_labels": soft.astype(np.float32),
            "targets": np.arange(count, dtype=np.int64) % num_classes}
    writer = ReleaseWriter(root, num_samples=count, shard_size=8, image_shape=images.shape[1:],
                           num_classes=num_classes, settings={"seed": seed})
    for index in range(writer.num_shards):
        start, stop = writer.shard_range(index)
        writer.write_shard(index, **{key: value[start:stop] for key, value in data.items()})
    writer.finalize({"privacy": BLOCK, "public_set": "photos", "k": 2, **(dataset or (GRAY if gray else COLOUR))})
    return {**data, "labels": data["soft_labels"].argmax(axis=1)}


def check_soft_labels_and_names(path: Path, data: dict, names: list[str]) -> None:
    """The .npz carries the release's soft labels (distillation) and its class names, readable without pickle."""
    with np.load(path, allow_pickle=False) as archive:
        assert archive["soft"].dtype == np.float32
        np.testing.assert_array_equal(archive["soft"], data["soft_labels"])
        assert archive["class_names"].dtype.kind == "U" and archive["class_names"].tolist() == names


def quantized(images: np.ndarray) -> np.ndarray:
    """The uint8 pixels of N x C x H x W images in [0, 1], as N x H x W x C."""
    return np.rint(images * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def check_record(out: Path, release: Path, fmt: str, channels: int) -> dict:
    """export.json: only public facts, the release's privacy block and files, and true checksums."""
    record = json.loads((out / EXPORT_FILE).read_text())
    assert set(record) == EXPORT_KEYS | ({"class_folders"} if fmt == "imagefolder" else set())
    assert record["soft_labels"]["file"] in record["files"] and "logits" in record["soft_labels"]["content"]
    metadata = json.loads((release / "metadata.json").read_text())
    assert record["export_format"] == fmt and record["privacy"] == metadata["privacy"]
    assert record["release"]["files"] == metadata["files"] and record["release"]["name"] == release.name
    assert record["release"]["metadata_sha256"] == hashlib.sha256((release / "metadata.json").read_bytes()).hexdigest()
    assert record["counts"] == metadata["counts"] and record["images"]["channels"] == channels
    on_disk = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()} - {EXPORT_FILE}
    assert set(record["files"]) == on_disk
    for name, digest in record["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    return record


@pytest.mark.parametrize("gray", [True, False], ids=["gray", "colour"])
def test_npz_round_trip(tmp_path: Path, gray: bool) -> None:
    data = make_release(tmp_path / "release", gray=gray)
    out = run_export(tmp_path / "release", "npz", tmp_path / "out", progress=False)
    with np.load(out / "dataset.npz", allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"]
    assert x.dtype == np.uint8 and x.shape == (20, 8, 8, 1 if gray else 3)
    np.testing.assert_array_equal(x, quantized(data["images"][:, :1] if gray else data["images"]))
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, data["labels"])
    assert not np.array_equal(y, data["targets"])  # the teacher's labels, not the synthesis targets
    check_soft_labels_and_names(out / "dataset.npz", data, ["0", "1", "2"])
    record = check_record(out, tmp_path / "release", "npz", 1 if gray else 3)
    assert record["empty_classes"] == [2]
    assert record["soft_labels"] == {"file": "dataset.npz", "key": "soft", "content": record["soft_labels"]["content"]}
    assert record["class_names"] == ["0", "1", "2"]  # an unnamed release: its labels


def test_gen_npz_round_trip_keeps_the_release_values(tmp_path: Path) -> None:
    data = make_release(tmp_path / "release", gray=True)
    out = run_export(tmp_path / "release", "gen_npz", tmp_path / "out", progress=False)
    with np.load(out / "gen.npz", allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"]
    assert x.dtype == np.float32 and x.shape == (20, 1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(x, data["images"][:, :1])
    np.testing.assert_array_equal(y, data["labels"])
    check_soft_labels_and_names(out / "gen.npz", data, ["0", "1", "2"])
    assert check_record(out, tmp_path / "release", "gen_npz", 1)["soft_labels"]["key"] == "soft"


@pytest.mark.parametrize("gray, num_classes", [(True, 3), (False, 12)], ids=["gray", "colour_12_classes"])
def test_imagefolder_round_trip_with_torchvision_pil_and_the_csv(tmp_path: Path, gray: bool, num_classes: int) -> None:
    data = make_release(tmp_path / "release", gray=gray, num_classes=num_classes, count=30)
    out = run_export(tmp_path / "release", "imagefolder", tmp_path / "out", progress=False)
    check_record(out, tmp_path / "release", "imagefolder", 1 if gray else 3)
    width = len(str(num_classes - 1))
    folder = ImageFolder(str(out / "train"), allow_empty=True)  # the last class has no image
    assert folder.classes == [f"{label:0{width}d}" for label in range(num_classes)]
    assert folder.class_to_idx == {name: int(name) for name in folder.classes}
    expected = quantized(data["images"][:, :1] if gray else data["images"])
    seen = set()
    for path, label in folder.samples:
        index = int(Path(path).stem)
        seen.add(index)
        assert label == data["labels"][index]
        with Image.open(path) as image:
            assert image.mode == ("L" if gray else "RGB")
            pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, expected[index, ..., 0] if gray else expected[index])
    assert seen == set(range(30))
    with open(out / "train" / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file_name", "label"] and len(rows) == 30
    by_csv = {str(out / "train" / row["file_name"]): int(row["label"]) for row in rows}
    assert by_csv == dict(folder.samples)
    # The soft labels in index order: row i is the image numbered i, the i-th row of metadata.csv.
    assert [int(Path(row["file_name"]).stem) for row in rows] == list(range(30))
    soft = np.load(out / "train" / "soft_labels.npy", allow_pickle=False)
    assert soft.dtype == np.float32
    np.testing.assert_array_equal(soft, data["soft_labels"])


@pytest.mark.parametrize("names, folders", [
    (["ant", "bee", "cow"], ["ant", "bee", "cow"]),  # a folder: set's names sort in label order: kept as they are
    (["T-shirt/top", "Trouser", "Pullover"], ["0_T-shirt_top", "1_Trouser", "2_Pullover"]),  # unsorted, unsafe
    (["b", "a,c", ".x"], ["0_b", "1_a,c", "2_.x"]),  # unsorted; a comma and a leading dot survive the prefix
], ids=["sorted", "unsorted", "odd"])
def test_named_classes_name_the_folders_and_sorted_order_stays_label_order(tmp_path: Path, names, folders) -> None:
    data = make_release(tmp_path / "release", gray=False, count=30, dataset={**COLOUR, "class_names": names})
    out = run_export(tmp_path / "release", "imagefolder", tmp_path / "out", progress=False)
    record = check_record(out, tmp_path / "release", "imagefolder", 3)
    assert record["class_names"] == names and record["class_folders"] == folders
    folder = ImageFolder(str(out / "train"), allow_empty=True)
    assert folder.classes == sorted(folders) and folder.class_to_idx == {name: folders.index(name) for name in folders}
    assert {int(Path(path).stem): label for path, label in folder.samples} == dict(enumerate(data["labels"].tolist()))
    with open(out / "train" / "metadata.csv", newline="") as handle:
        by_csv = {str(out / "train" / row["file_name"]): int(row["label"]) for row in csv.DictReader(handle)}
    assert by_csv == dict(folder.samples)
    run_export(tmp_path / "release", "npz", tmp_path / "npz", progress=False)
    check_soft_labels_and_names(tmp_path / "npz" / "dataset.npz", data, names)


def test_an_export_of_another_format_version_is_not_taken_for_this_one(tmp_path: Path) -> None:
    make_release(tmp_path / "release", gray=True)
    out = run_export(tmp_path / "release", "npz", tmp_path / "out", progress=False)
    record = json.loads((out / EXPORT_FILE).read_text())
    (out / EXPORT_FILE).write_text(json.dumps({**record, "version": 1}))  # made before soft labels were exported
    with pytest.raises(DPImgSynError, match="format version 1, this code writes version 2; delete it"):
        run_export(tmp_path / "release", "npz", out, progress=False)


def test_huggingface_imagefolder_reads_the_csv_labels(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    data = make_release(tmp_path / "release", gray=True)
    out = run_export(tmp_path / "release", "imagefolder", tmp_path / "out", progress=False)
    train = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(train.features["label"], datasets.Value)  # from train/metadata.csv, not the folder names
    by_pixels = {np.asarray(row["image"]).tobytes(): row["label"] for row in train}
    expected = quantized(data["images"][:, :1])[..., 0]
    assert by_pixels == {expected[index].tobytes(): int(data["labels"][index]) for index in range(20)}


def test_gray_is_decided_by_the_dataset_and_the_pixels(tmp_path: Path) -> None:
    make_release(tmp_path / "gray", gray=True)
    assert is_gray(load(tmp_path / "gray"))
    make_release(tmp_path / "one_channel", gray=True, channels=1, dataset={"dataset": "folder:digits"})
    assert is_gray(load(tmp_path / "one_channel"))
    # Equal channels of a colour dataset stay colour; an unknown dataset needs equal constants too.
    make_release(tmp_path / "colour_set", gray=True, dataset=COLOUR)
    assert not is_gray(load(tmp_path / "colour_set"))
    make_release(tmp_path / "unknown_equal", gray=True, dataset={"dataset": "retired_set", **{
        key: GRAY[key] for key in ("mean", "std")}})
    assert is_gray(load(tmp_path / "unknown_equal"))
    make_release(tmp_path / "folder_rgb", gray=True, dataset={"dataset": "folder:photos", "mean": [0.5] * 3,
                                                               "std": [0.5] * 3})
    assert not is_gray(load(tmp_path / "folder_rgb"))
    make_release(tmp_path / "colour", gray=False, dataset={"dataset": "retired_set", "mean": [0.5] * 3,
                                                          "std": [0.5] * 3})
    assert not is_gray(load(tmp_path / "colour"))


def test_version_1_release_exports_the_teachers_labels(tmp_path: Path) -> None:
    release = tmp_path / "release"
    data = make_release(release, gray=True)
    metadata = json.loads((release / "metadata.json").read_text())
    (release / "labels.npy").unlink()
    del metadata["files"]["labels.npy"]
    metadata.update(version=1, counts={"num_samples": 20, "per_class": np.bincount(data["targets"]).tolist()})
    (release / "metadata.json").write_text(json.dumps(metadata))
    out = run_export(release, "npz", tmp_path / "out", progress=False)
    with np.load(out / "dataset.npz") as archive:
        np.testing.assert_array_equal(archive["y"], data["labels"])
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["counts"]["per_class"] == np.bincount(data["labels"], minlength=3).tolist()
    assert record["release"]["version"] == 1


def test_outputs_are_never_overwritten(tmp_path: Path, capsys) -> None:
    release = tmp_path / "release"
    make_release(release, gray=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DPImgSynError, match="exists and is not empty"):
        run_export(release, "npz", busy, progress=False)
    assert [path.name for path in busy.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_export(release, "npz", empty, progress=False)
    before = {path: path.read_bytes() for path in out.iterdir()}
    assert run_export(release, "npz", out, progress=False) == out  # the same export: found done
    assert "already holds this export" in capsys.readouterr().out
    assert {path: path.read_bytes() for path in out.iterdir()} == before
    with pytest.raises(DPImgSynError, match="holds another export"):
        run_export(release, "gen_npz", out, progress=False)
    (out / "dataset.npz").write_bytes(b"damaged")
    with pytest.raises(DPImgSynError, match="does not match its sha256"):
        run_export(release, "npz", out, progress=False)
    with pytest.raises(DPImgSynError, match="inside the release"):
        run_export(release, "npz", release / "export", progress=False)
    assert not list(tmp_path.glob(".*.tmp")), "no staging folder is left behind"


def test_cli_one_line_errors_and_help(tmp_path: Path, capsys) -> None:
    release = tmp_path / "release"
    make_release(release, gray=False)
    assert export(ExportConfig(release=str(release), format="npz", output=str(tmp_path / "a"), progress=False))
    help_text = export_release.build_parser().format_help()
    assert "--format {imagefolder,npz,gen_npz}" in help_text and "--output" in help_text
    arrays = np.load(release / "images.npy")
    arrays[3, 0, 0, 0] = 0.5 if arrays[3, 0, 0, 0] != 0.5 else 0.25
    np.save(release / "images.npy", arrays)
    cases = [(["--release", str(tmp_path / "missing")], "is not a folder"),
             (["--release", str(release)], "images.npy does not match its sha256"),
             (["--release", str(release), "--format", "png"], "invalid choice")]
    for argv, message in cases:
        argv = [*argv, "--output", str(tmp_path / "b")] + ([] if "--format" in argv else ["--format", "npz"])
        with pytest.raises(SystemExit) as exit_info:
            export_release.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "b").exists()
