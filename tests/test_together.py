"""A student of several releases of one run (k = 0 and k = 3 together): their union, at their one epsilon."""
from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import torch

import stages.student
from common.errors import DPImgSynError
from evaluation.report import k_order, sweep_table
from stages.config import validate_config
from stages.pipeline import run_pipeline
from synthesizer import release as release_io


class Built(Exception):
    pass


def built_trainer(monkeypatch) -> list[tuple]:
    """Stop train_student once its trainer is built; return what the trainer was given."""
    calls = []

    def stop(model, images, soft_labels, labels, *args, **kwargs):
        calls.append((images, soft_labels, labels))
        raise Built

    monkeypatch.setattr(stages.student, "StudentTrainer", stop)
    return calls


def student_of(*releases, tmp_path, name: str = "student") -> None:
    import train_student

    train_student.run(["--release", *map(str, releases), "--model", "small_cnn", "--epochs", "1",
                       "--output", str(tmp_path / name), "--no_progress", "--device", "cpu"])


def test_the_student_trains_on_the_union_of_the_releases(tiny_pipeline, tmp_path, monkeypatch):
    out, _ = tiny_pipeline
    calls = built_trainer(monkeypatch)
    with pytest.raises(Built):
        student_of(out / "release_k0", out / "release_k3", tmp_path=tmp_path)
    images, soft_labels, labels = calls[0]
    parts = [release_io.load(out / f"release_k{k}") for k in (0, 3)]
    assert len(images) == len(soft_labels) == len(labels) == 900  # 500 + 400, each image once
    expected = torch.cat([part.tensors()[1] for part in parts])
    assert torch.equal(soft_labels, expected) and torch.equal(labels, torch.cat([p.labels_tensor() for p in parts]))


def test_releases_of_other_dp_outputs_or_a_release_twice_are_refused(tiny_pipeline, tmp_path):
    """Releases of two teachers would cost the composition of two budgets, which no release records."""
    out, _ = tiny_pipeline
    other = tmp_path / "other_teacher"
    shutil.copytree(out / "release_k3", other)
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["teacher_sha256"] = "0" * 64
    (other / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DPImgSynError, match="differ in teacher_sha256.*same DP teacher and statistics"):
        student_of(out / "release_k0", other, tmp_path=tmp_path)
    metadata["privacy"]["epsilon"] *= 2  # the same teacher file named, another budget recorded
    metadata["teacher_sha256"] = json.loads((out / "release_k3" / "metadata.json").read_text())["teacher_sha256"]
    (other / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DPImgSynError, match="differ in privacy"):
        student_of(out / "release_k0", other, tmp_path=tmp_path)
    with pytest.raises(DPImgSynError, match="same release: give each release once"):
        student_of(out / "release_k3", out / "release_k3", tmp_path=tmp_path)
    assert not (tmp_path / "student" / "metrics.json").exists()


def test_the_pipeline_adds_a_student_of_all_releases_and_reports_it(tiny_pipeline, tiny_config):
    out, _ = tiny_pipeline
    copy_dir = out.parent / "together"
    shutil.copytree(out, copy_dir)
    config = copy.deepcopy(tiny_config)
    config["student"]["together"] = True
    kept = copy_dir / "student_k3_seed1" / "metrics.json"
    before = kept.stat().st_mtime_ns
    report = run_pipeline(validate_config(config), copy_dir, progress=False)
    assert kept.stat().st_mtime_ns == before  # only the new student ran
    assert [row["k"] for row in report["results"]] == [0, 3, "0+3"]
    metrics = json.loads((copy_dir / "student_k0+3_seed1" / "metrics.json").read_text())
    assert metrics["k"] == "0+3" and len(metrics["settings"]["release_sha256"]) == 2
    assert metrics["epsilon"] == pytest.approx(report["epsilon"])  # the union costs nothing more
    assert "DP-ImgSyn(0+3)" in (copy_dir / "report.md").read_text()
    with open(copy_dir / "results.csv", newline="") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == [
            "teacher", "DP-ImgSyn(0)", "DP-ImgSyn(3)", "DP-ImgSyn(0+3)"]
    config["synthesis"].update(g_steps=[3], num_samples=400)
    with pytest.raises(DPImgSynError, match="needs at least two k values"):
        validate_config(config)


def test_students_of_one_release_come_first_then_those_of_several():
    assert sorted([10, "0+10", 0, 2], key=k_order) == [0, 2, 10, "0+10"]
    rows = [{"epsilon": 1.0, "run": "a", "run_minutes": 1.0, "method": method, "accuracy": 0.5}
            for method in ("DP-ImgSyn(0+10)", "teacher", "DP-ImgSyn(10)", "DP-ImgSyn(0)")]
    assert sweep_table(rows).splitlines()[0] == (
        "| epsilon | teacher | DP-ImgSyn(0) | DP-ImgSyn(10) | DP-ImgSyn(0+10) | minutes per run |")
