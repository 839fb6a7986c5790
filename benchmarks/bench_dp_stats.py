"""DP statistics pass (stage 2) per image versus a plain eval forward pass per image; and over several epochs,
each example's vector computed once versus in every step.

1. ``compute_dp_statistics`` itself for one epoch (Poisson sampling, capture of every normalization layer's
   per-sample moments, clipping in float64, noise): about N images. The reference is the frozen model's
   no-grad eval forward over the same N images in the same batches.
2. ``--epochs`` epochs (Table 1's eta_bn is 2 to 5): ``compute_dp_statistics``, which then runs the teacher once
   per example and samples the vectors (``synthesizer.dp_stats.precomputed_vectors``), against the same
   mechanism running the teacher on every sampled batch. Both sides release the same moments (checked).

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
from privacy.moments import private_mean
from synthesizer.dp_stats import compute_dp_statistics, per_sample_statistics, statistic_dimension

GOAL = Goal("<=", 1.3)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=256, help="expected Poisson batch B")
    parser.add_argument("--num_images", type=positive_int, default=2048, help="training set size N")
    parser.add_argument("--epochs", type=positive_int, default=3, help="epochs of the second comparison (eta_bn)")
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

    mechanism = dict(epochs=args.epochs, batch_size=args.batch_size, max_norm=1.0, noise_multiplier=1.0,
                     seed=args.seed, device=device, progress=False, max_physical_batch_size=args.batch_size)
    released = {}

    def computed_once() -> int:
        released["once"] = compute_dp_statistics(model, dataset, **mechanism).moments
        return args.num_images * args.epochs

    def every_step() -> int:
        released["every_step"] = private_mean(lambda batch: per_sample_statistics(model, batch),
                                              statistic_dimension(model), dataset, **mechanism).scaled.float()
        return args.num_images * args.epochs

    timings = time_sides({"computed_once": computed_once, "every_step": every_step}, args.repeats, args.warmup,
                         device)
    once, every = released["once"], released["every_step"]
    if not torch.allclose(once, every, rtol=1e-5, atol=1e-6):
        raise SystemExit("the two paths released different moments")
    print(f"# {args.epochs} epochs: each example's vector computed once vs in every step; the same moments "
          f"({'bit for bit' if torch.equal(once, every) else 'to float rounding: a row depends on its batch'})")
    report("dp_stats_computed_once_vs_every_step", timings["computed_once"], timings["every_step"], Goal(),
           unit="image-epoch")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
