"""What a pipeline run (or a sweep of runs) reports: a table, a CSV of every result and a plot.

Accuracies are on the private *test* split, final epoch: reported, never used to choose anything; a
tuning run (``eval_split: validation``) scores on held-out training records instead and says so: its keys,
table, CSV and plot name the validation split, and the report is marked outside the guarantee.
A mean over one value is printed without "± 0.00", and every mean says how many values it has.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from common.files import atomic_path, atomic_write_csv

CSV_COLUMNS = ("epsilon", "delta", "seed", "method", "k", "student_seed", "accuracy", "split", "run_minutes", "run")
OUTSIDE_GUARANTEE = ("validation accuracies are computed from private training records without a mechanism: local "
                     "diagnostics, never publish")


def accuracy_key(role: str, split: str) -> str:
    """The key of a final-epoch accuracy named by its split (``teacher_test_acc``, ``student_validation_acc``), so
    that a report never labels validation figures as test ones."""
    return f"{role}_{split}_acc"


def split_notes(split: str) -> dict[str, str]:
    """What a report of ``split`` accuracies adds: the mark of a validation run, outside the guarantee."""
    return {"outside_guarantee": OUTSIDE_GUARANTEE} if split == "validation" else {}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def percent(values: list[float]) -> str:
    """``86.70 ± 0.12 (n=3)``; one value prints as ``86.70`` (no ± 0.00)."""
    mean, std, count = mean_std(values)
    return f"{100 * mean:.2f}" if count == 1 else f"{100 * mean:.2f} ± {100 * std:.2f} (n={count})"


def k_order(k: int | str) -> tuple[int, list[int]]:
    """Students of one release by k, then those of several releases together (k ``0+10``)."""
    parts = [int(part) for part in str(k).split("+")]
    return len(parts), parts


def summarize(results: list[dict], split: str = "test") -> list[dict]:
    """Mean ± std (sample std; 0 for one seed) of the student accuracy per k, like the paper's table."""
    summary, key = [], accuracy_key("student", split)
    for k in sorted({row["k"] for row in results}, key=k_order):
        mean, std, count = mean_std([row[key] for row in results if row["k"] == k])
        summary.append({"k": k, "mean": mean, "std": std, "seeds": count})
    return summary


def render_report(report: dict) -> str:
    """A markdown report of one run: privacy, teacher, and the student table (accuracies in %)."""
    split = report.get("eval_split", "test")
    key = accuracy_key("student", split)
    accuracies = {k: [row[key] for row in report["results"] if row["k"] == k]
                  for k in sorted({row["k"] for row in report["results"]}, key=k_order)}
    lines = [
        f"# DP-ImgSyn report: {report['dataset']} (private) <- {report['public_set']} (public)", "",
        *[f"**Outside the guarantee: {note}.**\n" for note in split_notes(split).values()],
        f"- epsilon {report['epsilon']:.3f} at delta {report['delta']:g} ({report['accountant']} accountant, "
        f"noise multiplier {report['noise_multiplier']:.4f})",
        f"- DP teacher {split} accuracy (final epoch): {100 * report[accuracy_key('teacher', split)]:.2f}%",
        f"- students: {split} accuracy (%), final epoch", "",
        "| Private dataset | epsilon | Public dataset | " + " | ".join(f"DP-ImgSyn({k})" for k in accuracies) + " |",
        "|---|---|---|" + "---|" * len(accuracies),
        f"| {report['dataset']} | {report['epsilon']:.2f} | {report['public_set']} | "
        + " | ".join(percent(values) for values in accuracies.values()) + " |", "",
        *[f"- release k={k}: {'obfuscated' if row['obfuscated'] else 'NOT obfuscated'} "
          f"(internal card, not for publication: {row['card']})" for k, row in report["evaluations"].items()],
        "", "Seconds per stage: " + ", ".join(f"{name} {value:.0f}" for name, value in report["seconds"].items()),
    ]
    return "\n".join(lines) + "\n"


def result_rows(report: dict, run: str, seed: int | None = None) -> list[dict]:
    """One CSV row for the teacher and one per student of a run's report."""
    split = report.get("eval_split", "test")
    common = {"epsilon": report["epsilon"], "delta": report["delta"], "seed": "" if seed is None else seed,
              "split": split, "run_minutes": round(sum(report["seconds"].values()) / 60, 2), "run": run}
    rows = [{**common, "method": "teacher", "k": "", "student_seed": "",
             "accuracy": report[accuracy_key("teacher", split)]}]
    rows += [{**common, "method": f"DP-ImgSyn({row['k']})", "k": row["k"], "student_seed": row["seed"],
              "accuracy": row[accuracy_key("student", split)]} for row in report["results"]]
    return rows


def write_results_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, CSV_COLUMNS)


def _methods(rows: list[dict]) -> list[str]:
    students = {row["method"] for row in rows} - {"teacher"}
    return ["teacher"] + sorted(students, key=lambda method: k_order(method[len("DP-ImgSyn("):-1]))


def sweep_table(rows: list[dict]) -> str:
    """Markdown: one line per target epsilon, one column per method (mean ± std over runs and seeds, n)."""
    epsilons = sorted({round(row["epsilon"], 2) for row in rows})
    methods = _methods(rows)
    lines = ["| epsilon | " + " | ".join(methods) + " | minutes per run |", "|---|" + "---|" * (len(methods) + 1)]
    for epsilon in epsilons:
        here = [row for row in rows if round(row["epsilon"], 2) == epsilon]
        minutes = mean_std(list({row["run"]: row["run_minutes"] for row in here}.values()))[0]
        cells = [percent([row["accuracy"] for row in here if row["method"] == method]) if any(
            row["method"] == method for row in here) else "—" for method in methods]
        lines.append(f"| {epsilon:g} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_epsilon(path: Path, rows: list[dict], title: str) -> None:
    """Accuracy (%) against epsilon (log scale), one line per method: mean ± std, n at every point.

    The axis, the title and the PNG's own text fields name the split (and mark validation figures as
    outside the guarantee), so the picture says what it holds wherever it is copied.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for method in _methods(rows):
        points = sorted({row["epsilon"] for row in rows if row["method"] == method})
        stats = [mean_std([row["accuracy"] for row in rows if row["method"] == method and row["epsilon"] == eps])
                 for eps in points]
        axes.errorbar(points, [100 * mean for mean, _, _ in stats], yerr=[100 * std for _, std, _ in stats],
                      marker="o", capsize=3, label=method)
        for epsilon, (mean, _, count) in zip(points, stats):
            axes.annotate(f"n={count}", (epsilon, 100 * mean), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    splits = sorted({row["split"] for row in rows})
    notes = [note for split in splits for note in split_notes(split).values()]
    ylabel, title = f"{' / '.join(splits)} accuracy (%)", f"{title} ({' / '.join(splits)} split)"
    shown = title + ("\noutside the guarantee: local diagnostics, never publish" if notes else "")
    axes.set(xscale="log", xlabel="epsilon (delta as in the runs)", ylabel=ylabel, title=shown)
    epsilons = sorted({row["epsilon"] for row in rows})
    axes.set_xticks(epsilons, [f"{epsilon:.3g}" for epsilon in epsilons], minor=False)
    axes.minorticks_off()
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120,
                       metadata={"Title": title, "Description": "; ".join([f"{ylabel} against epsilon", *notes])})
    pyplot.close(figure)
