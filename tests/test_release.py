"""Release bundle: sharded resumable writer, checksums, finalize, memory-mapped reader, preview."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import DPImgSynError
from synthesizer.release import ReleaseDataset, ReleaseWriter, is_complete, load, save_image_grid

NUM_SAMPLES, SHARD_SIZE, NUM_CLASSES = 10, 4, 3
IMAGE_SHAPE = (3, 6, 6)
SETTINGS = {"g_steps": 5, "public_set": "photos", "loss_weights": {"bn": 10.0, "oh": 1.0}, "seed": 7}
METADATA = {"privacy": {"epsilon": 1.5, "delta": 1e-5}, "public_set": "photos", "k": 5}


def make_data(seed: int = 0, num_samples: int = NUM_SAMPLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.random((num_samples, *IMAGE_SHAPE), dtype=np.float32),
        "initial_images": rng.random((num_samples, *IMAGE_SHAPE), dtype=np.float32),
        "soft_labels": rng.standard_normal((num_samples, NUM_CLASSES)).astype(np.float32),
        "targets": np.arange(num_samples, dtype=np.int64) % NUM_CLASSES,
    }


def make_writer(out_dir: Path, settings: dict = SETTINGS, **overrides) -> ReleaseWriter:
    layout = {"num_samples": NUM_SAMPLES, "shard_size": SHARD_SIZE, "image_shape": IMAGE_SHAPE,
              "num_classes": NUM_CLASSES, **overrides}
    return ReleaseWriter(out_dir, settings=settings, **layout)


def write(writer: ReleaseWriter, data: dict[str, np.ndarray], indices, as_tensors: bool = False) -> None:
    for index in indices:
        start, stop = writer.shard_range(index)
        part = {key: value[start:stop] for key, value in data.items()}
        if as_tensors:
            part = {key: torch.from_numpy(value) for key, value in part.items()}
        writer.write_shard(index, **part)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def shard_file(out_dir: Path, index: int, suffix: str = "npz") -> Path:
    return out_dir / ".shards" / f"shard_{index:06d}.{suffix}"


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    data = make_data()
    writer = make_writer(tmp_path / "release")
    write(writer, data, range(writer.num_shards))
    writer.finalize(METADATA)
    return tmp_path / "release", data


def test_shard_layout_covers_every_sample_once(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "out")
    assert writer.num_shards == 3
    assert [writer.shard_range(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert writer.pending_shards() == [0, 1, 2]
    with pytest.raises(IndexError):
        writer.shard_range(3)


def test_out_of_order_shards_round_trip(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    data = make_data()
    writer = make_writer(out_dir)
    write(writer, data, [2, 0], as_tensors=True)
    write(writer, data, [1])
    assert writer.pending_shards() == []
    assert not is_complete(out_dir)
    assert writer.finalize(METADATA) == out_dir
    assert is_complete(out_dir)
    assert not (out_dir / ".shards").exists()

    dataset = load(out_dir, verify=True)
    assert isinstance(dataset.images, np.memmap)
    for key, name in [("images", "images"), ("soft_labels", "soft_labels"), ("targets", "targets")]:
        stored = getattr(dataset, name)
        np.testing.assert_array_equal(stored, data[key])
        assert stored.dtype == data[key].dtype
    assert dataset.images.shape == (NUM_SAMPLES, *IMAGE_SHAPE)
    # The arrays are byte-for-byte what np.save writes, so any numpy user can read them.
    expected = {**data, "labels": data["soft_labels"].argmax(axis=1).astype(np.int64)}
    for name in ("images", "soft_labels", "targets", "labels"):
        buffer = io.BytesIO()
        np.save(buffer, expected[name])
        assert (out_dir / f"{name}.npy").read_bytes() == buffer.getvalue()
    np.testing.assert_array_equal(dataset.labels, expected["labels"])

    image, soft_label, target = dataset[4]
    assert image.dtype == torch.float32 and image.shape == IMAGE_SHAPE
    assert soft_label.dtype == torch.float32 and soft_label.shape == (NUM_CLASSES,)
    assert target == 1 and isinstance(target, int)

    metadata = json.loads((out_dir / "metadata.json").read_text())
    assert metadata["privacy"] == METADATA["privacy"] and metadata["k"] == 5
    assert metadata["format"] == "dpimgsyn.release" and metadata["version"] == 2
    labels = data["soft_labels"].argmax(axis=1)
    assert metadata["counts"] == {"num_samples": 10, "per_class": np.bincount(labels, minlength=3).tolist(),
                                  "targets_per_class": [4, 3, 3],
                                  "label_target_agreement": float(np.mean(labels == data["targets"]))}
    assert metadata["release_settings"]["settings"] == SETTINGS
    assert set(metadata["files"]) == {"images.npy", "soft_labels.npy", "targets.npy", "labels.npy", "preview.png"}
    for name, digest in metadata["files"].items():
        assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == digest


def test_preview_shows_initialization_next_to_result(release) -> None:
    out_dir, data = release
    with Image.open(out_dir / "preview.png") as preview:
        preview.load()
        assert preview.format == "PNG" and preview.mode == "RGB"
        pixels = np.asarray(preview)
    # 6 px images are upscaled to >= 64 px tiles; 3 classes as rows, 4 (init, result) pairs per row
    # except classes 1 and 2, which have 3 samples each.
    tile = 66
    assert pixels.shape[0] == 2 + 3 * (tile + 2)
    assert pixels.shape[1] > 8 * tile
    first_init = np.rint(data["initial_images"][0] * 255).astype(np.uint8).transpose(1, 2, 0)
    first_result = np.rint(data["images"][0] * 255).astype(np.uint8).transpose(1, 2, 0)

    def upscale(image: np.ndarray) -> np.ndarray:
        return image.repeat(11, axis=0).repeat(11, axis=1)

    np.testing.assert_array_equal(pixels[2:2 + tile, 2:2 + tile], upscale(first_init))
    np.testing.assert_array_equal(pixels[2:2 + tile, 4 + tile:4 + 2 * tile], upscale(first_result))


def test_save_image_grid_grayscale_and_validation(tmp_path: Path) -> None:
    rows = [torch.zeros(3, 1, 28, 28), torch.ones(2, 1, 28, 28)]
    save_image_grid(tmp_path / "grid.png", rows, min_tile=56, padding=1)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "L"
        assert grid.size == (1 + 3 * (56 + 1), 1 + 2 * (56 + 1))
        assert grid.getpixel((1, 1)) == 0 and grid.getpixel((1, 58)) == 255
    with pytest.raises(ValueError, match="share one"):
        save_image_grid(tmp_path / "bad.png", [np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 9, 9))])
    with pytest.raises(ValueError, match="channels"):
        save_image_grid(tmp_path / "bad.png", [np.zeros((1, 2, 8, 8))])
    assert not (tmp_path / "bad.png").exists()


def test_resume_reports_only_missing_shards(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    data = make_data()
    write(make_writer(out_dir), data, [0, 2])
    resumed = make_writer(out_dir, settings=json.loads(json.dumps(SETTINGS)))
    assert resumed.pending_shards() == [1]


@pytest.mark.parametrize("change", [
    {"settings": {**SETTINGS, "g_steps": 6}},
    {"num_samples": NUM_SAMPLES + 1},
    {"shard_size": SHARD_SIZE + 1},
    {"image_shape": (1, 6, 6)},
])
def test_different_settings_refused_and_nothing_touched(tmp_path: Path, change: dict) -> None:
    out_dir = tmp_path / "release"
    write(make_writer(out_dir), make_data(), [0, 2])
    before = snapshot(out_dir)
    with pytest.raises(DPImgSynError, match="different settings.*choose another --output or delete it"):
        make_writer(out_dir, **change)
    assert snapshot(out_dir) == before


def test_finished_release_refuses_other_settings_and_finalize_is_idempotent(release) -> None:
    out_dir, _ = release
    before = snapshot(out_dir)
    with pytest.raises(DPImgSynError, match="finished release.*g_steps: 5 -> 6"):
        make_writer(out_dir, settings={**SETTINGS, "g_steps": 6})
    again = make_writer(out_dir)
    assert again.pending_shards() == []
    assert again.finalize({"other": "metadata"}) == out_dir
    assert snapshot(out_dir) == before


def test_folder_with_foreign_release_files_is_refused(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    out_dir.mkdir()
    np.save(out_dir / "images.npy", np.zeros(3))
    with pytest.raises(DPImgSynError, match="images.npy but no release settings"):
        make_writer(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["images.npy"]


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_flip_byte(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    path.write_bytes(bytes(payload))


@pytest.mark.parametrize("damage", [
    corrupt_truncate,
    corrupt_flip_byte,
    lambda path: path.with_suffix(".sha256").unlink(),
    lambda path: path.unlink(),
], ids=["truncated", "flipped_byte", "missing_checksum", "missing_shard"])
def test_damaged_shard_is_pending_and_regenerated(tmp_path: Path, damage) -> None:
    out_dir = tmp_path / "release"
    data = make_data()
    writer = make_writer(out_dir)
    write(writer, data, range(writer.num_shards))
    damage(shard_file(out_dir, 1))
    resumed = make_writer(out_dir)
    assert resumed.pending_shards() == [1]
    with pytest.raises(DPImgSynError, match="missing or corrupt"):
        resumed.finalize(METADATA)
    assert not is_complete(out_dir)
    write(resumed, data, resumed.pending_shards())
    resumed.finalize(METADATA)
    np.testing.assert_array_equal(load(out_dir, verify=True).images, data["images"])


def test_leftover_temp_file_is_never_taken_for_a_shard(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    data = make_data()
    writer = make_writer(out_dir)
    write(writer, data, [0, 1, 2])
    complete_bytes = shard_file(out_dir, 2).read_bytes()
    for suffix in ("npz", "sha256"):
        shard_file(out_dir, 2, suffix).unlink()
    # A killed writer leaves the finished bytes under a temp name: still not a shard.
    (out_dir / ".shards" / ".shard_000002.npz.k1ll3d.tmp").write_bytes(complete_bytes)
    (out_dir / ".images.npy.x7.tmp").write_bytes(b"half")
    assert make_writer(out_dir).pending_shards() == [2]
    write(writer, data, [2])
    writer.finalize(METADATA)
    assert not list(out_dir.glob(".*.tmp"))


def test_finalized_bundle_identical_after_simulated_kill(tmp_path: Path) -> None:
    data = make_data(seed=3)
    clean = make_writer(tmp_path / "clean")
    write(clean, data, range(clean.num_shards))
    clean.finalize(METADATA)

    killed = make_writer(tmp_path / "resumed")
    write(killed, data, [0])
    # The kill happened while writing shard 1: half a file, no checksum.
    start, stop = killed.shard_range(1)
    killed.write_shard(1, **{key: value[start:stop] for key, value in data.items()})
    corrupt_truncate(shard_file(tmp_path / "resumed", 1))
    shard_file(tmp_path / "resumed", 1, "sha256").unlink()
    del killed

    resumed = make_writer(tmp_path / "resumed")
    assert resumed.pending_shards() == [1, 2]
    write(resumed, data, resumed.pending_shards())
    resumed.finalize(METADATA)
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "clean")


@pytest.mark.parametrize("key, value", [
    ("images", 1.5),
    ("images", -0.01),
    ("images", np.nan),
    ("initial_images", 1.0001),
])
def test_pixels_outside_unit_range_refused(tmp_path: Path, key: str, value: float) -> None:
    out_dir = tmp_path / "release"
    writer = make_writer(out_dir)
    data = make_data()
    data[key][1, 0, 2, 3] = value
    with pytest.raises(ValueError, match=rf"{key} must be finite and within \[0, 1\]"):
        write(writer, data, [0])
    assert not shard_file(out_dir, 0).exists()
    assert writer.pending_shards() == [0, 1, 2]


@pytest.mark.parametrize("key, value, message", [
    ("soft_labels", np.zeros((4, NUM_CLASSES + 1), np.float32), "soft_labels has shape"),
    ("targets", np.array([0, 1, 2, 3]), r"targets must lie in \[0, 3\)"),
    ("targets", np.zeros(4, np.float32), "targets must be integers"),
    ("images", np.zeros((3, *IMAGE_SHAPE), np.float32), "images has shape"),
])
def test_malformed_shard_refused(tmp_path: Path, key: str, value: np.ndarray, message: str) -> None:
    writer = make_writer(tmp_path / "release")
    part = {k: v[:4] for k, v in make_data().items()}
    part[key] = value
    with pytest.raises(ValueError, match=message):
        writer.write_shard(0, **part)


def test_dataset_works_with_dataloader_and_stays_memory_mapped(release) -> None:
    out_dir, data = release
    dataset = load(out_dir)
    assert isinstance(dataset, ReleaseDataset) and len(dataset) == NUM_SAMPLES and dataset.num_classes == 3
    assert all(isinstance(array, np.memmap) for array in (dataset.images, dataset.soft_labels, dataset.targets))
    batches = list(DataLoader(dataset, batch_size=4, shuffle=False))
    images = torch.cat([batch[0] for batch in batches])
    targets = torch.cat([batch[2] for batch in batches])
    assert batches[0][0].shape == (4, *IMAGE_SHAPE) and batches[0][1].shape == (4, NUM_CLASSES)
    assert targets.dtype == torch.int64
    torch.testing.assert_close(images, torch.from_numpy(data["images"]))
    torch.testing.assert_close(targets, torch.from_numpy(data["targets"]))

    all_images, all_soft, all_targets = dataset.tensors()
    torch.testing.assert_close(all_images, torch.from_numpy(data["images"]), rtol=0, atol=0)
    torch.testing.assert_close(all_soft, torch.from_numpy(data["soft_labels"]), rtol=0, atol=0)
    torch.testing.assert_close(all_targets, torch.from_numpy(data["targets"]), rtol=0, atol=0)

    # Worker processes receive a pickled dataset: it must reopen the files, not copy the arrays.
    state = pickle.dumps(dataset)
    assert len(state) < data["images"].nbytes
    clone = pickle.loads(state)
    assert isinstance(clone.images, np.memmap)
    np.testing.assert_array_equal(clone.soft_labels, data["soft_labels"])


def rewrite_soft_labels_short(out_dir: Path) -> None:
    np.save(out_dir / "soft_labels.npy", np.zeros((NUM_SAMPLES - 1, NUM_CLASSES), np.float32))


def rewrite_soft_labels_narrow(out_dir: Path) -> None:
    np.save(out_dir / "soft_labels.npy", np.zeros((NUM_SAMPLES, NUM_CLASSES - 1), np.float32))


@pytest.mark.parametrize("damage, verify, named", [
    (lambda d: (d / "images.npy").unlink(), False, "images.npy is missing"),
    (lambda d: (d / "metadata.json").unlink(), False, "metadata.json is missing"),
    (lambda d: (d / "metadata.json").write_text("{not json"), False, "metadata.json cannot be read"),
    (rewrite_soft_labels_short, False, "soft_labels.npy holds 9 samples"),
    (rewrite_soft_labels_narrow, False, "soft_labels.npy has 2 columns"),
    (lambda d: corrupt_truncate(d / "targets.npy"), False, "targets.npy cannot be read"),
    (lambda d: (d / "labels.npy").unlink(), False, "labels.npy is missing"),
    (lambda d: corrupt_flip_byte(d / "images.npy"), True, "images.npy does not match its sha256"),
    (lambda d: (d / "preview.png").unlink(), True, "preview.png is missing"),
], ids=["no_images", "no_metadata", "bad_metadata", "short_soft_labels", "narrow_soft_labels",
        "truncated_targets", "no_labels", "checksum", "no_preview"])
def test_load_reports_damage_naming_the_file(release, damage, verify: bool, named: str) -> None:
    out_dir, _ = release
    damage(out_dir)
    with pytest.raises(DPImgSynError, match=named):
        load(out_dir, verify=verify)


def test_flipped_data_byte_only_caught_by_verify(release) -> None:
    out_dir, data = release
    corrupt_flip_byte(out_dir / "images.npy")
    assert not np.array_equal(load(out_dir).images, data["images"])
    with pytest.raises(DPImgSynError, match="images.npy"):
        load(out_dir, verify=True)


def test_load_refuses_non_release(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(DPImgSynError, match="not the metadata of a DP-ImgSyn release"):
        load(tmp_path)
    with pytest.raises(DPImgSynError, match="is not a folder"):
        load(tmp_path / "missing")


def test_finalize_refuses_reserved_metadata_keys(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "release")
    write(writer, make_data(), range(writer.num_shards))
    with pytest.raises(ValueError, match="reserved"):
        writer.finalize({"counts": 1})
    assert not is_complete(tmp_path / "release")


# --------------------------------------------------------------------------- labels that mean what they say

def release_with_disagreeing_teacher(out_dir: Path) -> dict[str, np.ndarray]:
    """Targets cycle 0, 1, 2, ...; the teacher calls almost everything class 0 (as on a real k = 0 run)."""
    data = make_data()
    teacher = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    data["soft_labels"] = (np.eye(NUM_CLASSES, dtype=np.float32)[teacher] * 5.0
                           + 0.1 * data["soft_labels"]).astype(np.float32)
    writer = make_writer(out_dir)
    write(writer, data, range(writer.num_shards))
    writer.finalize(METADATA)
    return data


def as_version_1(out_dir: Path) -> None:
    """Turn a release into what format version 1 wrote: no labels.npy, per_class counting the targets."""
    metadata = json.loads((out_dir / "metadata.json").read_text())
    (out_dir / "labels.npy").unlink()
    del metadata["files"]["labels.npy"]
    targets = np.load(out_dir / "targets.npy")
    metadata.update(version=1, counts={"num_samples": len(targets),
                                       "per_class": np.bincount(targets, minlength=NUM_CLASSES).tolist()})
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))


def test_counts_follow_the_teacher_and_record_the_targets_agreement(tmp_path: Path) -> None:
    release_with_disagreeing_teacher(tmp_path / "release")
    dataset = load(tmp_path / "release", verify=True)
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(dataset.targets, np.arange(10) % 3)
    # agreeing: images 0, 3 and 6 (target 0, label 0)
    assert dataset.metadata["counts"] == {"num_samples": 10, "per_class": [8, 1, 1], "targets_per_class": [4, 3, 3],
                                          "label_target_agreement": 0.3}
    assert json.loads((tmp_path / "release" / "metadata.json").read_text())["counts"] == dataset.metadata["counts"]
    _, soft_label, target = dataset[9]  # the item keeps the optimization target, labels sit beside it
    assert target == 0 and int(dataset.labels[9]) == 2 and int(soft_label.argmax()) == 2
    assert dataset.labels_tensor().dtype == torch.int64
    assert dataset.labels_tensor().tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]


def test_verify_refuses_labels_or_counts_that_do_not_match(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    release_with_disagreeing_teacher(out_dir)
    metadata = json.loads((out_dir / "metadata.json").read_text())
    np.save(out_dir / "labels.npy", np.load(out_dir / "targets.npy"))  # the old mistake: targets as labels
    forged = {**metadata, "files": {**metadata["files"],
                                    "labels.npy": hashlib.sha256((out_dir / "labels.npy").read_bytes()).hexdigest()}}
    (out_dir / "metadata.json").write_text(json.dumps(forged))
    load(out_dir)  # cheap opening checks shapes only
    with pytest.raises(DPImgSynError, match="labels.npy is not the argmax of soft_labels.npy"):
        load(out_dir, verify=True)

    other = tmp_path / "other"
    release_with_disagreeing_teacher(other)
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["counts"]["per_class"] = metadata["counts"]["targets_per_class"]
    (other / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DPImgSynError, match="counts in .* are not those of its labels"):
        load(other, verify=True)


def test_version_1_release_still_loads_with_labels_from_its_soft_labels(tmp_path: Path) -> None:
    out_dir = tmp_path / "release"
    data = release_with_disagreeing_teacher(out_dir)
    as_version_1(out_dir)
    dataset = load(out_dir, verify=True)
    np.testing.assert_array_equal(dataset.labels, data["soft_labels"].argmax(axis=1))
    assert dataset.metadata["version"] == 1
    assert dataset.metadata["counts"] == {"num_samples": 10, "per_class": [8, 1, 1], "targets_per_class": [4, 3, 3],
                                          "label_target_agreement": 0.3}
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.metadata["counts"] == dataset.metadata["counts"]
    np.testing.assert_array_equal(clone.labels, dataset.labels)
    assert dataset.labels_tensor().tolist() == data["soft_labels"].argmax(axis=1).tolist()
    assert make_writer(out_dir).finalize(METADATA) == out_dir  # a finished version-1 release stays as it is
    assert not (out_dir / "labels.npy").exists()


def test_unknown_release_version_refused(release) -> None:
    out_dir, _ = release
    metadata = json.loads((out_dir / "metadata.json").read_text())
    (out_dir / "metadata.json").write_text(json.dumps({**metadata, "version": 3}))
    with pytest.raises(DPImgSynError, match="version 3; this code reads versions 1, 2"):
        load(out_dir)


def test_class_names_are_read_checked_and_default_to_the_labels(release) -> None:
    out_dir, _ = release
    assert load(out_dir).recorded_class_names is None and load(out_dir).class_names == ["0", "1", "2"]
    metadata = json.loads((out_dir / "metadata.json").read_text())
    (out_dir / "metadata.json").write_text(json.dumps({**metadata, "class_names": ["ant", "bee", "cow"]}))
    assert load(out_dir).class_names == ["ant", "bee", "cow"]
    for names, message in ((["ant", "bee"], "2 class names for 3 classes"), (["ant", "ant", "cow"], "twice"),
                           (["ant", "b\nee", "cow"], "unprintable"), ("abc", "not a list of strings"),
                           ([1, 2, 3], "not a list of strings")):
        (out_dir / "metadata.json").write_text(json.dumps({**metadata, "class_names": names}))
        with pytest.raises(DPImgSynError, match=message):
            load(out_dir)
