#!/usr/bin/env python
"""Evaluate a release against the private data: utility, obfuscation, fidelity, and a release card.

An analysis tool for the data owner: it READS THE PRIVATE training and test images and writes
only into --output (release_card.md/.json, a gallery of the closest synthetic/private pairs,
per-image nearest-neighbour distances); the release folder is never modified. The card's
"Publishable" part repeats what the release already discloses (epsilon, delta, ledger, counts,
preview); its "Internal" part (accuracies, obfuscation, fidelity, gallery) is not for publication.

Example:
  python evaluate_release.py --release releases/mnist_tiny_k10 --output eval/mnist_tiny_k10 \\
      --metrics runs/student_k10_s111/metrics.json
The teacher is the checkpoint the release names (found beside the release or in checkpoints/,
verified by its sha256); pass --teacher if it is elsewhere. Fidelity uses the DP teacher's
penultimate features, not Inception: the figures are comparable only between releases evaluated
with the same teacher. --seeds (without --metrics) trains students here, as train_student.py would.

Any method's release, e.g. DPImageBench's gen.npz, is evaluated the same way:
  python evaluate_release.py --release gen.npz --dataset mnist --output eval/other_method \
      --teacher runs/demo/statistics.dppt --seeds 111 2023 50173
The .npz holds images x (float32 N x C x H x W in [0, 1], or uint8 N x H x W x C) and labels y,
already at the private set's size (C = 1 is repeated for a gray set). Students (--model, the
student stage's recipe) train from scratch on its hard labels (cross-entropy; --T, --alpha and --beta
do not apply); fidelity uses --teacher's features, else the first student's. The card says what
could not be computed: the file carries no DP ledger, so its privacy is unknown.
"""
from __future__ import annotations

from common.cli import StageCLI
from evaluation.release import EvaluationConfig, evaluate_release

cli = StageCLI(__doc__, EvaluationConfig, evaluate_release, skip=("download", "progress"))
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
