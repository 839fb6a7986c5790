"""DP statistics pass (stage 2) per image versus a plain eval forward pass per image.

The measured side is ``compute_dp_statistics`` itself for one epoch (Poisson sampling, capture of
every normalization layer's per-sample moments, clipping in float64, noise): about N images. The
reference is the frozen model's no-grad eval forward over the same N images in the same batches.

    python benchmarks/bench_dp_stats.py
    python benchmarks/bench_dp_stats.py --model resnet18 --device cuda --batch_size 64
"""
from __future__ import annotations

import sys

import torch
from torch.utils.data import TensorDataset

# harness first: it puts the repository on sys.path
from harness import Goal, benchmark_parser, make_model, random_images, random_labels, report, set_up, time_sides
from common.cli import main_guard, positive_int
from synthesizer.dp_stats import compute_dp_statistics

GOAL = Goal("<=", 1.3)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=256, help="expected Poisson batch B")
    parser.add_argument("--num_images", type=positive_int, default=2048, help="training set size N")
    args = parser.parse_args(argv)
    device = set_up(args)

    generator = torch.Generator().manual_seed(args.seed)
    images = random_images(args.num_images, args, generator)
    dataset = TensorDataset(images, random_labels(args.num_images, args, generator))
    model = make_model(args, device).eval()
    for param in model.parameters():
        param.requires_grad_(False)

    def dp_statistics() -> int:
        compute_dp_statistics(model, dataset, epochs=1, batch_size=args.batch_size, max_norm=1.0,
                              noise_multiplier=1.0, seed=args.seed, device=device, progress=False,
                              max_physical_batch_size=args.batch_size)
        return args.num_images  # the expected number of images one epoch samples

    def forward() -> int:
        with torch.no_grad():
            for batch in images.split(args.batch_size):
                model(batch.to(device, non_blocking=True))
        return args.num_images

    timings = time_sides({"dp_statistics": dp_statistics, "forward": forward}, args.repeats, args.warmup, device)
    print(f"# {args.num_images} images, expected batch {args.batch_size}, one epoch")
    report("dp_stats_pass", timings["dp_statistics"], timings["forward"], GOAL, unit="image")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
