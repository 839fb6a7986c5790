"""What one paper row costs: each stage's throughput at the paper's settings, and CUDA correctness checks.

Synthetic tensors of MNIST's shape (3 x 32 x 32, 10 classes), so no dataset is needed. Measures
images/s of DP-SGD (batch 128, the default ``fused`` engine), of the DP statistics pass (batch 64),
of synthesis (image-steps/s at batch 80 and at the largest of 256 / 1,024 / 4,096 that fits, fp32
and bf16), of the student KD epoch (batch 256) and of one-file-per-image loading; then prints the
GPU-minutes of one paper row (teacher + statistics + 2 syntheses of 60,000 images + 6 students of
200 epochs) with this code's settings and with the original code's. Correctness: ``fused`` against
Opacus's ``hooks`` (per-example clipped sums in float32), and bf16 synthesis lowering the statistics
loss as fp32 does.

    python benchmarks/bench_paper_row.py --model resnet18 --device cuda
    python benchmarks/bench_paper_row.py --model small_cnn --scale 0.05      # a quick CPU smoke run
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

# harness first: it puts the repository on sys.path
from harness import benchmark_parser, make_model, random_images, random_labels, set_up, synchronize
from bench_synthesis import MNIST_MEAN, MNIST_STD, frozen_teacher
from common.cli import main_guard, positive_float
from privacy.clipping import PerExampleClipper
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.dp_stats import compute_dp_statistics
from training.distill import DistillationConfig, StudentTrainer, kd_loss
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

# The MNIST epsilon-10 row of Table 1 and the paper's synthesis and student settings.
TRAIN_IMAGES, DP_EPOCHS, DP_BATCH, STATS_EPOCHS, STATS_BATCH = 60_000, 14, 128, 2, 64
RELEASE_IMAGES, K_EXP, SYNTHESIS_BATCH, STUDENT_EPOCHS, STUDENTS, STUDENT_BATCH = 60_000, 10, 80, 200, 6, 256
LARGE_SYNTHESIS_BATCHES = (4096, 1024, 256)


def seconds_of(work: Callable[[], int], device: torch.device, warmup: bool = True) -> tuple[float, int]:
    """(seconds, items) of one call of ``work`` after an untimed warm-up call."""
    if warmup:
        work()
    synchronize(device)
    started = time.perf_counter()
    items = work()
    synchronize(device)
    return time.perf_counter() - started, items


def rate(name: str, seconds: float, items: int, unit: str) -> float:
    per_second = items / seconds
    print(f"throughput {name}: {per_second:,.0f} {unit}/s ({items} in {seconds:.2f} s)", flush=True)
    return per_second


def dp_sgd_rate(args, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(args.seed)
    count = max(DP_BATCH, int(40 * DP_BATCH * args.scale))
    data = TensorDataset(random_images(count, args, generator), random_labels(count, args, generator))
    config = DPSGDConfig(epochs=2, train_batch_size=DP_BATCH, lr=0.01, max_norm=1.0, noise_multiplier=1.0,
                         max_physical_batch_size=DP_BATCH)
    trainer = DPSGDTrainer(make_model(args, device), data, config, device, seed=args.seed)
    return rate("dp_sgd (fused, batch 128)", *seconds_of(lambda: (trainer.train_epoch(progress=False), count)[1],
                                                          device), "images")


def statistics_rate(args, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(args.seed)
    count = max(STATS_BATCH, int(40 * STATS_BATCH * args.scale))
    data = TensorDataset(random_images(count, args, generator), random_labels(count, args, generator))
    teacher = make_model(args, device).eval()

    def work() -> int:
        compute_dp_statistics(teacher, data, epochs=1, batch_size=STATS_BATCH, max_norm=1.0, noise_multiplier=1.0,
                              seed=args.seed, device=device, progress=False)
        return count

    return rate("dp_statistics (batch 64)", *seconds_of(work, device), "images")


def synthesis_rates(args, device: torch.device) -> dict[tuple[int, bool], float]:
    """image-steps/s per (batch, bf16): batch 80 and the largest batch that fits, fp32 and bf16."""
    teacher = frozen_teacher(args, device)
    low = torch.full((3,), (0 - MNIST_MEAN) / MNIST_STD, device=device)
    high = torch.full((3,), (1 - MNIST_MEAN) / MNIST_STD, device=device)
    steps = max(2, int(K_EXP * min(1.0, 4 * args.scale)))
    rates = {}
    batches = [SYNTHESIS_BATCH]
    for batch in LARGE_SYNTHESIS_BATCHES if device.type == "cuda" else (256,):
        try:
            probe = random_images(batch, args, torch.Generator()).to(device)
            optimize_batch(teacher, probe, cyclic_targets(0, batch, args.num_classes).to(device), 1,
                           AlignmentConfig(), low, high, torch.Generator(), grayscale=True)
            batches.append(batch)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"# synthesis batch {batch} does not fit")
    for batch in batches:
        start = random_images(batch, args, torch.Generator().manual_seed(args.seed)).to(device)
        targets = cyclic_targets(0, batch, args.num_classes).to(device)
        for bf16 in (False, True) if device.type == "cuda" else (False,):
            def work() -> int:
                optimize_batch(teacher, start, targets, steps, AlignmentConfig(), low, high,
                               torch.Generator().manual_seed(0), grayscale=True, bf16=bf16)
                return steps * batch

            label = f"synthesis (batch {batch}, {'bf16' if bf16 else 'fp32'})"
            rates[batch, bf16] = rate(label, *seconds_of(work, device), "image-steps")
    return rates


def student_rates(args, device: torch.device) -> tuple[float, float]:
    """images/s of our KD epoch (soft labels read from the release) and of the original's (teacher forward)."""
    generator = torch.Generator().manual_seed(args.seed)
    count = max(STUDENT_BATCH, int(40 * STUDENT_BATCH * args.scale))
    images = random_images(count, args, generator)
    soft_labels = torch.randn(count, args.num_classes, generator=generator)
    targets = random_labels(count, args, generator)
    config = DistillationConfig(epochs=2, batch_size=STUDENT_BATCH, lr=0.1, momentum=0.9, weight_decay=1e-4,
                           temperature=100.0, alpha=1.0, beta=0.0, augment=False)
    ours = StudentTrainer(make_model(args, device), images, soft_labels, targets, config, device, args.seed,
                          bf16=device.type == "cuda")
    ours_rate = rate("student KD (ours, batch 256)", *seconds_of(
        lambda: (ours.train_epoch(progress=False), count)[1], device), "images")

    student, teacher = make_model(args, device, 1), make_model(args, device, 2).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    on_device = images.to(device)

    def original() -> int:  # fp32, the teacher recomputing the logits at every step
        for start in range(0, count, STUDENT_BATCH):
            batch = on_device[start:start + STUDENT_BATCH]
            with torch.no_grad():
                teacher_logits = teacher(batch)
            loss = kd_loss(student(batch), teacher_logits, None, 100.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return count

    return ours_rate, rate("student KD (original style, batch 256)", *seconds_of(original, device), "images")


def file_load_seconds(args) -> float:
    """Seconds per image of the original release format: one ``torch.save`` file per image, read back."""
    count = max(100, int(2000 * args.scale))
    with tempfile.TemporaryDirectory() as folder:
        images = random_images(count, args, torch.Generator())
        for index, image in enumerate(images):
            torch.save(image.clone(), Path(folder) / f"{index}.pt")
        started = time.perf_counter()
        for index in range(count):
            torch.load(Path(folder) / f"{index}.pt", weights_only=True)
        seconds = (time.perf_counter() - started) / count
    print(f"throughput one-file-per-image load: {1 / seconds:,.0f} images/s")
    return seconds


def check_fused_against_hooks(args, device: torch.device, batch: int = 16) -> None:
    """Per-example clipped sums of our engine and of Opacus's hooks, float32 on the device."""
    generator = torch.Generator().manual_seed(args.seed)
    images = random_images(batch, args, generator).to(device)
    labels = random_labels(batch, args, generator).to(device)
    sums = {}
    for mode in ("fused", "hooks"):
        model = make_model(args, device)
        if mode == "fused":
            clipper = PerExampleClipper(model, max_norm=1.0)
            with clipper.recording():
                logits = model(images)
            clipper.clipped_backward(F.cross_entropy(logits, labels, reduction="sum"))
        else:
            wrapped = prepare_module(model, "hooks", batch_first=True, loss_reduction="sum")
            optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                    max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="sum")
            F.cross_entropy(wrapped(images), labels, reduction="sum").backward()
            optimizer.clip_and_accumulate()
            for param in model.parameters():
                param.grad = param.summed_grad
        sums[mode] = torch.cat([param.grad.flatten() for param in model.parameters()])
    difference = float((sums["fused"] - sums["hooks"]).abs().max())
    scale = float(sums["hooks"].abs().max())
    verdict = "OK" if difference <= 1e-4 * max(scale, 1.0) else "MISMATCH"
    print(f"check fused_vs_hooks: max |difference| {difference:.3g} (largest entry {scale:.3g}) {verdict}")


