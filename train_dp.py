#!/usr/bin/env python
"""Stage 1: train the teacher on the private data with DP-SGD and write a `.dppt` with its ledger.

Examples:
  python train_dp.py --preset mnist_eps10
  python train_dp.py --dataset mnist5k --model small_cnn --epochs 10 --train_batch_size 256 \\
      --lr 2 --max_norm 1 --target_epsilon 10
Rerun the same command after an interruption: training resumes at the last finished epoch.
Several GPUs: torchrun --standalone --nproc_per_node 4 train_dp.py ... (same ledger, same epsilon).
"""
from __future__ import annotations

import argparse

import privacy
from engine.cli import ArgumentParser, main_guard, nonnegative_float, positive_float, positive_int, probability
from engine.dp_sgd import GRAD_SAMPLE_MODES, DPSGDConfig
from engine.teacher import check_finite, train_teacher
from errors import DPImgSynError

PRESET_KEYS = ("dataset", "model", "epochs", "train_batch_size", "lr", "max_norm", "noise_multiplier",
               "stats_epochs", "stats_batch_size")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a Table 1 row from configs/table1.yaml (e.g. mnist_eps10); "
                        "explicit flags override its values")
    parser.add_argument("--dataset", help="private dataset name from the registry (e.g. mnist, mnist5k, folder:PATH)")
    parser.add_argument("--model", default="resnet18", help="architecture name from the registry")
    parser.add_argument("--epochs", type=positive_int, default=14, help="eta_train: DP-SGD epochs")
    parser.add_argument("--train_batch_size", type=positive_int, default=128,
                        help="Omega_train: expected (logical) Poisson batch size")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="gamma_train: SGD learning rate")
    parser.add_argument("--max_norm", type=positive_float, default=1.0, help="C: per-sample gradient clipping norm")
    parser.add_argument("--noise_multiplier", type=positive_float, default=0.5,
                        help="sigma: noise std / C (ignored with --target_epsilon)")
    parser.add_argument("--target_epsilon", type=positive_float,
                        help="calibrate sigma so that DP-SGD plus the planned DP statistics stage total this epsilon")
    parser.add_argument("--stats_epochs", type=positive_int, default=2,
                        help="eta_bn of the planned DP statistics stage (calibration, and stored as "
                        "save_dp_db_stats.py's default)")
    parser.add_argument("--stats_batch_size", type=positive_int, default=64,
                        help="Omega_bn of the planned DP statistics stage (calibration, and stored as "
                        "save_dp_db_stats.py's default)")
    parser.add_argument("--delta", type=probability, default=1e-5, help="delta of the (epsilon, delta) guarantee")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="privacy accountant")
    parser.add_argument("--val_split", type=nonnegative_float, default=0.0,
                        help="expected fraction of the private training records held out for validation; a "
                        "record's side is fixed by a hash of its content, both private stages train on the rest, "
                        "and validation accuracy goes to the local log only (non-private)")
    parser.add_argument("--suffix", default="", help="free text in the default output name")
    parser.add_argument("--seed", type=int, help="seed of sampling and noise (default: fresh OS entropy). "
                        "Anyone who knows it can regenerate the noise: keep a fixed seed secret; it is never stored in artifacts")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--data_root", help="dataset folder (default: $DPIMGSYN_DATA, else ./data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset if missing")
    parser.add_argument("--output", help="teacher .dppt path (default checkpoints/<dataset>_<model>_nm_<sigma>_<suffix>_.dppt)")
    parser.add_argument("--max_physical_batch_size", type=positive_int, default=256,
                        help="largest chunk processed at once; bigger Poisson batches are accumulated")
    parser.add_argument("--grad_sample_mode", choices=GRAD_SAMPLE_MODES, default=DPSGDConfig.grad_sample_mode,
                        help="per-example clipping: 'fused' computes norms and the clipped sum in one backward "
                        "pass (default, fastest); 'hooks', 'functorch', 'ew' store Opacus's per-sample gradients "
                        "(same guarantee, for layers 'fused' does not support)")
    parser.add_argument("--secure_mode", action="store_true",
                        help="draw the Poisson sampling and the noise from the operating system's randomness "
                        "(not seedable: --seed is refused; nothing can regenerate the noise)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        presets = privacy.load_presets()
        if args.preset not in presets:
            raise DPImgSynError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(presets))}")
        parser.set_defaults(**{key: presets[args.preset][key] for key in PRESET_KEYS if key in presets[args.preset]})
        args = parser.parse_args(argv)
    if not args.dataset:
        raise DPImgSynError("--dataset is required (or use --preset NAME)")
    check_finite(args, ("epochs", "train_batch_size", "lr", "max_norm", "noise_multiplier"))
    return args


def run(argv: list[str] | None = None):
    return train_teacher(parse_args(argv))


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
