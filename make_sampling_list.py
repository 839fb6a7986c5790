#!/usr/bin/env python
"""Pre-generate the public-subset index lists that synthesis draws its initial images from.

Examples:
  python make_sampling_list.py --public photos --count 4000 --seed 0 1 2
  python make_sampling_list.py --public tinyimagenet --count 60000 --seed 0 --data_root /data
Existing lists are reused, never redrawn; each is Random_Sampling_List/<public>_<count>_<seed>.npy in the
repository, whatever the working folder (a folder: set is named by its folder's name).
"""
from __future__ import annotations

import registry
from common.cli import ArgumentParser, main_guard, nonnegative_int, positive_int


def build_parser() -> ArgumentParser:
    parser = ArgumentParser.for_script(__doc__)
    parser.add_argument("--public", required=True, help="public set: a registry name (e.g. photos) or folder:PATH")
    parser.add_argument("--count", type=positive_int, nargs="+", required=True,
                        help="number of public images per list (one list per count and seed)")
    parser.add_argument("--seed", type=nonnegative_int, nargs="+", default=[0], help="seeds of the lists")
    parser.add_argument("--available", type=positive_int,
                        help="size of the public set (default: read it from the data)")
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--output", "--sampling_dir", dest="output",
                        help="folder the lists are written to (default: Random_Sampling_List/ of the repository)")
    return parser


def run(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    registry.source_spec(args.public)  # a known name, even with --available
    available = args.available or registry.train_size(args.public, args.data_root)
    for count in args.count:
        for seed in args.seed:
            indices = registry.sampling_list(args.public, count, seed, available, args.output)
            path = registry.sampling_list_path(args.public, count, seed, args.output)
            print(f"{path}: {len(indices)} of {available} images")


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
