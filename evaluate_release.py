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
with the same teacher.
"""
from __future__ import annotations

import argparse

from engine.cli import ArgumentParser, main_guard, positive_int
from engine.release_eval import (DEFAULT_GALLERY_PAIRS, DEFAULT_K_SSIM, DEFAULT_MAX_PRIVATE, DEFAULT_MAX_SYNTHETIC,
                                 evaluate_release)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="release folder written by synthesize.py (only read)")
    parser.add_argument("--dataset", help="private dataset to compare with (default: the release's; required for "
                                          "a folder: set, which releases record by its folder name only)")
    parser.add_argument("--public_set", help="the release's public set (default: the one it records; required for "
                                             "a folder: set)")
    parser.add_argument("--teacher", help="teacher .dppt (default: the file the release names, looked for beside "
                                          "the release and in checkpoints/); must match the sha256 recorded in "
                                          "the release")
    parser.add_argument("--metrics", nargs="+", default=[], metavar="METRICS_JSON",
                        help="metrics.json files of students trained on this release (default: not measured)")
    parser.add_argument("--max_synthetic", type=positive_int, default=DEFAULT_MAX_SYNTHETIC,
                        help=f"evaluate at most this many release images, a fixed random subset "
                             f"(default {DEFAULT_MAX_SYNTHETIC})")
    parser.add_argument("--max_private", type=positive_int, default=DEFAULT_MAX_PRIVATE,
                        help=f"use at most this many private train and test images each, a fixed random subset "
                             f"(default {DEFAULT_MAX_PRIVATE}); the card says when it subsampled")
    parser.add_argument("--k_ssim", type=positive_int, default=DEFAULT_K_SSIM,
                        help=f"SSIM is computed on this many L2-nearest candidates (default {DEFAULT_K_SSIM})")
    parser.add_argument("--gallery_pairs", type=positive_int, default=DEFAULT_GALLERY_PAIRS,
                        help=f"closest synthetic/private pairs in the gallery (default {DEFAULT_GALLERY_PAIRS})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--output", required=True, help="folder for the card and diagnostics (outside the release)")
    return parser


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return evaluate_release(args.release, args.output, metrics_paths=args.metrics, device=args.device,
                            data_root=args.data_root, dataset=args.dataset, teacher=args.teacher,
                            public_set=args.public_set,
                            max_synthetic=args.max_synthetic, max_private=args.max_private, k_ssim=args.k_ssim,
                            gallery_pairs=args.gallery_pairs)


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
