"""Synthesis step (stage 3) per image versus a supervised training step per image.

One synthesis step is a forward pass of the frozen teacher with its stat layers in synthesis
mode, the matching/CE/TV/L2 losses, a backward pass to the input images and an Adam update of
the images; the reference is one forward/backward/SGD step of the same architecture on the
same batch. Defaults are the demo's: small CNN, batch 200, gray private domain (MNIST).

    python benchmarks/bench_synthesis.py
    python benchmarks/bench_synthesis.py --model resnet18 --device cuda --batch_size 80 --color
    python benchmarks/bench_synthesis.py --profile     # where the time of each side goes
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

# harness first: it puts the repository on sys.path
from harness import (Goal, benchmark_parser, make_model, random_images, random_labels, report, set_up, time_sides,
                     training_step)
from common.cli import main_guard, positive_int
from common.precision import use_bf16
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, set_mode

GOAL = Goal("<=", 1.3)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def frozen_teacher(args, device: torch.device) -> torch.nn.Module:
    """A teacher as synthesis loads it: stat layers in synthesis mode, eval, no weight gradients."""
    teacher = make_model(args, device)
    layers = attach_stat_layers(teacher)
    load_dp_statistics(teacher, {name: {"mean": torch.zeros(layer.num_channels),
                                        "var": torch.ones(layer.num_channels)}
                                 for name, layer in layers.items()})
    set_mode(teacher, "synthesis")
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def profile_side(name: str, run) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"# profile of {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def add_size_flags(parser) -> None:
    """The flags that size a synthesis batch (shared with bench_allocator.py)."""
    parser.add_argument("--batch_size", type=positive_int, default=200, help="images per synthesis batch")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="optimization steps per timed call (the final logits pass is shared by them)")
    parser.add_argument("--color", action="store_true", help="colour private domain (otherwise gray, as MNIST)")


def make_sides(args, device: torch.device) -> dict[str, Callable[[], int]]:
    """``synthesis`` (``synthesis_bf16`` too where bf16 is the default) and its ``training`` reference.

    Each side runs ``args.steps`` steps on one batch and returns the image-steps it did.
    """
    generator = torch.Generator().manual_seed(args.seed)
    channels = 3 if args.color else 1
    start = random_images(args.batch_size, args, generator, channels).expand(-1, 3, -1, -1).to(device)
    targets = cyclic_targets(0, args.batch_size, args.num_classes).to(device)
    low = torch.full((3,), (0 - MNIST_MEAN) / MNIST_STD, device=device)
    high = torch.full((3,), (1 - MNIST_MEAN) / MNIST_STD, device=device)
    teacher = frozen_teacher(args, device)
    jitter_generator = torch.Generator().manual_seed(args.seed)

    model = make_model(args, device, seed_offset=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_images = start.contiguous()
    labels = random_labels(args.batch_size, args, generator).to(device)

    def synthesis(bf16: bool = False) -> int:
        optimize_batch(teacher, start, targets, args.steps, AlignmentConfig(), low, high, jitter_generator,
                       grayscale=not args.color, bf16=bf16)
        return args.steps * args.batch_size

    def training() -> int:
        for _ in range(args.steps):
            training_step(model, optimizer, train_images, labels)
        return args.steps * args.batch_size

    sides = {"synthesis": synthesis, "training": training}
    if use_bf16("auto", device):  # the default precision there
        sides["synthesis_bf16"] = lambda: synthesis(bf16=True)
    return sides


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_size_flags(parser)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of each side")
    args = parser.parse_args(argv)
    device = set_up(args)

    sides = make_sides(args, device)
    timings = time_sides(sides, args.repeats, args.warmup, device)
    domain = "colour" if args.color else "gray"
    print(f"# batch {args.batch_size}, {args.steps} steps per call, {domain} domain")
    report("synthesis_step", timings["synthesis"], timings["training"], GOAL, unit="image-step")
    if "synthesis_bf16" in timings:
        report("synthesis_step_bf16_vs_fp32", timings["synthesis_bf16"], timings["synthesis"], Goal(),
               unit="image-step")
    if args.profile:
        profile_side("synthesis", sides["synthesis"])
        profile_side("training", sides["training"])


if __name__ == "__main__":
    sys.exit(main_guard(main)())
