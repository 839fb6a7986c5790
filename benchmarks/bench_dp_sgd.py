"""DP-SGD logical step (stage 1) in each per-example clipping mode versus a non-private step.

The modes are our one-backward engine (``fused``, the default) and Opacus's per-sample modes.
Every side trains on the same Poisson batches (rate B/N, drawn from identically seeded
generators) of the same in-memory data from the same initial weights. The modes the trainer
offers (``training.dp_sgd.GRAD_SAMPLE_MODES``) run through ``DPSGDTrainer`` itself; ghost
clipping (Opacus's fast gradient clipping, two backward passes and no per-sample gradients)
is built from Opacus's parts, on one physical batch. Each mode is first checked for
correctness: with zero noise, one full-batch step must move the weights as clipping every
example's own gradient (one backward per example) and averaging does. The check runs in float64,
so that rounding (a ReLU flipped at zero, TF32 convolutions on a GPU) cannot fail a correct mode;
the timings run in float32. The figure the goal applies to is the default mode's. The default mode
with shape-stable padded batches (``pad_batches``) is checked and timed too: ``dp_sgd_padded`` is
its step over the unpadded one (on a CPU the padding rows cost their arithmetic; on a GPU static
shapes are what CUDA graphs and ``torch.compile`` need).

    python benchmarks/bench_dp_sgd.py
    python benchmarks/bench_dp_sgd.py --model resnet18 --device cuda --batch_size 128
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

# harness first: it puts the repository on sys.path
from harness import (Goal, benchmark_parser, make_model, random_images, random_labels, report, set_up, time_sides,
                     training_step)
from common.cli import main_guard, positive_int
from privacy.sampling import poisson_batch
from training.dp_sgd import GRAD_SAMPLE_MODES, DPSGDConfig, DPSGDTrainer

GOALS = {"cpu": Goal("<=", 1.5), "cuda": Goal("<=", 1.3)}
GHOST = "ghost"
PADDED = "padded"  # the default mode with pad_batches
DEFAULT_MODE = DPSGDConfig.__dataclass_fields__["grad_sample_mode"].default
LR, MAX_NORM, NOISE = 0.1, 1.0, 1.0
TOLERANCE = 1e-9  # float64


def dp_config(args, **overrides) -> DPSGDConfig:
    settings = dict(epochs=1, train_batch_size=args.batch_size, lr=LR, max_norm=MAX_NORM, noise_multiplier=NOISE,
                    max_physical_batch_size=args.physical_batch_size)
    settings.update(overrides)
    return DPSGDConfig(**settings)


class GhostClipping:
    """Opacus's ghost clipping on our Poisson batches: per-sample gradient norms without the gradients."""

    def __init__(self, model: nn.Module, config: DPSGDConfig, seed: int) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                           max_grad_norm=config.max_norm, use_ghost_clipping=True)
        base = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
        noise_generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
        self.optimizer = DPOptimizerFastGradientClipping(
            base, noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_norm,
            expected_batch_size=config.train_batch_size, loss_reduction="mean", generator=noise_generator)
        self.criterion = DPLossFastGradientClipping(self.module, self.optimizer, nn.CrossEntropyLoss(), "mean")

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.module.train()
        loss = self.criterion(self.module(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def epoch_of(step: Callable[[torch.Tensor, torch.Tensor], object], images: torch.Tensor, labels: torch.Tensor,
             steps: int, rate: float, generator: torch.Generator, device: torch.device) -> int:
    """One epoch of Poisson batches through ``step`` (the loop ``DPSGDTrainer`` runs); returns steps."""
    for _ in range(steps):
        indices = poisson_batch(len(labels), rate, generator)
        if len(indices):
            step(images[indices].to(device), labels[indices].to(device))
    return steps


def trainer_epoch(trainer: DPSGDTrainer) -> Callable[[], int]:
    def run() -> int:
        trainer.train_epoch(progress=False)
        return trainer.steps_per_epoch

    return run


def weight_change(args, device: torch.device, images: torch.Tensor, labels: torch.Tensor, mode: str) -> list:
    """Weights after one noise-free full-batch step (lr 1, no momentum) of ``mode`` minus the initial ones."""
    model = make_model(args, device).double()
    initial = [param.detach().clone() for param in model.parameters()]
    config = dp_config(args, train_batch_size=len(labels), noise_multiplier=0.0, momentum=0.0, weight_decay=0.0,
                       lr=1.0, max_physical_batch_size=len(labels),
                       grad_sample_mode=mode if mode not in (GHOST, PADDED) else DEFAULT_MODE)
    if mode == PADDED:  # chunks of B - 1 examples: the second chunk is one example padded to B - 1
        config = replace(config, max_physical_batch_size=max(1, len(labels) - 1), pad_batches=True)
    if mode == GHOST:
        GhostClipping(model, config, args.seed).step(images.to(device), labels.to(device))
    else:
        trainer = DPSGDTrainer(model, TensorDataset(images, labels), config, device, seed=args.seed)
        trainer.train_epoch(progress=False)
    return [param.detach() - start for param, start in zip(model.parameters(), initial)]


def naive_change(args, device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> list:
    """The same step by definition: one backward per example, clip each gradient to C, average."""
    model = make_model(args, device).double()
    params = list(model.parameters())
    total = [torch.zeros_like(param) for param in params]
    for image, label in zip(images.to(device), labels.to(device)):
        grads = torch.autograd.grad(F.cross_entropy(model(image[None]), label[None]), params)
        norm = torch.sqrt(sum(grad.square().sum() for grad in grads))
        factor = (MAX_NORM / (norm + 1e-6)).clamp(max=1.0)
        for accumulated, grad in zip(total, grads):
            accumulated += factor * grad
    return [-accumulated / len(labels) for accumulated in total]


def max_difference(left: list, right: list) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right))


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=256, help="expected logical batch B")
    parser.add_argument("--physical_batch_size", type=positive_int, default=256,
                        help="largest physical chunk of a logical batch")
    parser.add_argument("--steps", type=positive_int, default=4, help="logical steps per timed epoch (N = steps * B)")
    parser.add_argument("--check_size", type=positive_int, default=32, help="batch of the correctness check")
    parser.add_argument("--modes", nargs="+", choices=[*GRAD_SAMPLE_MODES, GHOST],
                        default=[*GRAD_SAMPLE_MODES, GHOST], help="per-sample modes to time")
    args = parser.parse_args(argv)
    device = set_up(args)
    modes = list(dict.fromkeys([DEFAULT_MODE, PADDED, *args.modes]))

    generator = torch.Generator().manual_seed(args.seed)
    check_images = random_images(args.check_size, args, generator).double()
    check_labels = random_labels(args.check_size, args, generator)
    reference_change = naive_change(args, device, check_images, check_labels)
    usable: list[str] = []
    for mode in modes:
        try:
            difference = max_difference(weight_change(args, device, check_images, check_labels, mode),
                                        reference_change)
        except Exception as exc:  # noqa: BLE001 -- an unsupported mode is a result, not a failure
            print(f"# mode {mode}: unavailable for {args.model} ({type(exc).__name__}: {exc})")
            continue
        correct = difference <= TOLERANCE
        print(f"# mode {mode}: {'correct' if correct else 'WRONG'} (max weight difference to "
              f"per-example clipping {difference:.1e})")
        if correct:
            usable.append(mode)

    num_examples = args.batch_size * args.steps
    images, labels = random_images(num_examples, args, generator), random_labels(num_examples, args, generator)
    rate = args.batch_size / num_examples

    def sampler() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    plain = make_model(args, device)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    plain_sampler = sampler()
    sides: dict[str, Callable[[], int]] = {
        "non-private": lambda: epoch_of(lambda x, y: training_step(plain, plain_optimizer, x, y),
                                        images, labels, args.steps, rate, plain_sampler, device)}
    for mode in usable:
        if mode == GHOST:
            ghost = GhostClipping(make_model(args, device), dp_config(args), args.seed)
            ghost_sampler = sampler()
            sides[mode] = lambda: epoch_of(ghost.step, images, labels, args.steps, rate, ghost_sampler, device)
        else:
            config = dp_config(args, pad_batches=True) if mode == PADDED else dp_config(args, grad_sample_mode=mode)
            trainer = DPSGDTrainer(make_model(args, device), TensorDataset(images, labels), config, device,
                                   seed=args.seed)
            sides[mode] = trainer_epoch(trainer)

    timings = time_sides(sides, args.repeats, args.warmup, device)
    print(f"# expected batch {args.batch_size} (physical <= {args.physical_batch_size}), "
          f"{args.steps} Poisson steps per epoch, N = {num_examples}")
    goal = GOALS.get(device.type, GOALS["cpu"])
    ratios = {}
    for mode in usable:
        if mode != PADDED:
            ratios[mode] = report(f"dp_sgd_mode_{mode}", timings[mode], timings["non-private"], Goal(), unit="step")
    if DEFAULT_MODE in usable:
        report("dp_sgd_step", timings[DEFAULT_MODE], timings["non-private"], goal, unit="step")
        if PADDED in usable:
            report("dp_sgd_padded", timings[PADDED], timings[DEFAULT_MODE], Goal(), unit="step")
    if ratios:
        fastest = min(ratios, key=ratios.get)
        print(f"dp_sgd_modes: fastest correct {fastest}, default {DEFAULT_MODE} "
              f"({ratios.get(DEFAULT_MODE, float('nan')) / ratios[fastest]:.2f}x the fastest)")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
