#!/usr/bin/env python
"""Stage 4: train a student on a release bundle only (knowledge distillation) and test it.

The student sees the released images and the teacher's soft labels from the bundle; the
private *test* split is used for the final-epoch accuracy only (never to choose an epoch).

Example:
  python train_student.py --release releases/mnist_tiny_k10 --output runs/student_k10_s111 --seed 111
Several GPUs: torchrun --standalone --nproc_per_node 4 train_student.py ... (--batch_size stays global).
"""
from __future__ import annotations

import argparse

from engine.cli import ArgumentParser, main_guard, nonnegative_float, nonnegative_int, positive_float, positive_int
from engine.precision import PRECISION_HELP, PRECISIONS
from engine.student import train_student


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="release folder written by synthesize.py")
    parser.add_argument("--dataset", help="private dataset for the test split (default: the release's; required "
                        "for a folder: set, which releases record by its folder name only)")
    parser.add_argument("--model", default="resnet18", help="student architecture from the registry")
    parser.add_argument("--epochs", type=positive_int, default=200, help="training epochs")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="batch size")
    parser.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate (MultiStepLR at 60/75/90%%)")
    parser.add_argument("--momentum", type=nonnegative_float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight_decay", type=nonnegative_float, default=1e-4, help="SGD weight decay")
    parser.add_argument("--T", type=positive_float, default=100.0, help="distillation temperature (paper: 100)")
    parser.add_argument("--alpha", type=nonnegative_float, default=1.0, help="weight of the soft (KL) term")
    parser.add_argument("--beta", type=nonnegative_float, default=0.0, help="weight of the hard-label CE term")
    parser.add_argument("--augment", action="store_true", help="random crop + flip of the released images")
    parser.add_argument("--eval_every", type=nonnegative_int, default=0,
                        help="log test accuracy every N epochs (information only; 0 = final epoch only)")
    parser.add_argument("--seed", type=int, default=111, help="seed of init and batch order")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the test set if missing")
    parser.add_argument("--output", required=True, help="folder for metrics.json and student.pt")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None):
    return train_student(build_parser().parse_args(argv))


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
