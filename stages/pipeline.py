"""The whole pipeline from one config: teacher -> DP statistics -> releases per k -> students.

Each stage is called with its own typed config (the same function its CLI calls), in this process
or, with ``nproc`` > 1, on that many processes through torchrun, which runs this module with the
stage's name and its config written as JSON. Stages skip work whose artifacts already exist with the
same settings, so a rerun after a crash continues.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import privacy
from common.cli import main_guard
from common.errors import DPImgSynError
from common.files import atomic_write_text
from evaluation.release import EvaluationConfig, evaluate_release
from evaluation.report import (accuracy_key, plot_accuracy_vs_epsilon, render_report, result_rows, split_notes,
                               summarize, sweep_table, write_results_csv)
from stages.config import Pipeline
from stages.dp_statistics import StatisticsConfig, capture_statistics
from stages.student import StudentConfig, joined_k, train_student
from stages.synthesis import SynthesisConfig, synthesize
from stages.teacher import TeacherConfig, train_teacher
from synthesizer.export import export_release

ROOT = Path(__file__).resolve().parents[1]
SECONDS_FILE = "seconds.json"
# name -> (stage function, its config class, the CLI that runs it alone)
STAGES: dict[str, tuple[Callable[[Any], Any], type, str]] = {
    "teacher": (train_teacher, TeacherConfig, "train_dp.py"),
    "statistics": (capture_statistics, StatisticsConfig, "save_dp_db_stats.py"),
    "synthesis": (synthesize, SynthesisConfig, "synthesize.py"),
    "student": (train_student, StudentConfig, "train_student.py"),
}


def run_stage(name: str, config: Any, nproc: int = 1) -> None:
    """Stage ``name`` with ``config``: in this process, or on ``nproc`` local processes via torchrun."""
    function, _, script = STAGES[name]
    if nproc == 1:
        function(config)
        return
    launch = Path(config.output).parent / f".{Path(config.output).name}.{name}.json"
    atomic_write_text(launch, json.dumps(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stages.pipeline", name, str(launch)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = subprocess.run(command, check=False, env=environment).returncode
    launch.unlink(missing_ok=True)
    if code != 0:
        raise DPImgSynError(f"{script} failed on {nproc} processes (its error is above); "
                            "fix it and rerun the same command to continue")


def run_pipeline(pipeline: Pipeline, output: str | Path | None = None, progress: bool = True,
                 nproc: int = 1) -> dict:
    """Run every stage of ``pipeline`` (each on ``nproc`` processes); write and return ``report.json``'s content.

    A sweep (several target epsilons, or whole-pipeline seeds) runs one folder per (epsilon, seed)
    and returns the sweep's summary; every run and the sweep write ``results.csv`` and
    ``accuracy_vs_epsilon.png``.
    """
    if nproc < 1:
        raise DPImgSynError(f"the number of processes must be at least 1, got {nproc}")
    out = Path(output or pipeline.settings.output)
    if pipeline.epsilons == (None,) and pipeline.replicates == (None,):
        return run_once(pipeline, out, progress, nproc)
    rows, runs = [], []
    for epsilon in pipeline.epsilons:
        for seed in pipeline.replicates:
            name = "_".join(part for part in (epsilon is not None and f"eps{epsilon:g}",
                                              seed is not None and f"seed{seed}") if part)
            report = run_once(specialized(pipeline, epsilon, seed), out / name, progress, nproc)
            rows += result_rows(report, name, seed)
            runs.append({"run": name, "epsilon": report["epsilon"], "seed": seed, "target_epsilon": epsilon})
    split = pipeline.settings.eval_split
    summary = {"dataset": pipeline.settings.dataset, "public_set": pipeline.synthesis.public_set, "eval_split": split,
               **split_notes(split), "runs": runs, "results": rows, "table": sweep_table(rows)}
    write_results(out, rows, f"{summary['dataset']} <- {summary['public_set']}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    notes = "".join(f"**Outside the guarantee: {note}.**\n\n" for note in split_notes(split).values())
    atomic_write_text(out / "report.md", f"# DP-ImgSyn sweep: {summary['dataset']} (private) <- "
                      f"{summary['public_set']} (public)\n\n{notes}{split.capitalize()} accuracy (%), "
                      "final epoch: mean ± std over runs "
                      f"and seeds (n).\n\n{summary['table']}")
    return summary


def specialized(pipeline: Pipeline, epsilon: float | None, seed: int | None) -> Pipeline:
    """One run of a sweep: its target epsilon, and its seed for every stage (students: that seed alone)."""
    teacher, statistics, synthesis = pipeline.teacher, pipeline.statistics, pipeline.synthesis
    if epsilon is not None:
        teacher = replace(teacher, target_epsilon=epsilon)
    if seed is None:
        return replace(pipeline, teacher=teacher, epsilons=(None,), replicates=(None,))
    return replace(pipeline, teacher=replace(teacher, seed=seed), statistics=replace(statistics, seed=seed),
                   synthesis=replace(synthesis, seed=seed), seeds=(seed,), epsilons=(None,), replicates=(None,))


def write_results(out: Path, rows: list[dict], title: str) -> None:
    write_results_csv(out / "results.csv", rows)
    plot_accuracy_vs_epsilon(out / "accuracy_vs_epsilon.png", rows, title)


def teacher_accuracy(teacher: dict, teacher_path: Path, eval_split: str) -> float:
    """The teacher's final-epoch accuracy on ``eval_split``: the labelled test accuracy of the checkpoint, or the
    validation accuracy of the local, non-private log beside it (never in a shared artifact)."""
    if eval_split == "test":
        return teacher["test_acc"]
    with open(teacher_path.with_suffix(".metrics.csv"), newline="") as handle:
        return float(list(csv.DictReader(handle))[-1]["val_acc"])


def run_once(pipeline: Pipeline, out: Path, progress: bool, nproc: int) -> dict:
    """One run: every stage once per release and student seed; ``report.json`` and its table."""
    top = pipeline.settings
    out.mkdir(parents=True, exist_ok=True)
    # Wall-clock seconds per stage over every invocation in this folder, saved after each stage: a run
    # resumed after a kill (or rerun for a new student) reports all the time it took, not the last part.
    seconds_path = out / SECONDS_FILE
    spent: dict[str, float] = json.loads(seconds_path.read_text()) if seconds_path.is_file() else {}
    seconds: dict[str, float] = {}

    def record(name: str, started: float) -> None:
        seconds[name] = spent.get(name, 0.0) + time.time() - started
        atomic_write_text(seconds_path, json.dumps({**spent, **seconds}, indent=2))

    def timed(name: str, stage: str, config: Any) -> None:
        started = time.time()
        run_stage(stage, replace(config, progress=progress), nproc)
        record(name, started)

    teacher_path, stats_path = out / "teacher.dppt", out / "statistics.dppt"
    timed("teacher", "teacher", replace(pipeline.teacher, output=str(teacher_path)))
    teacher = privacy.load_dppt(teacher_path)
    sigma = teacher["settings"]["noise_multiplier"]
    stats_sigma = teacher["plan"]["statistics"]["noise_multiplier"]  # sigma unless a recipe splits the budget
    timed("statistics", "statistics", replace(pipeline.statistics, teacher=str(teacher_path), output=str(stats_path),
                                             noise_multiplier=stats_sigma))
    block = privacy.load_dppt(stats_path)["privacy"]

    releases = {k: out / f"release_k{k}" for k in pipeline.ks}
    for (k, release), num_samples in zip(releases.items(), pipeline.num_samples):
        timed(f"synthesis_k{k}", "synthesis", replace(pipeline.synthesis, teacher=str(stats_path), k=k,
                                                      num_samples=num_samples, output=str(release)))
        for fmt in top.exports:  # the release as other tools read it (no private data: post-processing)
            export_release(release, fmt, out / f"export_k{k}_{fmt}", progress=progress, dataset=top.dataset,
                           data_root=top.data_root)
    # One student per release and seed; with `together`, also one on all the releases at once (the same
    # DP teacher and statistics: the union is post-processing, at the run's epsilon).
    trained_on = {k: (release,) for k, release in releases.items()}
    if pipeline.together:
        trained_on[joined_k(pipeline.ks)] = tuple(releases.values())
    results, key = [], accuracy_key("student", top.eval_split)
    for k, paths in trained_on.items():
        for seed in pipeline.seeds:
            student_dir = out / f"student_k{k}_seed{seed}"
            timed(f"student_k{k}_seed{seed}", "student", replace(
                pipeline.student, release=tuple(map(str, paths)), seed=seed, output=str(student_dir)))
            metrics = json.loads((student_dir / "metrics.json").read_text())
            results.append({"k": k, "seed": seed, key: metrics[key]})

    evaluations = {}
    if top.evaluate:
        for k, release in releases.items():
            started = time.time()
            result = evaluate_release(EvaluationConfig(
                release=str(release), output=str(out / f"evaluation_k{k}"), device=top.device,
                data_root=top.data_root, dataset=top.dataset, public_set=pipeline.synthesis.public_set,
                teacher=str(stats_path), sampling_dir=pipeline.synthesis.sampling_dir,
                metrics=tuple(str(out / f"student_k{k}_seed{seed}" / "metrics.json") for seed in pipeline.seeds)))
            record(f"evaluation_k{k}", started)
            evaluations[str(k)] = {"card": str(result["card_markdown"]), "obfuscated": result["obfuscated"]}

    report = {
        "dataset": top.dataset, "public_set": pipeline.synthesis.public_set, "model": top.model,
        "epsilon": block["epsilon"], "delta": block["delta"], "accountant": block["accountant"],
        "noise_multiplier": sigma,
        accuracy_key("teacher", top.eval_split): teacher_accuracy(teacher, teacher_path, top.eval_split),
        "ledger": block["ledger"],
        "eval_split": top.eval_split, **split_notes(top.eval_split),
        "results": results, "summary": summarize(results, top.eval_split), "seconds": seconds,
        "releases": {str(k): str(path) for k, path in releases.items()},
        "evaluations": evaluations,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_report(report))
    write_results(out, result_rows(report, out.name), f"{top.dataset} <- {pipeline.synthesis.public_set}")
    return report


def _launched(argv: list[str] | None) -> None:
    """Under torchrun: one stage with the config the pipeline wrote as JSON."""
    name, path = argv if argv is not None else sys.argv[1:]
    function, config_class, _ = STAGES[name]
    function(config_class(**json.loads(Path(path).read_text())))


if __name__ == "__main__":
    raise SystemExit(main_guard(_launched)())
