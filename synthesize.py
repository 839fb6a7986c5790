#!/usr/bin/env python
"""Stage 3: align public images to the DP teacher and its DP statistics; write a release bundle.

Reads only the stage-2 `.dppt` (teacher + DP statistics + ledger) and the public set; never
private data. --k 0 releases the aligned public images unchanged (DP-ImgSyn(0)).

Example:
  python synthesize.py --teacher checkpoints/mnist_stats.dppt --public_set tinyimagenet \\
      --num_samples 60000 --k 10 --output releases/mnist_tiny_k10
Rerun the same command after an interruption: finished shards are kept, the rest is redone.
Several GPUs: torchrun --standalone --nproc_per_node 4 synthesize.py ... (the same release, faster).
"""
from __future__ import annotations

from common.cli import StageCLI
from stages.synthesis import SynthesisConfig, synthesize

cli = StageCLI(__doc__, SynthesisConfig, synthesize)
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
