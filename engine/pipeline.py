"""The whole pipeline from one config: teacher -> DP statistics -> releases per k -> students.

Each stage is the stage script's own ``run`` (same code path as the CLI), called in this process
or, with ``nproc`` > 1, launched on that many processes through torchrun. Stages skip work whose
artifacts already exist with the same settings, so a rerun after a crash continues.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import privacy
import save_dp_db_stats
import synthesize
import train_dp
import train_student
from engine.release_eval import evaluate_release
from engine.runtime import atomic_write_text
from errors import DPImgSynError


def _flags(**values) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


def _common(config: dict) -> dict:
    return {"device": config["device"], "data_root": config["data_root"]}


def run_stage(stage: ModuleType, argv: list[str], nproc: int = 1) -> None:
    """One stage script with ``argv``: in this process, or on ``nproc`` local processes via torchrun."""
    if nproc == 1:
        stage.run(argv)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(stage.__file__).resolve()), *argv]
    if subprocess.run(command, check=False).returncode != 0:
        raise DPImgSynError(f"{Path(stage.__file__).name} failed on {nproc} processes (its error is above); "
                            "fix it and rerun the same command to continue")


def run_pipeline(config: dict, output: str | Path | None = None, progress: bool = True, nproc: int = 1) -> dict:
    """Run every stage of ``config`` (each on ``nproc`` processes); write and return ``report.json``'s content."""
    if nproc < 1:
        raise DPImgSynError(f"the number of processes must be at least 1, got {nproc}")
    out = Path(output or config["output"])
    out.mkdir(parents=True, exist_ok=True)
    quiet = not progress
    seconds: dict[str, float] = {}
    t, s, syn, st = config["teacher"], config["statistics"], config["synthesis"], config["student"]

    started = time.time()
    teacher_path = out / "teacher.dppt"
    run_stage(train_dp, _flags(
        dataset=config["dataset"], model=config["model"], epochs=t["epochs"],
        train_batch_size=t["train_batch_size"], lr=t["lr"], max_norm=t["max_norm"], seed=t["seed"],
        noise_multiplier=config["noise_multiplier"], target_epsilon=config["target_epsilon"],
        stats_epochs=s["epochs"], stats_batch_size=s["train_batch_size"], delta=config["delta"],
        accountant=config["accountant"], max_physical_batch_size=t["max_physical_batch_size"],
        grad_sample_mode=t["grad_sample_mode"], secure_mode=t["secure_mode"], output=teacher_path,
        no_progress=quiet, **_common(config)), nproc)
    seconds["teacher"] = time.time() - started
    teacher = privacy.load_dppt(teacher_path)
    sigma = teacher["settings"]["noise_multiplier"]

    started = time.time()
    stats_path = out / "statistics.dppt"
    run_stage(save_dp_db_stats, _flags(
        teacher=teacher_path, dataset=config["dataset"], epochs=s["epochs"],
        train_batch_size=s["train_batch_size"],
        max_norm=s["max_norm"], noise_multiplier=sigma, public_set=s["public_set"],
        clip_quantile=s["clip_quantile"], seed=s["seed"], secure_mode=s["secure_mode"],
        output=stats_path, no_progress=quiet, **_common(config)), nproc)
    seconds["statistics"] = time.time() - started
    block = privacy.load_dppt(stats_path)["privacy"]

    releases: dict[int, Path] = {}
    for k in syn["g_steps"]:
        started = time.time()
        releases[k] = out / f"release_k{k}"
        run_stage(synthesize, _flags(
            teacher=stats_path, public_set=syn["public_set"], num_samples=syn["num_samples"], g_steps=k,
            batch_size=syn["batch_size"], batches_per_shard=syn["batches_per_shard"], lr_g=syn["lr_g"],
            bn=syn["bn"], oh=syn["oh"], tv=syn["tv"], l2=syn["l2"], targets=syn["targets"],
            no_flip=not syn["flip"], seed=syn["seed"], output=releases[k], no_progress=quiet,
            **_common(config)), nproc)
        seconds[f"synthesis_k{k}"] = time.time() - started

    results = []
    for k, release in releases.items():
        for seed in st["seeds"]:
            started = time.time()
            student_dir = out / f"student_k{k}_seed{seed}"
            run_stage(train_student, _flags(
                release=release, model=st["model"], epochs=st["epochs"], batch_size=st["batch_size"],
                lr=st["lr"], momentum=st["momentum"], weight_decay=st["weight_decay"], T=st["T"],
                alpha=st["alpha"], beta=st["beta"], augment=st["augment"], seed=seed, dataset=config["dataset"],
                output=student_dir, no_progress=quiet, **_common(config)), nproc)
            metrics = json.loads((student_dir / "metrics.json").read_text())
            seconds[f"student_k{k}_seed{seed}"] = time.time() - started
            results.append({"k": k, "seed": seed, "student_test_acc": metrics["student_test_acc"]})

    evaluations = {}
    if config["evaluate"]:
        for k, release in releases.items():
            started = time.time()
            result = evaluate_release(
                release, out / f"evaluation_k{k}", device=config["device"], data_root=config["data_root"],
                dataset=config["dataset"], public_set=syn["public_set"], teacher=stats_path,
                metrics_paths=[out / f"student_k{k}_seed{seed}" / "metrics.json" for seed in st["seeds"]])
            seconds[f"evaluation_k{k}"] = time.time() - started
            evaluations[str(k)] = {"card": str(result["card_markdown"]), "obfuscated": result["obfuscated"]}

    report = {
        "dataset": config["dataset"], "public_set": syn["public_set"], "model": config["model"],
        "epsilon": block["epsilon"], "delta": block["delta"], "accountant": block["accountant"],
        "noise_multiplier": sigma, "teacher_test_acc": teacher["test_acc"], "ledger": block["ledger"],
        "results": results, "summary": summarize(results), "seconds": seconds,
        "releases": {str(k): str(path) for k, path in releases.items()},
        "evaluations": evaluations,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_report(report))
    return report


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± std (sample std; 0 for one seed) of the student accuracy per k, like the paper's table."""
    summary = []
    for k in sorted({row["k"] for row in results}):
        accs = [row["student_test_acc"] for row in results if row["k"] == k]
        summary.append({"k": k, "mean": statistics.fmean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs)})
    return summary


def render_report(report: dict) -> str:
    """A markdown report: privacy, teacher, and the student table (accuracies in %)."""
    lines = [
        f"# DP-ImgSyn report: {report['dataset']} (private) <- {report['public_set']} (public)", "",
        f"- epsilon {report['epsilon']:.3f} at delta {report['delta']:g} ({report['accountant']} accountant, "
        f"noise multiplier {report['noise_multiplier']:.4f})",
        f"- DP teacher test accuracy (final epoch): {100 * report['teacher_test_acc']:.2f}%", "",
        "| Private dataset | epsilon | Public dataset | " + " | ".join(
            f"DP-ImgSyn({row['k']})" for row in report["summary"]) + " |",
        "|---|---|---|" + "---|" * len(report["summary"]),
        f"| {report['dataset']} | {report['epsilon']:.2f} | {report['public_set']} | " + " | ".join(
            f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}" for row in report["summary"]) + " |", "",
        *[f"- release k={k}: {'obfuscated' if row['obfuscated'] else 'NOT obfuscated'} "
          f"(internal card, not for publication: {row['card']})" for k, row in report["evaluations"].items()],
        "", "Seconds per stage: " + ", ".join(f"{name} {value:.0f}" for name, value in report["seconds"].items()),
    ]
    return "\n".join(lines) + "\n"
