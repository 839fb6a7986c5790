"""Student KD epoch (stage 4) versus a supervised epoch, and versus the original teacher-forward KD.

Three sides train the same student architecture over the same release-like data (images, the
teacher's logits, targets) in the same shuffled batches:

- ours: ``StudentTrainer.train_epoch`` (soft labels read from the release, no teacher);
- supervised: the same loop with cross-entropy on the targets (the reference);
- original style: the teacher recomputes the logits with a forward pass at every step.

    python benchmarks/bench_student.py
    python benchmarks/bench_student.py --model resnet18 --device cuda --num_images 10240
"""
from __future__ import annotations

import sys

import torch

# harness first: it puts the repository on sys.path
from harness import (Goal, benchmark_parser, make_model, random_images, random_labels, report, set_up, time_sides,
                     training_step)
from common.cli import main_guard, positive_float, positive_int
from common.precision import use_bf16
from training.distill import DistillationConfig, StudentTrainer, kd_loss

GOAL = Goal("<=", 1.1)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=128, help="student batch (the demo's)")
    parser.add_argument("--num_images", type=positive_int, default=2048, help="images in the release")
    parser.add_argument("--temperature", type=positive_float, default=4.0, help="KD temperature T")
    args = parser.parse_args(argv)
    device = set_up(args)

    generator = torch.Generator().manual_seed(args.seed)
    images = random_images(args.num_images, args, generator)
    soft_labels = torch.randn(args.num_images, args.num_classes, generator=generator)
    targets = random_labels(args.num_images, args, generator)
    config = DistillationConfig(epochs=1_000, batch_size=args.batch_size, lr=0.05, temperature=args.temperature)

    ours = StudentTrainer(make_model(args, device), images, soft_labels, targets, config, device, args.seed)
    images, targets = ours.images, ours.targets  # wherever the trainer keeps them (on the GPU if they fit)
    teacher = make_model(args, device, seed_offset=1).eval()
    loops = {name: (make_model(args, device), torch.Generator().manual_seed(args.seed))
             for name in ("supervised", "original")}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay) for name, (model, _) in loops.items()}

    def supervised() -> int:
        model, order_generator = loops["supervised"]
        model.train()
        for indices in torch.randperm(args.num_images, generator=order_generator).split(args.batch_size):
            training_step(model, optimizers["supervised"], images[indices].to(device), targets[indices].to(device))
        return args.num_images

    def original() -> int:
        model, order_generator = loops["original"]
        model.train()
        optimizer = optimizers["original"]
        for indices in torch.randperm(args.num_images, generator=order_generator).split(args.batch_size):
            x, y = images[indices].to(device), targets[indices].to(device)
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = kd_loss(model(x), teacher_logits, y, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        return args.num_images

    def distillation() -> int:
        ours.train_epoch(progress=False)
        return args.num_images

    sides = {"ours": distillation, "supervised": supervised, "original": original}
    if use_bf16("auto", device):  # the default precision there: bf16 autocast + channels-last
        ours_bf16 = StudentTrainer(make_model(args, device), images, soft_labels, targets, config, device,
                                   args.seed, bf16=True)

        def distillation_bf16() -> int:
            ours_bf16.train_epoch(progress=False)
            return args.num_images

        sides["ours_bf16"] = distillation_bf16
    timings = time_sides(sides, args.repeats, args.warmup, device)
    print(f"# {args.num_images} images, batch {args.batch_size}, one epoch per side")
    report("student_kd_epoch", timings["ours"], timings["supervised"], GOAL, unit="image")
    report("student_kd_original_style", timings["original"], timings["ours"], Goal(), unit="image")
    if "ours_bf16" in timings:
        report("student_kd_epoch_bf16_vs_fp32", timings["ours_bf16"], timings["ours"], Goal(), unit="image")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
