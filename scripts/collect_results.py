#!/usr/bin/env python
"""Turn finished paper runs (runs/paper/<row>/report.json) into the paper's results table and plots.

Usage: python scripts/collect_results.py [--runs runs/paper] [--output results.md] [--figures DIR]
Rows that have not finished are listed as missing; accuracies are mean ± std over seeds (n). The
figures folder gets results.csv and one accuracy_vs_epsilon_<private>_<public>.png per pair of sets.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import ArgumentParser, main_guard  # noqa: E402
from stages.paper import row_names  # noqa: E402
from common.files import atomic_write_text  # noqa: E402
from evaluation.report import plot_accuracy_vs_epsilon, result_rows, write_results_csv  # noqa: E402


def _cell(summary: list[dict], k: int) -> str:
    for row in summary:
        if row["k"] == k:
            return (f"{100 * row['mean']:.2f}" if row["seeds"] == 1 else
                    f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} (n={row['seeds']})")
    return "—"


def collect(runs: Path, config: str = "configs/paper.yaml") -> str:
    """The markdown table, one line per paper row, in the paper's order."""
    lines = ["| Row | Private | epsilon | Public | DP-ImgSyn(0) | DP-ImgSyn(k_exp) | k_exp |",
             "|---|---|---|---|---|---|---|"]
    for name in row_names(config):
        path = runs / name / "report.json"
        if not path.is_file():
            lines.append(f"| {name} | missing | | | | | |")
            continue
        report = json.loads(path.read_text())
        k_exp = max(row["k"] for row in report["summary"])
        lines.append(f"| {name} | {report['dataset']} | {report['epsilon']:.2f} | {report['public_set']} | "
                     f"{_cell(report['summary'], 0)} | {_cell(report['summary'], k_exp)} | {k_exp} |")
    return "\n".join(lines) + "\n"


def figures(runs: Path, folder: Path, config: str = "configs/paper.yaml") -> list[Path]:
    """results.csv of every finished row and, per (private, public) pair, accuracy against epsilon."""
    rows = []
    for name in row_names(config):
        path = runs / name / "report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            rows += [{**row, "pair": (report["dataset"], report["public_set"])} for row in result_rows(report, name)]
    written = []
    for private, public in sorted({row["pair"] for row in rows}):
        path = folder / f"accuracy_vs_epsilon_{private}_{public}.png"
        plot_accuracy_vs_epsilon(path, [row for row in rows if row["pair"] == (private, public)],
                                 f"{private} <- {public}")
        written.append(path)
    write_results_csv(folder / "results.csv", [{key: value for key, value in row.items() if key != "pair"}
                                               for row in rows])
    return written


def run(argv: list[str] | None = None) -> str:
    parser = ArgumentParser.for_script(__doc__)
    parser.add_argument("--runs", default="runs/paper", help="folder holding one subfolder per row")
    parser.add_argument("--config", default="configs/paper.yaml", help="paper rows config")
    parser.add_argument("--output", help="also write the table to this markdown file")
    parser.add_argument("--figures", default="runs/paper/figures", help="folder for results.csv and the plots")
    args = parser.parse_args(argv)
    table = collect(Path(args.runs), args.config)
    print(table)
    print("figures: " + ", ".join(map(str, figures(Path(args.runs), Path(args.figures), args.config))))
    if args.output:
        atomic_write_text(args.output, table)
    return table


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
