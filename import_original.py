#!/usr/bin/env python
"""Convert a checkpoint released by the original DP-ImgSyn authors into this project's `.dppt` format.

The original files are pickles that also hold accountant objects; they are read with a
restricted unpickler that builds only tensors and plain values, so none of their code runs.
An imported teacher's privacy ledger is one entry marked "claimed by source" (the epsilon of
its recorded accountant history, or the one its source published). Imported normalization
statistics are recorded as NON-PRIVATE (epsilon = inf), whatever epsilon the file states: the
original mechanism never added its noise, so synthesis uses them only with --non_private (to
reproduce the paper's numbers). For a real guarantee import the teacher alone (--as_teacher) and
run save_dp_db_stats.py on it.

Examples:
  python import_original.py --source checkpoints/pretrained_DP_models/mnist_stats.dppt --dataset mnist \\
      --output checkpoints/mnist_stats_imported.dppt
  python import_original.py --source checkpoints/pretrained_DP_models/mnist_stats.dppt --dataset mnist \\
      --as_teacher --output checkpoints/mnist_teacher_imported.dppt
  python import_original.py --source https://example.org/mnist_teacher.dppt --sha256 <64 hex digits> \\
      --dataset mnist --epsilon 1 --delta 1e-5 --output checkpoints/mnist_teacher_imported.dppt
"""
from __future__ import annotations

from common.cli import ArgumentParser, main_guard, nonnegative_float, probability
from privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT, DEFAULT_DELTA
from registry import DEFAULT_MODEL
from stages.fetch import resolve_checkpoint
from stages.importer import import_original


def build_parser() -> ArgumentParser:
    parser = ArgumentParser.for_script(__doc__)
    parser.add_argument("--source", required=True, help="original .dppt file: a local path or an http(s)/file URL "
                        "(downloaded to checkpoints/pretrained_DP_models/)")
    parser.add_argument("--sha256", help="expected SHA-256 of --source (required for a URL without a known digest)")
    parser.add_argument("--dataset", required=True, help="private dataset the checkpoint was trained on "
                        "(registry name, e.g. mnist, fmnist, cifar10)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="architecture of the checkpoint (registry name)")
    parser.add_argument("--as_teacher", action="store_true",
                        help="import only the teacher weights of a statistics file, to recompute DP statistics "
                        "with save_dp_db_stats.py")
    parser.add_argument("--epsilon", type=nonnegative_float,
                        help="the source's published epsilon, for a teacher file that records no accountant history")
    parser.add_argument("--delta", type=probability,
                        help=f"the source's delta (default {DEFAULT_DELTA:g}) for --epsilon or for accounting a "
                        "recorded history")
    parser.add_argument("--accountant", choices=sorted(ACCOUNTANTS), default=DEFAULT_ACCOUNTANT,
                        help="accountant that turns a recorded teacher history into epsilon")
    parser.add_argument("--output", required=True, help="our .dppt to write ('.dppt' appended when missing)")
    parser.add_argument("--no_progress", action="store_true", help="no download progress bar")
    return parser


def run(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    source = resolve_checkpoint(args.source, args.sha256, progress=not args.no_progress)
    return import_original(source, args.output, args.dataset, args.model, "teacher" if args.as_teacher else None,
                           args.epsilon, args.delta, args.accountant)


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
