#!/usr/bin/env python
"""Stage 4: train a student on a release bundle only (knowledge distillation) and test it.

The student sees the released images and the teacher's soft labels from the bundle; the
private *test* split is used for the final-epoch accuracy only (never to choose an epoch).

Example:
  python train_student.py --release releases/mnist_tiny_k10 --output runs/student_k10_s111 --seed 111
Several GPUs: torchrun --standalone --nproc_per_node 4 train_student.py ... (--batch_size stays global).
"""
from __future__ import annotations

from common.cli import StageCLI
from stages.student import StudentConfig, train_student

cli = StageCLI(__doc__, StudentConfig, train_student)
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
