#!/usr/bin/env python
"""Run the four DP-ImgSyn stages from one YAML config and write report.json + report.md.

Stages whose artifacts already exist with the same settings are skipped, so rerunning the
same command after an interruption continues where it stopped.

A config whose target_epsilon is a list (and/or with top-level seeds: one whole run per seed)
is a sweep: one run folder per (epsilon, seed), and results.csv, report.md and
accuracy_vs_epsilon.png over all of them. --epsilons and --seeds sweep any config.

A config may start from another (base: demo_tuned.yaml, relative to the file) and give only the
keys it changes (configs/demo_eps1.yaml); synthesis.num_samples is one count for every k or one per k.
With 'recipe: auto' (the demo, configs/demo.yaml) or a recipe file (configs/recipe_auto.yaml) the
numbers follow rules of N and epsilon instead (docs/recipes.md): one file for a private set of any size.

Examples:
  python run_pipeline.py --config configs/demo.yaml
  python run_pipeline.py --config configs/paper.yaml --row mnist_eps1_tinyimagenet
  python run_pipeline.py --config configs/paper.yaml --row mnist_eps1_tinyimagenet --nproc 4
  python run_pipeline.py --config configs/demo.yaml --epsilons 1 2 4 10 --seeds 0 1 2 --output runs/sweep
"""
from __future__ import annotations

from common.cli import ArgumentParser, main_guard, nonnegative_int, positive_float, positive_int
from stages.config import load_config
from evaluation.report import render_report
from stages.pipeline import run_pipeline


def build_parser() -> ArgumentParser:
    parser = ArgumentParser.for_script(__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML (see configs/demo.yaml)")
    parser.add_argument("--row", help="row of a multi-row config (configs/paper.yaml: e.g. mnist_eps1_tinyimagenet)")
    parser.add_argument("--output", help="output folder (overrides the config's 'output')")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes per stage (one per GPU), launched with torchrun on this machine; "
                        "the privacy guarantee does not change")
    parser.add_argument("--epsilons", nargs="+", type=positive_float, default=(), metavar="EPSILON",
                        help="sweep: one run per total epsilon (replaces the config's target_epsilon)")
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, default=(), metavar="SEED",
                        help="sweep: one whole run per seed (replaces the stages' own seeds)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    pipeline = load_config(args.config, args.row, args.epsilons, args.seeds)
    report = run_pipeline(pipeline, args.output, progress=not args.no_progress, nproc=args.nproc)
    print()
    if "table" in report:  # a sweep: one run folder per (epsilon, seed)
        print(report["table"])
        print(f"runs: {', '.join(run['run'] for run in report['runs'])}; results.csv, accuracy_vs_epsilon.png")
        return report
    print(render_report(report))
    print("previews: " + ", ".join(f"{path}/preview.png" for path in report["releases"].values()))
    return report


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
