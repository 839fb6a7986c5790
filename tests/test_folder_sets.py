"""A user's own ImageFolder tree of any size and channel count, through every stage, as private and public set.

Two tiny generated trees run the whole chain (teacher, DP statistics, synthesis, student, evaluation): gray
48 x 48 PNGs whose view is inferred from their format, and colour PNGs of another size seen as 64 x 64 x 3
because the flags say so. Every artifact must hold images and weights of that shape, the teacher records the
view so that no later stage needs to be told it again, and a later stage told another view refuses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import make_sampling_list
import privacy
import registry
import save_dp_db_stats
import synthesize
import train_dp
import train_student
from common.batches import decode_all
from common.errors import DPImgSynError
from evaluation.release import EvaluationConfig, evaluate_release
from sources.files import ImageFiles

QUIET = ["--device", "cpu", "--no_progress"]
CLASSES = ("ant", "bee", "cow")
NUM_SAMPLES = 6


def write_tree(root: Path, size: tuple[int, int], gray: bool, per_class: int = 8, test_per_class: int = 3,
               classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/{train,test}/<class>/<i>.png`` (width x height ``size``), brighter per class; mode L when gray."""
    rng = np.random.default_rng(len(classes) + size[0])
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
                pixels = rng.integers(0, 100, shape) + 70 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{index}.png")
    return root


def first_conv_weight(state: dict) -> torch.Tensor:
    return next(value for key, value in state.items() if key.endswith("weight") and value.ndim == 4)


def run_stages(work: Path, dataset: str, public_set: str, teacher_flags: list[str], sampling: list[str],
               scale_statistics: bool = True) -> dict[str, Path]:
    """Every stage on ``dataset``; only the teacher is told the view (``teacher_flags``). ``scale_statistics``:
    the statistics stage pre-scales with ``public_set`` (2,000 images of a large set: seconds)."""
    teacher = train_dp.run(["--dataset", dataset, "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "8",
                            "--lr", "0.5", "--noise_multiplier", "1", "--stats_epochs", "1", "--stats_batch_size",
                            "8", "--seed", "0", "--output", str(work / "teacher.dppt"), *teacher_flags, *QUIET])
    scaling = ["--public_set", public_set] if scale_statistics else []
    stats = save_dp_db_stats.run(["--teacher", str(teacher), "--dataset", dataset, *scaling, "--seed", "0",
                                  "--output", str(work / "statistics"), *sampling, *QUIET])
    release = synthesize.run(["--teacher", str(stats), "--dataset", dataset, "--public_set", public_set,
                              "--num_samples", str(NUM_SAMPLES), "--k", "1", "--batch_size", "3", "--output", str(work / "release"),
                              *sampling, *QUIET])
    train_student.run(["--release", str(release), "--dataset", dataset, "--model", "small_cnn", "--epochs", "1",
                       "--batch_size", "3", "--T", "4", "--output", str(work / "student"), *QUIET])
    evaluate_release(evaluation_of(work, Path(stats), dataset, public_set, sampling))
    return {"teacher": Path(teacher), "statistics": Path(stats), "release": Path(release),
            "student": work / "student", "evaluation": work / "evaluation"}


def evaluation_of(work: Path, statistics: Path, dataset: str, public_set: str, sampling: list[str]) -> EvaluationConfig:
    """The release card of :func:`run_stages`'s release."""
    return EvaluationConfig(
        release=str(work / "release"), output=str(work / "evaluation"), dataset=dataset, public_set=public_set,
        teacher=str(statistics), metrics=(str(work / "student" / "metrics.json"),),
        max_synthetic=NUM_SAMPLES, max_private=12, k_ssim=2, gallery_pairs=2,
        sampling_dir=sampling[1] if sampling else None, device="cpu")


def check_artifacts(paths: dict[str, Path], side: int, channels: int) -> dict:
    """Every artifact holds images, weights and statistics of one view; returns the release metadata."""
    view = {"image_size": side, "channels": channels}
    teacher = privacy.load_dppt(paths["teacher"])
    assert teacher["view"] == view
    assert {key: teacher["settings"][key] for key in view} == view
    assert first_conv_weight(teacher["model"]).shape[1] == channels
    stats = privacy.load_dppt(paths["statistics"])
    assert stats["view"] == view and stats["dp_statistics"]
    images = np.load(paths["release"] / "images.npy", mmap_mode="r")
    assert images.shape == (NUM_SAMPLES, channels, side, side)
    assert (paths["release"] / "preview.png").is_file()
    metadata = json.loads((paths["release"] / "metadata.json").read_text())
    assert metadata["view"] == view and len(metadata["mean"]) == len(metadata["std"]) == channels
    student = torch.load(paths["student"] / "student.pt", weights_only=True)
    assert student["view"] == view and first_conv_weight(student["model"]).shape[1] == channels
    assert 0 <= json.loads((paths["student"] / "metrics.json").read_text())["student_test_acc"] <= 1
    card = json.loads((paths["evaluation"] / "release_card.json").read_text())
    assert "obfuscation" in json.dumps(card)
    # The class folders' names (label order) travel from the teacher to the release and its card.
    assert teacher["class_names"] == stats["class_names"] == metadata["class_names"] == list(CLASSES)
    assert card["publishable"]["class_names"] == list(CLASSES)
    return metadata


