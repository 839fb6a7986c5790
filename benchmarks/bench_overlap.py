"""The content check of public against private images versus the synthesis it guards, per released image.

The data owner's demo-sized case: the 5,000 mnist5k digits written as a folder set of PNG files
(train and test) are the private set, photos the public set. The measured side is the whole check
a synthesis stage runs before it writes anything: key the ``--num_public`` public images the
release will hold, get the private images' keys and search for matches. The private keys are
either made (``first``: every private file decoded, as the first stage that checks does) or read
from the owner-only file where that stage kept them (``kept``: every later stage and run). The
reference is synthesis itself: ``--steps`` optimization steps of a batch through the frozen
teacher (the demo's teacher and its k = 10 release). Both are per released image, so the ratio is
the fraction the check adds to a ``--num_public``-image release stage.

    python benchmarks/bench_overlap.py
    python benchmarks/bench_overlap.py --model small_cnn      # a cheaper teacher: the check weighs more
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# harness first: it puts the repository on sys.path
from harness import Goal, benchmark_parser, report, set_up, time_sides
from bench_synthesis import add_size_flags, make_sides
from common.cli import main_guard, positive_int
import registry
from synthesizer import overlap

GOAL = Goal("<=", 0.1)


def write_folder(root: Path, per_split: dict[str, int]) -> str:
    """mnist5k's digits as ``root/{train,test}/<digit>/<i>.png`` (28 x 28 gray, as the data owner has them)."""
    from sources.embedded import _mnist5k_arrays

    images, labels, indices = _mnist5k_arrays()
    for split, limit in per_split.items():
        for index in indices[split][:limit]:
            folder = root / split / str(int(labels[index]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index, 0]).save(folder / f"{index}.png")
    return f"{registry.FOLDER_PREFIX}{root}"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    add_size_flags(parser)
    parser.add_argument("--num_private", type=positive_int, default=5000,
                        help="private images in the folder set (train and test, 4:1)")
    parser.add_argument("--num_public", type=positive_int, default=1000, help="public images released")
    parser.set_defaults(steps=10, model="scatter_cnn")
    args = parser.parse_args(argv)
    device = set_up(args)

    with tempfile.TemporaryDirectory() as temp:
        os.environ[overlap.CACHE_ENV] = str(Path(temp) / "cache")
        private = write_folder(Path(temp) / "private", {"train": args.num_private * 4 // 5,
                                                        "test": args.num_private // 5})
        view, _ = registry.folder_view(private)
        public = registry.aligned("photos", private, **view)
        indices = np.arange(args.num_public)

        def check(kept: bool) -> int:
            overlap._private_keys.cache_clear()  # nothing kept in this process: as in a new stage
            if not kept:
                shutil.rmtree(overlap.cache_dir(), ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):
                overlap.check_public_items("photos", public, indices, private, None, view, "benchmark")
            return args.num_public

        sides = {"first": lambda: check(False), "kept": lambda: check(True),
                 "synthesis": make_sides(args, device)["synthesis"]}
        timings = time_sides(sides, args.repeats, args.warmup, device)
    print(f"# {args.num_private} private PNG files, {args.num_public} public images; synthesis: batch "
          f"{args.batch_size}, {args.steps} steps")
    report("overlap_check_first", timings["first"], timings["synthesis"], Goal(), unit="released image")
    report("overlap_check_kept", timings["kept"], timings["synthesis"], GOAL, unit="released image")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
