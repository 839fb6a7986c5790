"""A user's own ImageFolder tree of any size and channel count, through every stage, as private and public set.

Two tiny generated trees run the whole chain (teacher, DP statistics, synthesis, student, evaluation): gray
48 x 48 PNGs whose view is inferred from their format, and colour PNGs of another size seen as 64 x 64 x 3
because the flags say so. Every artifact must hold images and weights of that shape, the teacher records the
view so that no later stage needs to be told it again, and a later stage told another view refuses.
"""
from __future__ import annotations

import json
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
from common.errors import DPImgSynError
from evaluation.release import EvaluationConfig, evaluate_release

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
    release = synthesize.run(["--teacher", str(stats), "--public_set", public_set, "--num_samples",
                              str(NUM_SAMPLES), "--k", "1", "--batch_size", "3", "--output", str(work / "release"),
                              *sampling, *QUIET])
    train_student.run(["--release", str(release), "--dataset", dataset, "--model", "small_cnn", "--epochs", "1",
                       "--batch_size", "3", "--T", "4", "--output", str(work / "student"), *QUIET])
    sampling_dir = sampling[1] if sampling else None
    evaluate_release(EvaluationConfig(
        release=str(release), output=str(work / "evaluation"), dataset=dataset, public_set=public_set,
        teacher=str(stats), metrics=(str(work / "student" / "metrics.json"),), max_synthetic=NUM_SAMPLES,
        max_private=12, k_ssim=2, gallery_pairs=2, sampling_dir=sampling_dir, device="cpu"))
    return {"teacher": Path(teacher), "statistics": Path(stats), "release": Path(release),
            "student": work / "student", "evaluation": work / "evaluation"}


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
    assert view == {"image_size": 30, "channels": 3}  # most common shorter side; one colour file: colour
    assert "image size and channels inferred from the format of 4 training files" in note
    view, note = registry.folder_view(f"folder:{mixed}", channels=1)
    assert view == {"image_size": 30, "channels": 1} and "x 1 (gray); image size inferred" in note
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
    registry.reset_opened_splits()
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