def test_gray_48_inferred_through_every_stage_with_a_public_folder_set(tmp_path, capsys):
    private = write_tree(tmp_path / "data" / "scans", (48, 48), gray=True)
    public = write_tree(tmp_path / "data" / "street", (70, 60), gray=False, per_class=4, test_per_class=0,
                        classes=("any",))
    lists = tmp_path / "lists"
    paths = run_stages(tmp_path / "run", f"folder:{private}", f"folder:{public}", [],
                       ["--sampling_dir", str(lists)])
    out = capsys.readouterr().out
    assert "folder:scans: images seen as 48 x 48 x 1 (gray)" in out and "inferred" in out
    metadata = check_artifacts(paths, 48, 1)
    assert metadata["dataset"] == "folder:scans" and metadata["public_set"] == "folder:street"
    assert metadata["sampling_list"] == f"folder_street_{NUM_SAMPLES}_0.npy"
    assert (lists / metadata["sampling_list"]).is_file()
    assert str(tmp_path) not in json.dumps(metadata)

    # A later stage told another view refuses in one line; told the same one, it agrees.
    dataset = ["--dataset", f"folder:{private}"]
    for script, argv in ((save_dp_db_stats, [*dataset, "--teacher", str(paths["teacher"]), "--image_size", "64",
                                             "--output", str(tmp_path / "other")]),
                         (synthesize, ["--teacher", str(paths["statistics"]), "--public_set", "photos",
                                       "--num_samples", "3", "--channels", "3", "--output", str(tmp_path / "r")]),
                         (train_student, [*dataset, "--release", str(paths["release"]), "--image_size", "32",
                                          "--output", str(tmp_path / "s")])):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*argv, *QUIET])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.count("\n") == 1 and "48 x 48 x 1" in error, error
    assert registry.recorded_view("folder:scans", privacy.load_dppt(paths["teacher"])["view"], 48, 1) == \
        {"image_size": 48, "channels": 1}

    # The card is kept for the same files, and computed again once a private file changed.
    evaluation = evaluation_of(tmp_path / "run", paths["statistics"], f"folder:{private}", f"folder:{public}",
                               ["--sampling_dir", str(lists)])
    evaluate_release(evaluation)
    assert "already complete" in capsys.readouterr().out
    changed = next((private / "train" / CLASSES[0]).iterdir())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # as if rewritten
    evaluate_release(evaluation)
    assert "already complete" not in capsys.readouterr().out


