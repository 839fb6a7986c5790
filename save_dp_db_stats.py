#!/usr/bin/env python
"""Stage 2: DP estimates of every normalization layer's input mean/variance on the private data.

A subsampled Gaussian mechanism (per-sample statistics clipped to --max_norm, Poisson
sampling, noise sigma*C), composed with the teacher's DP-SGD in one ledger. Writes a `.dppt`
with the teacher weights, the DP statistics and the extended ledger. Sigma, epochs and batch size
default to the plan train_dp.py stored in the teacher, so the total epsilon is the one it
calibrated for; a run that deviates prints the resulting total next to the planned one.

Example:
  python save_dp_db_stats.py --teacher checkpoints/mnist_resnet18_nm_0.5__.dppt --stats_epochs 2 \\
      --stats_batch_size 64 --max_norm 1 --noise_multiplier 0.5 --output checkpoints/mnist_stats.dppt
Several GPUs: torchrun --standalone --nproc_per_node 4 save_dp_db_stats.py ... (noise added once, same ledger).
"""
from __future__ import annotations

from common.cli import StageCLI
from stages.dp_statistics import StatisticsConfig, capture_statistics

cli = StageCLI(__doc__, StatisticsConfig, capture_statistics)
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
