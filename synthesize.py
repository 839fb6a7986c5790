#!/usr/bin/env python
"""Stage 3: align public images to the DP teacher and its DP statistics; write a release bundle.

Reads only the stage-2 `.dppt` (teacher + DP statistics + ledger) and the public set; never
private data. --g_steps 0 releases the aligned public images unchanged (DP-ImgSyn(0)).

Example:
  python synthesize.py --teacher checkpoints/mnist_stats.dppt --public_set tinyimagenet \\
      --num_samples 60000 --g_steps 10 --output releases/mnist_tiny_k10
Rerun the same command after an interruption: finished shards are kept, the rest is redone.
Several GPUs: torchrun --standalone --nproc_per_node 4 synthesize.py ... (the same release, faster).
"""
from __future__ import annotations

import argparse

from engine.cli import (ArgumentParser, main_guard, nonnegative_float, nonnegative_int, positive_float,
                        positive_int)
from engine.precision import PRECISION_HELP, PRECISIONS
from engine.synthesis import synthesize


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="stage-2 .dppt (teacher with DP statistics): a local "
                        "path or an http(s)/file URL, downloaded to checkpoints/pretrained_DP_models/")
    parser.add_argument("--sha256", help="expected SHA-256 of --teacher (required for a URL without a known digest)")
    parser.add_argument("--public_set", required=True, help="public dataset from the registry (e.g. tinyimagenet, photos)")
    parser.add_argument("--num_samples", type=positive_int, default=60000, help="number of images to release")
    parser.add_argument("--g_steps", type=nonnegative_int, default=1, help="k: optimization steps per batch (0 = public images as they are)")
    parser.add_argument("--batch_size", type=positive_int, default=80, help="images optimized together (paper: 80)")
    parser.add_argument("--batches_per_shard", type=positive_int, default=25, help="batches per resumable shard")
    parser.add_argument("--lr_g", type=positive_float, default=0.1, help="Adam learning rate on the pixels")
    parser.add_argument("--bn", type=nonnegative_float, default=10.0, help="weight of the DP-statistics matching loss")
    parser.add_argument("--oh", type=nonnegative_float, default=1.0, help="weight of the cross-entropy to the targets")
    parser.add_argument("--tv", type=nonnegative_float, default=2.5e-5, help="weight of the total-variation prior")
    parser.add_argument("--l2", type=nonnegative_float, default=3e-8, help="weight of the image L2 norm")
    parser.add_argument("--targets", choices=("cyclic", "teacher"), default="cyclic",
                        help="cyclic: classes 0..C-1 repeated (paper); teacher: the teacher's prediction on the public image")
    parser.add_argument("--no_flip", action="store_true", help="no random horizontal flips during optimization")
    parser.add_argument("--non_private", action="store_true",
                        help="ablation only: accept a teacher without DP statistics or ledger (epsilon = inf)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter/flip draws (per shard)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the public set if missing")
    parser.add_argument("--output", required=True, help="release folder to create (or resume)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None):
    return synthesize(build_parser().parse_args(argv))


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
