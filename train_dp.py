#!/usr/bin/env python
"""Stage 1: train the teacher on the private data with DP-SGD and write a `.dppt` with its ledger.

Examples:
  python train_dp.py --preset mnist_eps10
  python train_dp.py --dataset mnist5k --model small_cnn --epochs 10 --train_batch_size 256 \\
      --lr 2 --max_norm 1 --target_epsilon 10
  python train_dp.py --dataset folder:my_images --model scatter_cnn --recipe auto --target_epsilon 1
Rerun the same command after an interruption: training resumes at the last finished epoch.
Several GPUs: torchrun --standalone --nproc_per_node 4 train_dp.py ... (same ledger, same epsilon).
"""
from __future__ import annotations

from common.cli import StageCLI, config_from_args
from common.errors import DPImgSynError
from stages.paper import get_preset
from stages.recipe import TEACHER_KEYS
from stages.teacher import TeacherConfig, train_teacher

PRESET_KEYS = ("dataset", "model", "epochs", "train_batch_size", "lr", "max_norm", "noise_multiplier",
               "stats_epochs", "stats_batch_size")


class TeacherCLI(StageCLI):
    """The stage's flags plus ``--preset``: a Table 1 row supplies the defaults that flags then override."""

    def build_parser(self):
        parser = super().build_parser()
        parser.add_argument("--preset", help="a Table 1 row from configs/table1.yaml (e.g. mnist_eps10); "
                            "explicit flags override its values")
        return parser

    def parse_config(self, argv: list[str] | None = None) -> TeacherConfig:
        parser = self.build_parser()
        args = parser.parse_args(argv)
        if args.recipe:  # a flag given beside the recipe is refused, even when it repeats a default
            probe = self.build_parser()
            probe.set_defaults(**dict.fromkeys(TEACHER_KEYS))
            given = [f"--{key}" for key in TEACHER_KEYS if getattr(probe.parse_args(argv), key) is not None]
            if given or args.preset:
                raise DPImgSynError(f"--recipe {args.recipe} chooses {', '.join(given or ['the preset numbers'])}: "
                                    "drop them, or drop --recipe and give every number yourself")
        if args.preset:
            preset = get_preset(args.preset)
            parser.set_defaults(**{key: preset[key] for key in PRESET_KEYS})
            args = parser.parse_args(argv)
        if not args.dataset:
            raise DPImgSynError("--dataset is required (or use --preset NAME)")
        return config_from_args(TeacherConfig, args)


cli = TeacherCLI(__doc__, TeacherConfig, train_teacher)
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
