"""A sweep: several target epsilons x whole-pipeline seeds -> one run folder each, results.csv, a plot."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from common.errors import DPImgSynError
from evaluation.report import OUTSIDE_GUARANTEE, percent
from stages.config import load_config, validate_config
from stages.pipeline import run_pipeline, teacher_accuracy

SWEEP = {
    "output": "unused", "dataset": "mnist5k", "model": "small_cnn", "target_epsilon": [2.0, 8.0], "seeds": [1, 2],
    "device": "cpu", "val_split": 0.1, "eval_split": "validation",
    "teacher": {"epochs": 1, "train_batch_size": 2000, "lr": 1.0, "max_norm": 1.0},
    "statistics": {"epochs": 1, "train_batch_size": 2000, "max_norm": 1.0},
    "synthesis": {"public_set": "photos", "num_samples": 20, "g_steps": [0, 1], "batch_size": 20},
    "student": {"model": "small_cnn", "epochs": 1, "batch_size": 20, "lr": 0.05, "T": 4.0},
}


def test_a_sweep_writes_one_run_per_epsilon_and_seed_and_a_summary(tmp_path):
    """A tuning sweep (validation split): every report, table, CSV and plot names the split, never "test"."""
    summary = run_pipeline(validate_config(SWEEP), tmp_path, progress=False)
    assert [run["run"] for run in summary["runs"]] == ["eps2_seed1", "eps2_seed2", "eps8_seed1", "eps8_seed2"]
    assert summary["eval_split"] == "validation" and summary["outside_guarantee"] == OUTSIDE_GUARANTEE
    for run in summary["runs"]:
        report = json.loads((tmp_path / run["run"] / "report.json").read_text())
        assert report["epsilon"] == pytest.approx(run["target_epsilon"], rel=0.01)
        assert [row["seed"] for row in report["results"]] == [run["seed"]] * 2  # one student per k and seed
        assert "teacher_test_acc" not in report and 0 <= report["teacher_validation_acc"] <= 1
        assert all(set(row) == {"k", "seed", "student_validation_acc"} for row in report["results"])
        assert report["outside_guarantee"] == OUTSIDE_GUARANTEE
        markdown = (tmp_path / run["run"] / "report.md").read_text()
        assert OUTSIDE_GUARANTEE in markdown and "validation accuracy (%)" in markdown and " test " not in markdown
        metrics = json.loads((tmp_path / run["run"] / f"student_k1_seed{run['seed']}" / "metrics.json").read_text())
        assert "student_test_acc" not in metrics and metrics["outside_guarantee"] == OUTSIDE_GUARANTEE
        assert metrics["student_validation_acc"] in [row["student_validation_acc"] for row in report["results"]]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 3 and {row["method"] for row in rows} == {"teacher", "DP-ImgSyn(0)", "DP-ImgSyn(1)"}
    assert {row["seed"] for row in rows} == {"1", "2"} and all(float(row["run_minutes"]) >= 0 for row in rows)
    assert {row["split"] for row in rows} == {"validation"}
    table = (tmp_path / "report.md").read_text()
    assert table.count("(n=2)") == 2 * 3  # two epsilons x three methods, each over two runs
    assert "Validation accuracy (%)" in table and OUTSIDE_GUARANTEE in table
    with Image.open(tmp_path / "accuracy_vs_epsilon.png") as plot:
        assert plot.size[0] > 300 and plot.size[1] > 200
        assert plot.info["Title"] == "mnist5k <- photos (validation split)"
        assert plot.info["Description"] == f"validation accuracy (%) against epsilon; {OUTSIDE_GUARANTEE}"
    assert (tmp_path / "eps2_seed1" / "results.csv").is_file()


def test_one_value_prints_without_a_zero_spread_and_bad_sweeps_are_refused():
    assert percent([0.867]) == "86.70" and percent([0.8, 0.9]) == "85.00 ± 7.07 (n=2)"
    with pytest.raises(DPImgSynError, match="non-empty list"):
        validate_config({**SWEEP, "target_epsilon": []})
    with pytest.raises(DPImgSynError, match="'target_epsilon' must be a finite positive number"):
        validate_config({**SWEEP, "target_epsilon": [1.0, -2.0]})
    with pytest.raises(DPImgSynError, match="either the top-level 'seeds'"):
        validate_config({**SWEEP, "teacher": {**SWEEP["teacher"], "seed": 3}})


def test_any_recipe_file_can_be_swept_from_the_command_line():
    """--epsilons/--seeds replace the target and the stages' own seeds; without them the file runs as written."""
    swept = load_config("configs/demo.yaml", epsilons=[1.0, 4.0], seeds=[0, 5])
    assert swept.epsilons == (1.0, 4.0) and swept.replicates == (0, 5)
    plain = load_config("configs/demo.yaml")
    assert plain.epsilons == (None,) and plain.replicates == (None,) and plain.teacher.seed == 0
    assert load_config("configs/demo.yaml", seeds=[3]).epsilons == (None,)


def test_a_validation_run_reports_the_teachers_accuracy_from_its_local_log(tmp_path):
    """The checkpoint holds no validation accuracy (private records): the pipeline reads the local log."""
    (tmp_path / "teacher.metrics.csv").write_text("epoch,val_acc,test_acc\n1,0.5,\n2,0.75,\n")
    shared = {"test_acc": float("nan")}
    assert teacher_accuracy(shared, tmp_path / "teacher.dppt", "validation") == 0.75
    assert teacher_accuracy({"test_acc": 0.9}, tmp_path / "teacher.dppt", "test") == 0.9


def test_collect_results_tables_and_plots_the_paper_rows(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import collect_results

    for row, epsilon in (("mnist_eps1_tinyimagenet", 0.92), ("mnist_eps10_tinyimagenet", 8.17)):
        results = [{"k": k, "seed": seed, "student_test_acc": 0.5 + k / 100 + seed / 1e5}
                   for k in (0, 10) for seed in (111, 2023)]
        report = {"dataset": "mnist", "public_set": "tinyimagenet", "epsilon": epsilon, "delta": 1e-5,
                  "teacher_test_acc": 0.9, "results": results, "seconds": {"teacher": 60.0},
                  "summary": [{"k": k, "mean": 0.5 + k / 100, "std": 0.01, "seeds": 2} for k in (0, 10)]}
        (tmp_path / row).mkdir()
        (tmp_path / row / "report.json").write_text(json.dumps(report))
    table = collect_results.run(["--runs", str(tmp_path), "--figures", str(tmp_path / "figures")])
    assert "| mnist_eps1_tinyimagenet | mnist | 0.92 | tinyimagenet | 50.00 ± 1.00 (n=2) |" in table
    assert table.count("missing") == 19
    with open(tmp_path / "figures" / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * (1 + 4)
    assert (tmp_path / "figures" / "accuracy_vs_epsilon_mnist_tinyimagenet.png").is_file()