def test_colour_64_from_flags_through_every_stage_with_lists_in_the_repository(tmp_path, monkeypatch, capsys):
    private = write_tree(tmp_path / "data" / "birds", (40, 52), gray=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # sampling lists still land in the repository's Random_Sampling_List/
    paths = run_stages(tmp_path / "run", f"folder:{private}", "photos", ["--image_size", "64", "--channels", "3"],
                       [], scale_statistics=False)
    assert "inferred" not in capsys.readouterr().out
    metadata = check_artifacts(paths, 64, 3)
    assert metadata["sampling_list"] == f"photos_{NUM_SAMPLES}_0.npy"
    assert (registry.REPOSITORY_ROOT / "Random_Sampling_List" / metadata["sampling_list"]).is_file()
    assert not (elsewhere / "Random_Sampling_List").exists()
    assert registry.sampling_list_path("photos", 3, 0) == registry.SAMPLING_DIR / "photos_3_0.npy"
    make_sampling_list.main(["--public", f"folder:{private}", "--count", "5", "--sampling_dir", "here"])
    assert (elsewhere / "here" / "folder_birds_5_0.npy").is_file()  # an explicit folder is the user's path


def test_view_inference_rules_and_flags(tmp_path):
    mixed = tmp_path / "mixed"
    for index, (size, mode) in enumerate([((40, 30), "L"), ((30, 50), "L"), ((64, 64), "L"), ((90, 30), "RGB")]):
        (mixed / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(mixed / "train" / "a" / f"{index}.png")
    view, note = registry.folder_view(f"folder:{mixed}")
    assert view == {"image_size": 30, "channels": 1}  # most common shorter side; most files gray: gray
    assert "image size and channels inferred from the format of 4 training files" in note
    assert "most files read are gray: the colour ones (1 of 4) are converted to gray (luma)" in note
    view, note = registry.folder_view(f"folder:{mixed}", channels=3)
    assert view == {"image_size": 30, "channels": 3} and "x 3 (colour); image size inferred" in note
    assert "most files" not in note  # the channel rule is not applied when channels are given
    assert registry.folder_view(f"folder:{mixed}", 16, 1) == ({"image_size": 16, "channels": 1}, None)
    assert registry.folder_view("mnist5k") == ({}, None)
    assert registry.folder_view("mnist5k", 32, 3) == ({}, None)  # the registry's own view may be restated
    with pytest.raises(DPImgSynError, match="shape folder: sets only"):
        registry.folder_view("mnist5k", channels=1)
    with pytest.raises(DPImgSynError, match="channels of .* must be one of"):
        registry.folder_view(f"folder:{mixed}", 16, 2)
    with pytest.raises(DPImgSynError, match="no training images"):
        registry.folder_view(f"folder:{tmp_path / 'absent'}")
    # Artifacts made before views were recorded keep the old meaning of folder: (32 x 32 x 3).
    assert registry.recorded_view("folder:old", None) == registry.LEGACY_FOLDER_VIEW
    assert registry.recorded_spec("folder:old", 2).view.image_size == 32


def test_a_folder_set_is_a_public_set_too(tmp_path):
    private = write_tree(tmp_path / "scans", (48, 48), gray=True, per_class=2, test_per_class=1)
    public = write_tree(tmp_path / "street", (70, 60), gray=False, per_class=3, test_per_class=0, classes=("x",))
    registry.OPENED_SPLITS.clear()
    aligned = registry.aligned(f"folder:{public}", f"folder:{private}", image_size=48, channels=1)
    images = torch.stack([aligned[index][0] for index in range(len(aligned))])
    assert images.shape == (3, 1, 48, 48) and aligned[0][1] == registry.PUBLIC_LABEL
    assert images.min() >= -1 and images.max() <= 1
    assert registry.OPENED_SPLITS == [(f"folder:{public}", "train")]  # never the private set
    assert registry.aligned(f"folder:{public}", "mnist5k")[0][0].shape == (3, 32, 32)
    assert registry.train_size(f"folder:{public}") == 3
    with pytest.raises(DPImgSynError, match="shares its images"):  # the same folder, spelled another way
        registry.aligned(f"folder:{private}/../scans", f"folder:{private}", image_size=48, channels=1)


def test_a_model_refuses_images_smaller_than_it_needs(tmp_path, capsys):
    with pytest.raises(DPImgSynError, match=r"needs images of at least 32 x 32.*got 16 x 16"):
        registry.get_model("resnet18_imagenet", 3, image_size=16)
    with pytest.raises(DPImgSynError, match="at least 8 x 8"):
        registry.get_model("small_cnn", 3, 1, image_size=4)
    assert registry.get_model("small_cnn", 3, 1, image_size=8)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    private = write_tree(tmp_path / "tiny", (16, 16), gray=True, per_class=2, test_per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        train_dp.main(["--dataset", f"folder:{private}", "--model", "resnet18_imagenet", "--epochs", "1",
                       "--train_batch_size", "2", "--output", str(tmp_path / "t.dppt"), *QUIET])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "at least 32 x 32" in error
    assert not (tmp_path / "t.dppt").exists()


def test_the_channel_rule_follows_the_majority_of_the_files_and_converts_the_others(tmp_path):
    """Most files gray: colour files become their luma; most colour (or half): gray files are repeated."""
    colours = {"L": 100, "RGB": (255, 0, 0), "RGBA": (0, 0, 255, 255)}
    for name, modes, channels, rule in (
            ("gray", ("L", "RGB", "L"), 1, "gray: the colour ones (1 of 3) are converted to gray (luma)"),
            ("colour", ("RGB", "L", "RGBA", "RGB"), 3, "colour: the gray ones (1 of 4) are repeated over 3 channels"),
            ("tie", ("RGB", "L"), 3, "colour: the gray ones (1 of 2) are repeated over 3 channels")):
        folder = tmp_path / name / "train" / "a"
        folder.mkdir(parents=True)
        for index, mode in enumerate(modes):
            Image.new(mode, (8, 8), colours[mode]).save(folder / f"{index}.png")
        view, note = registry.folder_view(f"folder:{tmp_path / name}")
        assert view == {"image_size": 8, "channels": channels} and f"most files read are {rule}" in note, note
        split = registry.get_split(f"folder:{tmp_path / name}", "train", **view)
        seen = [split[index][0] * 0.5 + 0.5 for index in range(len(modes))]  # back from the 0.5 / 0.5 normalization
        expected = {"L": [100 / 255] * 3, "RGB": [1.0, 0.0, 0.0], "RGBA": [0.0, 0.0, 1.0]}
        if channels == 1:
            expected = {"L": [100 / 255], "RGB": [0.2989], "RGBA": [0.114]}
        for image, mode in zip(seen, modes):
            assert image.shape == (channels, 8, 8)
            assert torch.allclose(image[:, 0, 0], torch.tensor(expected[mode]), atol=1e-3), (name, mode)


def test_16_bit_gray_files_are_scaled_to_0_1_not_saturated(tmp_path):
    gradient = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    wide = gradient.astype(np.int32)
    wide[0, 0], wide[-1, -1] = -5, 70000  # mode I holds any int32: clipped to the 16-bit range
    folder = tmp_path / "depth" / "train" / "a"
    folder.mkdir(parents=True)
    files = {"0.png": (Image.fromarray(gradient), "I;16"), "1.tif": (Image.fromarray(gradient.astype(">u2")), "I;16B"),
             "2.tif": (Image.fromarray(wide), "I")}
    for file, (image, mode) in files.items():
        image.save(folder / file)
        with Image.open(folder / file) as saved:
            assert saved.mode == mode  # the modes this test is about
    expected = torch.from_numpy(gradient / 65535).float()
    source = ImageFiles([str(folder / file) for file in files], [0] * len(files))
    for index in range(len(files)):
        pixels, _ = source.raw(index, None)
        assert pixels.shape == (3, 16, 16) and torch.allclose(pixels, expected.expand(3, -1, -1), atol=1e-6)
    view, _ = registry.folder_view(f"folder:{tmp_path / 'depth'}")
    assert view == {"image_size": 16, "channels": 1}  # 16-bit files are gray files
    split = registry.get_split(f"folder:{tmp_path / 'depth'}", "train", **view)
    assert torch.allclose(split[1][0][0] * 0.5 + 0.5, expected, atol=1e-3)  # luma weights sum to 0.9999


def test_an_empty_class_folder_is_refused_naming_the_class_and_the_split(tmp_path):
    empty_test = write_tree(tmp_path / "a", (8, 8), gray=True, per_class=2, test_per_class=1)
    (empty_test / "test" / "cow" / "0.png").unlink()
    name = f"folder:{empty_test}"
    assert len(registry.get_split(name, "train", image_size=8, channels=1)) == 6  # the training split alone is fine
    with pytest.raises(DPImgSynError, match=r"class 'cow' has no images in the test split .*add images to it"):
        registry.get_split(name, "test", image_size=8, channels=1)
    empty_train = write_tree(tmp_path / "b", (8, 8), gray=True, per_class=2, test_per_class=1)
    for path in (empty_train / "train" / "bee").iterdir():
        path.unlink()
    (empty_train / "train" / "bee" / "notes.txt").write_text("not an image")
    for split in ("train", "test"):  # 'bee' has test images but no training image, whichever split is opened
        with pytest.raises(DPImgSynError, match=r"class 'bee' has no images in the train split"):
            registry.get_split(f"folder:{empty_train}", split, image_size=8, channels=1)
    shutil.rmtree(empty_train / "train" / "bee")  # no training folder at all: refused when the test split is opened
    with pytest.raises(DPImgSynError, match=r"class folders missing from the training split: bee"):
        registry.get_split(f"folder:{empty_train}", "test", image_size=8, channels=1)


def test_a_truncated_image_or_an_empty_class_stops_the_teacher_in_one_line(tmp_path, capsys):
    truncated = write_tree(tmp_path / "cut", (16, 16), gray=True, per_class=2, test_per_class=1)
    png = truncated / "train" / "bee" / "1.png"
    png.write_bytes(png.read_bytes()[:60])  # the header survives: the view is still inferred
    empty = write_tree(tmp_path / "empty", (16, 16), gray=True, per_class=2, test_per_class=1)
    (empty / "test" / "ant" / "0.png").unlink()
    for tree, says in ((truncated, f"cannot read the image {png}: image file is truncated"),
                       (empty, "class 'ant' has no images in the test split")):
        output = tmp_path / f"{tree.name}.dppt"
        with pytest.raises(SystemExit) as exit_info:
            train_dp.main(["--dataset", f"folder:{tree}", "--model", "small_cnn", "--epochs", "1",
                           "--train_batch_size", "2", "--stats_batch_size", "2", "--output", str(output), *QUIET])
        error = capsys.readouterr().err
        errors = [line for line in error.splitlines() if line.startswith("error: ")]
        assert exit_info.value.code == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in error, error
        assert not list(tmp_path.glob(f"{tree.name}.*"))  # found before training: no teacher, resume file or log
    # Loader processes (used on GPU hosts) hand the same one line on, not their traceback.
    split = registry.get_split(f"folder:{truncated}", "train", image_size=16, channels=1)
    with pytest.raises(DPImgSynError) as error_info:
        decode_all(split, num_workers=1)
    assert str(error_info.value) == f"cannot read the image {png}: image file is truncated; replace or remove the file"
