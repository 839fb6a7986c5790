"""What a shared artifact may hold, and what the two private stages agree on.

A teacher or statistics ``.dppt`` and a release are meant to be shared: they may hold only DP
outputs and public facts (the view, N, the class names; no exact losses or accuracies of the training
data, no local paths), both private stages must train and measure on the same records, and stage 2
run by hand must follow the budget stage 1 planned.
"""
from __future__ import annotations

import csv
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import privacy
import registry
import save_dp_db_stats
import stages.dp_statistics
import stages.teacher
import train_dp
from common.files import atomic_torch_save, atomic_write_csv, atomic_write_text
from common.runtime import setup_logging
from privacy.split import split_by_content

QUIET = ["--device", "cpu", "--no_progress"]
TEACHER = ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "500",
           "--lr", "1", "--seed", "3", *QUIET]


def strings_in(value) -> list[str]:
    """Every string (keys included) anywhere inside a checkpoint or JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in strings_in(key) + strings_in(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in strings_in(item)]
    return []


def assert_no_local_paths(document, *local_roots: Path) -> None:
    """No absolute path, and nothing that names a folder of this machine."""
    for text in strings_in(document):
        assert not os.path.isabs(text), text
        assert not any(str(root) in text for root in local_roots), text


def assert_shareable(checkpoint: dict, *local_roots: Path) -> None:
    assert "history" not in checkpoint and "args" not in checkpoint
    assert checkpoint["test_acc_note"] == stages.teacher.TEST_ACC_NOTE  # the one accuracy allowed, labelled
    assert_no_local_paths({key: value for key, value in checkpoint.items() if key not in ("model", "dp_statistics")},
                          *local_roots)


# --------------------------------------------------------------------------- the validation split
def test_one_inserted_record_moves_no_other_record_across_the_split():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(400, 1, 4, 4, generator=generator)
    labels = torch.randint(0, 10, (400,), generator=generator)
    base = torch.utils.data.TensorDataset(images, labels)
    newcomer = torch.rand(1, 1, 4, 4, generator=generator)
    grown = torch.utils.data.TensorDataset(torch.cat([images[:200], newcomer, images[200:]]),
                                           torch.cat([labels[:200], torch.tensor([3]), labels[200:]]))

    def sides(dataset) -> list[bool]:
        train, validation = split_by_content(dataset, 0.25)
        held_out = {tuple(image.flatten().tolist()) for image in validation.tensors[0]}
        return [tuple(image.flatten().tolist()) in held_out for image in dataset.tensors[0]]

    before, after = sides(base), sides(grown)
    assert after[:200] + after[201:] == before  # a permutation of all indices fails this
    assert 60 <= sum(before) <= 140  # about a quarter held out (binomial, ~5 sigma)
    train, validation = split_by_content(base, 0.25)
    assert len(train) + len(validation) == 400 and hasattr(train, "tensors")


def test_both_private_stages_use_the_same_training_part(tmp_path, monkeypatch):
    seen = {}
    trainer_class = stages.teacher.DPSGDTrainer

    def recording_trainer(model, train_set, *args, **kwargs):
        seen["teacher"] = train_set.tensors[0]
        return trainer_class(model, train_set, *args, **kwargs)

    compute = stages.dp_statistics.compute_dp_statistics

    def recording_statistics(model, train_set, **kwargs):
        seen["statistics"] = train_set.tensors[0]
        return compute(model, train_set, **kwargs)

    monkeypatch.setattr(stages.teacher, "DPSGDTrainer", recording_trainer)
    monkeypatch.setattr(stages.dp_statistics, "compute_dp_statistics", recording_statistics)
    teacher = train_dp.run(TEACHER + ["--noise_multiplier", "1", "--val_split", "0.25", "--eval_split", "validation",
                                      "--output", str(tmp_path / "teacher.dppt")])
    stats = save_dp_db_stats.run(["--teacher", str(teacher), "--epochs", "1", "--train_batch_size", "1000",
                                  "--noise_multiplier", "1", "--seed", "1", "--output", str(tmp_path / "stats"),
                                  *QUIET])
    assert torch.equal(seen["teacher"], seen["statistics"])
    kept = len(seen["teacher"])
    assert 2700 < kept < 3300  # of mnist5k's 4,000 training images
    ledger = privacy.load_dppt(stats)["privacy"]["ledger"]
    assert [entry["sample_rate"] for entry in ledger] == pytest.approx([500 / kept, 1000 / kept])
    for path in (teacher, stats):  # the validation accuracy (private records) stays in the local log
        assert_shareable(privacy.load_dppt(path), tmp_path)
        assert math.isnan(privacy.load_dppt(path)["test_acc"])  # the test split was not read
    with open(tmp_path / "teacher.metrics.csv", newline="") as handle:
        assert 0 <= float(list(csv.DictReader(handle))[-1]["val_acc"]) <= 1


# --------------------------------------------------------------------------- stage 2 follows stage 1's plan
def test_statistics_run_by_hand_meet_the_planned_epsilon_and_say_when_they_do_not(tmp_path, capsys):
    teacher = train_dp.run(TEACHER + ["--target_epsilon", "4", "--stats_epochs", "1", "--stats_batch_size", "1000",
                                      "--output", str(tmp_path / "teacher.dppt")])
    plan = privacy.load_dppt(teacher)["plan"]
    assert plan["target_epsilon"] == 4 and plan["statistics"]["train_batch_size"] == 1000
    capsys.readouterr()
    planned = privacy.load_dppt(save_dp_db_stats.run(
        ["--teacher", str(teacher), "--seed", "1", "--output", str(tmp_path / "planned"), *QUIET]))
    said = capsys.readouterr().out
    assert "note:" not in said
    assert "DP statistics: the teacher runs on every sampled batch (1 expected passes over the set" in said
    assert 4 * 0.98 < planned["privacy"]["epsilon"] <= 4 + 1e-6  # calibrated for both stages
    assert planned["statistics_settings"]["noise_multiplier"] == plan["statistics"]["noise_multiplier"]

    deviating = privacy.load_dppt(save_dp_db_stats.run(
        ["--teacher", str(teacher), "--noise_multiplier", "0.5", "--seed", "1", "--output", str(tmp_path / "dev"),
         *QUIET]))
    note = capsys.readouterr().out
    assert deviating["privacy"]["epsilon"] > 4.5
    assert f"total epsilon {deviating['privacy']['epsilon']:.3f} differs from stage 1's target 4" in note
    assert "--noise_multiplier 0.5 instead of the planned" in note


# --------------------------------------------------------------------------- folder sets, paths, permissions
def write_tree(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 4)):
        for label, name in enumerate(("ant", "bee")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 120, (20, 20, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{index}.png")
    return root


def test_a_folder_set_is_recorded_by_its_name_and_must_be_given_to_read_it_again(tmp_path, capsys):
    tree = write_tree(tmp_path / "data" / "insects")
    dataset = f"folder:{tree}"
    teacher = train_dp.run(["--dataset", dataset, "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "8",
                            "--lr", "0.5", "--noise_multiplier", "1", "--stats_epochs", "1", "--stats_batch_size", "8",
                            "--seed", "0", "--output", str(tmp_path / "teacher.dppt"), *QUIET])
    payload = privacy.load_dppt(teacher)
    assert payload["dataset"] == payload["settings"]["dataset"] == "folder:insects"
    assert payload["class_names"] == ["ant", "bee"]  # the class folders' names: a public schema, like N
    assert_shareable(payload, tmp_path)

    common = ["--teacher", str(teacher), "--seed", "0", "--output", str(tmp_path / "stats"), *QUIET]
    for extra, message in (([], "pass --dataset folder:PATH"),
                           (["--dataset", f"folder:{tmp_path / 'other'}"], "not 'folder:other'")):
        with pytest.raises(SystemExit) as exit_info:
            save_dp_db_stats.main(common + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    stats = privacy.load_dppt(save_dp_db_stats.run(common + ["--dataset", dataset]))
    assert stats["dataset"] == "folder:insects" and stats["class_names"] == ["ant", "bee"]  # carried forward
    assert_shareable(stats, tmp_path)
    assert registry.recorded_spec("folder:insects", 2).num_classes == 2  # synthesis needs no files


def test_release_metadata_names_no_local_path(tiny_pipeline):
    out, _ = tiny_pipeline
    for release in sorted(path for path in out.glob("release_k*") if path.is_dir()):
        metadata = json.loads((release / "metadata.json").read_text())
        assert metadata["teacher_file"] == "statistics.dppt" and "teacher_path" not in metadata
        assert metadata["class_names"] == [str(digit) for digit in range(10)]  # public schema, from the teacher
        assert_no_local_paths(metadata, out)
    for name in ("teacher.dppt", "statistics.dppt"):
        assert_shareable(privacy.load_dppt(out / name), out)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_artifacts_get_the_permissions_of_any_file_the_user_creates(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metadata.json", "{}")
        privacy.save_dppt(tmp_path / "teacher.dppt", {"x": torch.zeros(1)})
    finally:
        os.umask(previous)
    for name in ("metadata.json", "teacher.dppt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_local_secrets_are_owner_only_whatever_the_umask(tmp_path, umask):
    """Resume states (generator states regenerate the noise), metrics and logs: 0600; an older, wider log is
    tightened when it is opened again."""
    (tmp_path / "old.log").write_text("an earlier run\n")
    (tmp_path / "old.log").chmod(0o644)
    previous = os.umask(umask)
    try:
        atomic_torch_save({"noise_generator": torch.Generator().get_state()}, tmp_path / "t.dppt.resume", private=True)
        atomic_write_csv(tmp_path / "t.metrics.csv", [{"epoch": 1, "loss": 0.5}], private=True)
        for name in ("new.log", "old.log"):
            logger = setup_logging(tmp_path / name, name=f"test.{name}")
            logger.info("a non-private figure")
            for handler in logger.handlers:
                handler.close()
    finally:
        os.umask(previous)
    for name in ("t.dppt.resume", "t.metrics.csv", "new.log", "old.log"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert (tmp_path / "old.log").read_text().startswith("an earlier run\n")  # appended to, not replaced
