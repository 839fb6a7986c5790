#!/usr/bin/env python
"""Stage 2: DP estimates of every normalization layer's input mean/variance on the private data.

A subsampled Gaussian mechanism (per-sample statistics clipped to --max_norm, Poisson
sampling, noise sigma*C), composed with the teacher's DP-SGD in one ledger. Writes a `.dppt`
with the teacher weights, the DP statistics and the extended ledger. Sigma, epochs and batch size
default to the plan train_dp.py stored in the teacher, so the total epsilon is the one it
calibrated for; a run that deviates prints the resulting total next to the planned one.

Example:
  python save_dp_db_stats.py --teacher checkpoints/mnist_resnet18_nm_0.5__.dppt --epochs 2 \\
      --train_batch_size 64 --max_norm 1 --noise_multiplier 0.5 --output checkpoints/mnist_stats.dppt
Several GPUs: torchrun --standalone --nproc_per_node 4 save_dp_db_stats.py ... (noise added once, same ledger).
"""
from __future__ import annotations

import argparse

from engine.cli import ArgumentParser, main_guard, positive_float, positive_int, probability
from engine.statistics import capture_statistics


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="stage-1 .dppt written by train_dp.py (or imported): "
                        "a local path or an http(s)/file URL, downloaded to checkpoints/pretrained_DP_models/")
    parser.add_argument("--sha256", help="expected SHA-256 of --teacher (required for a URL without a known digest)")
    parser.add_argument("--dataset", help="private dataset (default: the teacher's; must match it; required for a "
                        "folder: set, which checkpoints record by its folder name only)")
    parser.add_argument("--epochs", type=positive_float, help="eta_bn: passes over the data in expectation "
                        "(default: the teacher's plan, else 2)")
    parser.add_argument("--train_batch_size", type=positive_int, help="Omega_bn: expected Poisson batch size "
                        "(default: the teacher's plan, else 64)")
    parser.add_argument("--max_norm", type=positive_float, default=1.0, help="C: L2 clipping norm of each per-sample statistics vector")
    parser.add_argument("--noise_multiplier", type=positive_float, help="sigma: noise std / C "
                        "(default: the teacher's plan, i.e. the sigma train_dp.py calibrated for both stages, else 0.5)")
    parser.add_argument("--public_set", help="public set whose statistics pre-scale the coordinates before clipping "
                        "(cuts clipping bias at no privacy cost)")
    parser.add_argument("--clip_quantile", type=probability,
                        help="with --public_set: take C as this quantile of the public per-sample norms (overrides --max_norm)")
    parser.add_argument("--non_private", action="store_true",
                        help="ablation only: exact statistics, no clipping or noise; the ledger records epsilon = inf")
    parser.add_argument("--report_bias", action="store_true",
                        help="diagnostic: re-read the private data to print the DP statistics' error (not private; local only)")
    parser.add_argument("--seed", type=int, help="seed of sampling and noise (default: fresh OS entropy). "
                        "Anyone who knows it can regenerate the noise: keep a fixed seed secret; it is never stored in artifacts")
    parser.add_argument("--secure_mode", action="store_true",
                        help="draw the Poisson sampling and the noise from the operating system's randomness "
                        "(not seedable: --seed is refused; nothing can regenerate the noise)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset if missing")
    parser.add_argument("--output", required=True, help="statistics .dppt path ('.dppt' appended when missing)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None):
    return capture_statistics(build_parser().parse_args(argv))


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