def check_bf16_synthesis(args, device: torch.device, batch: int = 80, steps: int = 20) -> None:
    """The statistics loss after ``steps`` synthesis steps, fp32 and bf16 (bf16 on CUDA only), from one start."""
    teacher = frozen_teacher(args, device)
    low = torch.full((3,), (0 - MNIST_MEAN) / MNIST_STD, device=device)
    high = torch.full((3,), (1 - MNIST_MEAN) / MNIST_STD, device=device)
    start = random_images(batch, args, torch.Generator().manual_seed(args.seed)).to(device)
    targets = cyclic_targets(0, batch, args.num_classes).to(device)
    first = optimize_batch(teacher, start, targets, 1, AlignmentConfig(), low, high,
                           torch.Generator().manual_seed(0), grayscale=True).losses
    for bf16 in (False, True) if device.type == "cuda" else (False,):
        losses = optimize_batch(teacher, start, targets, steps, AlignmentConfig(), low, high,
                                torch.Generator().manual_seed(0), grayscale=True, bf16=bf16).losses
        print(f"check synthesis_{'bf16' if bf16 else 'fp32'}: losses after 1 step {first}, after {steps} {losses}")


def paper_row_minutes(dp: float, stats: float, synthesis: float, student: float, load_seconds: float) -> float:
    """GPU-minutes of one row: teacher, statistics, k = 0 and k = K_EXP syntheses, 6 students."""
    seconds = (DP_EPOCHS * TRAIN_IMAGES / dp + STATS_EPOCHS * TRAIN_IMAGES / stats
               + RELEASE_IMAGES / stats + K_EXP * RELEASE_IMAGES / synthesis
               + STUDENTS * STUDENT_EPOCHS * RELEASE_IMAGES * (1 / student + load_seconds))
    return seconds / 60


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=1)
    parser.add_argument("--scale", type=positive_float, default=1.0,
                        help="size of each measurement (1: about 40 batches per stage)")
    args = parser.parse_args(argv)
    device = set_up(args)
    if device.type == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(device)}; {torch.cuda.device_count()} visible "
              f"({'a two-process NCCL run needs two' if torch.cuda.device_count() < 2 else 'NCCL possible'})")
    check_fused_against_hooks(args, device)
    check_bf16_synthesis(args, device)
    dp = dp_sgd_rate(args, device)
    stats = statistics_rate(args, device)
    synthesis = synthesis_rates(args, device)
    ours_student, original_student = student_rates(args, device)
    load_seconds = file_load_seconds(args)
    best_synthesis = max(synthesis.values())
    ours = paper_row_minutes(dp, stats, best_synthesis, ours_student, 0.0)
    original = paper_row_minutes(dp, stats, synthesis[SYNTHESIS_BATCH, False], original_student, load_seconds)
    print(f"paper row (MNIST eps 10: teacher + statistics + 2 x {RELEASE_IMAGES:,}-image syntheses + "
          f"{STUDENTS} students x {STUDENT_EPOCHS} epochs): {ours:.1f} device-minutes with this code's settings "
          f"vs {original:.1f} with the original's (synthesis batch {SYNTHESIS_BATCH} fp32, teacher forward at every "
          "KD step, one file per image read each epoch without overlap)")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
