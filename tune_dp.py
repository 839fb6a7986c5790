#!/usr/bin/env python
"""Stage 1 with paid tuning: the best teacher of a random number of DP-SGD runs over public candidates.

The number of runs K is drawn from a public distribution (mean --mean_runs), each run trains a candidate drawn at
random from the --candidates file and is scored on the validation part through a noisy count; only the best
teacher is written, and its ledger counts every run (Papernot & Steinke 2022), so the epsilon printed is the
true total. Tuning on your own private data without this is not covered by the ledger.

Example:
  python tune_dp.py --dataset folder:my_images --model small_cnn --noise_multiplier 1.2 --val_split 0.1 \\
      --candidates candidates.yaml --mean_runs 5 --output checkpoints/tuned.dppt
  where candidates.yaml holds  candidates: [{lr: 1}, {lr: 2, epochs: 20}, {lr: 4, max_norm: 0.5}]
Then run save_dp_db_stats.py on the tuned teacher as on any other. Rerun the same command after an interruption.
"""
from __future__ import annotations

from common.cli import StageCLI
from stages.tuning import TuningConfig, tune_teacher

cli = StageCLI(__doc__, TuningConfig, tune_teacher, skip=("target_epsilon", "recipe"))  # the ledger lists sigmas
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
