"""End to end on mnist5k with tiny settings: artifacts, report contract, privacy bookkeeping."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import privacy
import registry
from stages.config import validate_config
from stages.pipeline import run_pipeline
from synthesizer import release as release_io


def test_report_contract(tiny_pipeline):
    out, report = tiny_pipeline
    saved = json.loads((out / "report.json").read_text())
    for key in ("epsilon", "delta", "teacher_test_acc", "results", "seconds"):
        assert key in saved
    assert {(row["k"], row["seed"]) for row in saved["results"]} == {(0, 1), (3, 1)}
    assert all(set(row) >= {"k", "seed", "student_test_acc"} for row in saved["results"])
    assert "DP-ImgSyn(3)" in (out / "report.md").read_text()
    assert saved["teacher_test_acc"] > 0.5
    assert max(row["student_test_acc"] for row in saved["results"]) > 0.15  # chance is 0.10
    # every run also writes the results as a CSV and a plot, and every release in the configured exports
    assert (out / "results.csv").read_text().count("\n") == 1 + 1 + 2 and (out / "accuracy_vs_epsilon.png").is_file()
    with Image.open(out / "accuracy_vs_epsilon.png") as plot:  # the test split, and no validation mark
        assert plot.info["Description"] == "test accuracy (%) against epsilon"
    assert "outside_guarantee" not in saved
    for k, count in ((0, 500), (3, 400)):  # one count per k
        exported = np.load(out / f"export_k{k}_npz" / "dataset.npz")
        assert exported["x"].shape == (count, 32, 32, 1) and exported["x"].dtype == np.uint8  # mnist stays gray
    assert (out / "teacher.metrics.csv").read_text().splitlines()[0].startswith("epoch,loss,train_acc")
    assert (out / "student_k3_seed1" / "metrics.csv").read_text().count("\n") == 1 + 4  # header + 4 epochs


def test_epsilon_is_the_ledgers(tiny_pipeline, tiny_config):
    out, report = tiny_pipeline
    stats = privacy.load_dppt(out / "statistics.dppt")
    ledger = stats["privacy"]["ledger"]
    assert [entry["name"] for entry in ledger] == ["dp_sgd", "dp_statistics"]
    recomputed = privacy.compute_epsilon(privacy.ledger_mechanisms(ledger), report["delta"])
    assert report["epsilon"] == pytest.approx(recomputed, rel=1e-6)
    assert report["epsilon"] <= tiny_config["target_epsilon"] * 1.001
    teacher = privacy.load_dppt(out / "teacher.dppt")
    assert teacher["privacy"]["ledger"][0]["steps"] == 2 * 16  # 2 epochs x ceil(4000/256)
    for k in (0, 3):
        metadata = json.loads((out / f"release_k{k}" / "metadata.json").read_text())
        assert metadata["privacy"]["epsilon"] == pytest.approx(report["epsilon"])
        # The student, post-processing of its release, carries the release's privacy block.
        student = torch.load(out / f"student_k{k}_seed1" / "student.pt", weights_only=True)
        assert student["privacy"] == metadata["privacy"]


def test_release_contract(tiny_pipeline):
    out, _ = tiny_pipeline
    bundle = release_io.load(out / "release_k3", verify=True)
    images, soft, targets = bundle.tensors()
    assert images.shape == (400, 3, 32, 32) and soft.shape == (400, 10) and targets.shape == (400,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert np.array_equal(np.asarray(bundle.targets), np.arange(400) % 10)  # cyclic targets
    assert (out / "release_k3" / "preview.png").stat().st_size > 1000


def test_k0_releases_the_aligned_public_images(tiny_pipeline):
    out, _ = tiny_pipeline
    bundle = release_io.load(out / "release_k0")
    spec = registry.dataset_info("mnist5k")
    public = registry.aligned("photos", "mnist5k")
    indices = registry.sampling_list("photos", 500, 0, available=len(public))
    first = public[int(indices[0])][0].numpy() * np.array(spec.std)[:, None, None] + np.array(spec.mean)[:, None, None]
    assert np.allclose(np.asarray(bundle.images[0]), np.clip(first, 0, 1), atol=1e-5)


def test_rerun_redoes_only_the_missing_stage(tiny_pipeline, tiny_config, capsys):
    out, first = tiny_pipeline
    copy_dir = out.parent / "rerun"
    shutil.copytree(out, copy_dir)
    shutil.rmtree(copy_dir / "student_k3_seed1")
    kept = [copy_dir / "teacher.dppt", copy_dir / "statistics.dppt", copy_dir / "release_k3" / "images.npy",
            copy_dir / "student_k0_seed1" / "metrics.json"]
    before = {path: path.stat().st_mtime_ns for path in kept}
    report = run_pipeline(validate_config(copy.deepcopy(tiny_config)), copy_dir, progress=False)
    assert (copy_dir / "student_k3_seed1" / "metrics.json").exists()
    assert {path: path.stat().st_mtime_ns for path in kept} == before
    assert len(report["results"]) == 2
    # The stage times add up over invocations: the skipped teacher keeps the time the first run spent on it.
    assert report["seconds"]["teacher"] >= first["seconds"]["teacher"]
    assert json.loads((copy_dir / "seconds.json").read_text()) == report["seconds"]
    # Each finished stage says so; a finished release is not announced as written again.
    said = capsys.readouterr().out.splitlines()
    for kept_output in ("release_k0", "release_k3", "student_k0_seed1/metrics.json"):
        lines = [line for line in said if line.startswith(f"{copy_dir / kept_output} ")]
        assert len(lines) == 1 and "already complete" in lines[0] and lines[0].endswith("; nothing to do"), lines
    assert not any("release written" in line for line in said)


def test_student_and_synthesis_never_open_private_training_data(tiny_pipeline, tmp_path):
    out, _ = tiny_pipeline
    import synthesize
    import train_student

    registry.OPENED_SPLITS.clear()
    synthesize.run(["--teacher", str(out / "statistics.dppt"), "--public_set", "photos", "--num_samples", "100",
                    "--g_steps", "1", "--batch_size", "50", "--output", str(tmp_path / "rel"), "--no_progress",
                    "--device", "cpu"])
    train_student.run(["--release", str(tmp_path / "rel"), "--model", "small_cnn", "--epochs", "1",
                       "--output", str(tmp_path / "student"), "--no_progress", "--device", "cpu"])
    opened = set(registry.OPENED_SPLITS)
    assert ("mnist5k", "train") not in opened
    assert ("mnist5k", "test") in opened and ("photos", "train") in opened
