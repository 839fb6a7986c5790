"""Where a DP-SGD step, a DP statistics step and a synthesis step spend their time beyond the plain step.

Each figure runs its steps with the library's own code, every phase of it timed where it is called
(CUDA events on a GPU, so nothing waits for the device; wall clock on a CPU), next to its reference
run the same way: the DP-SGD logical step (trainer's ``_logical_step`` on its Poisson batches)
against a plain training step on the same batches, a DP statistics step (``compute_dp_statistics``)
against an eval forward pass of the same batches, a synthesis step (``optimize_batch``) against a
training step. Sides run in interleaved rounds (the order rotated each round) and each phase's
figure is its median over the rounds. One table per figure: per phase, milliseconds per step on
each side, the extra and its share of the extra. ``other`` is the rest of the step (Python, hooks,
copies to the device, accumulation). ``--pad_batches`` adds the DP-SGD step with shape-stable
padded batches.

    python benchmarks/profile_steps.py
    python benchmarks/profile_steps.py --model resnet18 --device cuda --batch_size 128 --pad_batches
"""
from __future__ import annotations

import functools
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

# harness first: it puts the repository on sys.path
from harness import benchmark_parser, make_model, random_images, random_labels, set_up, synchronize
from bench_synthesis import frozen_teacher
import privacy.moments
import synthesizer.deepinversion
import synthesizer.dp_stats
import training.dp_sgd
from common.batches import batches_by_index
from common.cli import main_guard, positive_int
from privacy.clipping import RULES
from privacy.sampling import poisson_batch
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.dp_stats import compute_dp_statistics
from synthesizer.terms import TERMS
from training.dp_sgd import GRAD_SAMPLE_MODES, DPSGDConfig, DPSGDTrainer

ORDER = ("sampling", "data", "padding", "jitter", "forward", "loss terms", "backward", "per-example norms",
         "clipping sums", "noise", "optimizer", "other")


class Phases:
    """Time spent per named phase; on CUDA by events (read once at the end), elsewhere by the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            stop.record()
            self.spans[name].append((start, stop))
        else:
            began = time.perf_counter()
            yield
            self.spans[name].append(time.perf_counter() - began)

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)

        return timed

    def iterate(self, name: str, items) -> Iterator:
        """``items`` with the time of producing each one counted as ``name``."""
        iterator = iter(items)
        while True:
            with self(name):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item

    def milliseconds(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {name: sum(start.elapsed_time(stop) for start, stop in spans) for name, spans in self.spans.items()}
        return {name: 1e3 * sum(spans) for name, spans in self.spans.items()}


@contextmanager
def patched(*targets: tuple[object, str, Callable]) -> Iterator[None]:
    """Replace each ``owner.name`` by ``make(original)`` for the duration, then put the original back."""
    with ExitStack() as stack:
        for owner, name, make in targets:
            if isinstance(owner, dict):
                stack.callback(owner.__setitem__, name, owner[name])
                owner[name] = make(owner[name])
                continue
            if name in vars(owner):
                stack.callback(setattr, owner, name, vars(owner)[name])
            else:  # a method found on the class: the instance's copy goes again
                stack.callback(delattr, owner, name)
            setattr(owner, name, make(getattr(owner, name)))
        yield


def run_timed(device: torch.device, phases: Phases, run: Callable[[], int]) -> dict[str, float]:
    """Per-step milliseconds of each phase and of ``other`` (the rest of the wall time); ``run`` returns steps."""
    synchronize(device)
    began = time.perf_counter()
    steps = run()
    synchronize(device)
    total = 1e3 * (time.perf_counter() - began)
    split = {name: value / steps for name, value in phases.milliseconds().items()}
    split["other"] = max(0.0, total / steps - sum(split.values()))
    return split


def print_table(title: str, measured: dict[str, float], reference: dict[str, float], reference_name: str) -> float:
    total, base = sum(measured.values()), sum(reference.values())
    extra = total - base
    print(f"\n### {title}: {total:.2f} ms vs {base:.2f} ms per step ({reference_name}), ratio {total / base:.2f}\n")
    print(f"| phase | measured ms | {reference_name} ms | extra ms | share of the extra |")
    print("|---|---:|---:|---:|---:|")
    for name in [phase for phase in ORDER if phase in measured or phase in reference]:
        left, right = measured.get(name, 0.0), reference.get(name, 0.0)
        share = f"{100 * (left - right) / extra:.0f}%" if extra > 0 else "-"
        print(f"| {name} | {left:.2f} | {right:.2f} | {left - right:+.2f} | {share} |")
    return total


Round = Callable[[], dict[str, float]]


def timed_round(device: torch.device, phases: Phases, run: Callable[[], int], patches: tuple = ()) -> Round:
    """One round of ``run`` (it returns its steps) with ``patches`` in place: per-step milliseconds per phase."""
    def one_round() -> dict[str, float]:
        with patched(*patches):
            phases.spans.clear()
            return run_timed(device, phases, run)

    return one_round


def measure(sides: dict[str, Round], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Each side's per-phase median over ``repeats`` rounds, run in an order rotated from round to round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    splits: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(repeats):
        for name in names[index % len(names):] + names[:index % len(names)]:
            splits[name].append(sides[name]())
    return {name: {phase: statistics.median(split.get(phase, 0.0) for split in rounds)
                   for phase in {phase for split in rounds for phase in split}}
            for name, rounds in splits.items()}


# --------------------------------------------------------------------------- DP-SGD
def plain_side(args, device: torch.device, dataset: TensorDataset) -> Round:
    """The reference: one non-private step per Poisson batch (the same batches), split the same way."""
    model = make_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    phases = Phases(device)
    sampler = torch.Generator().manual_seed(args.seed)

    def run() -> int:
        for _ in range(args.steps):
            with phases("sampling"):
                indices = poisson_batch(len(dataset), args.batch_size / len(dataset), sampler)
            with phases("data"):
                images, labels = next(batches_by_index(dataset, [indices]))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with phases("forward"):
                loss = F.cross_entropy(model(images), labels)
            with phases("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with phases("optimizer"):
                optimizer.step()
        return args.steps

    return timed_round(device, phases, run)


def dp_sgd_side(args, device: torch.device, dataset: TensorDataset, pad: bool) -> Round:
    config = DPSGDConfig(epochs=1, train_batch_size=args.batch_size, lr=0.1, max_norm=1.0, noise_multiplier=1.0,
                         max_physical_batch_size=args.physical_batch_size, grad_sample_mode=args.mode,
                         pad_batches=pad)
    trainer = DPSGDTrainer(make_model(args, device), dataset, config, device, seed=args.seed)
    trainer.wrapped.train()
    phases = Phases(device)
    optimizer = trainer.optimizer
    sampler = torch.Generator().manual_seed(args.seed)
    patches = [(trainer.wrapped, "forward", functools.partial(phases.wrap, "forward")),
               (torch.autograd, "grad", functools.partial(phases.wrap, "backward")),
               (torch.Tensor, "backward", functools.partial(phases.wrap, "backward")),
               (training.dp_sgd, "_padded", functools.partial(phases.wrap, "padding")),
               (optimizer, "clip_and_accumulate", functools.partial(phases.wrap, "clipping sums")),
               (optimizer, "add_noise", functools.partial(phases.wrap, "noise")),
               (optimizer.original_optimizer, "step", functools.partial(phases.wrap, "optimizer"))]
    for rule in RULES.values():
        patches += [(rule, "squared_norms", functools.partial(phases.wrap, "per-example norms")),
                    (rule, "clipped_sums", functools.partial(phases.wrap, "clipping sums"))]

    def run() -> int:
        for _ in range(args.steps):
            with phases("sampling"):
                indices = poisson_batch(len(dataset), trainer.sample_rate, sampler)
            with phases("data"):
                batch = next(batches_by_index(dataset, [indices]))
            optimizer.zero_grad(set_to_none=True)
            if batch is None:
                trainer._noise_only_step()
            else:
                trainer._logical_step(*batch, indices)
            trainer.steps_done += 1
        return args.steps

    return timed_round(device, phases, run, tuple(patches))


# --------------------------------------------------------------------------- DP statistics
def statistics_sides(args, device: torch.device, dataset: TensorDataset) -> tuple[Round, Round]:
    """A DP statistics epoch (``steps`` steps, with the statistics' capture in ``forward``) and eval forwards."""
    model = make_model(args, device).eval().requires_grad_(False)
    phases = Phases(device)
    patches = ((privacy.moments, "global_poisson_batch", functools.partial(phases.wrap, "sampling")),
               (privacy.moments, "image_batches",
                lambda original: lambda *given, **named: phases.iterate("data", original(*given, **named))),
               (synthesizer.dp_stats, "per_sample_statistics", functools.partial(phases.wrap, "forward")),
               (privacy.moments, "clipped_sum", functools.partial(phases.wrap, "clipping sums")),
               (privacy.moments, "noisy_global_sum", functools.partial(phases.wrap, "noise")))

    def run() -> int:
        result = compute_dp_statistics(model, dataset, epochs=1, batch_size=args.batch_size, max_norm=1.0,
                                       noise_multiplier=1.0, seed=args.seed, device=device, progress=False,
                                       max_physical_batch_size=args.physical_batch_size)
        return result.mechanism["steps"]

    reference = Phases(device)
    sampler = torch.Generator().manual_seed(args.seed)

    def forward() -> int:
        with torch.no_grad():
            for _ in range(args.steps):
                indices = poisson_batch(len(dataset), args.batch_size / len(dataset), sampler)
                with reference("data"):
                    images = next(batches_by_index(dataset, [indices]))[0].to(device, non_blocking=True)
                with reference("forward"):
                    model(images)
        return args.steps

    return timed_round(device, phases, run, patches), timed_round(device, reference, forward)


# --------------------------------------------------------------------------- synthesis
def synthesis_sides(args, device: torch.device) -> tuple[Round, Round]:
    generator = torch.Generator().manual_seed(args.seed)
    start = random_images(args.synthesis_batch_size, args, generator).to(device)
    targets = cyclic_targets(0, len(start), args.num_classes).to(device)
    low, high = torch.full((3,), -3.0, device=device), torch.full((3,), 3.0, device=device)
    teacher = frozen_teacher(args, device)
    phases = Phases(device)
    patches = [(synthesizer.deepinversion, "_jitter_and_flip", functools.partial(phases.wrap, "jitter")),
               (teacher, "forward", functools.partial(phases.wrap, "forward")),
               (torch.Tensor, "backward", functools.partial(phases.wrap, "backward")),
               (torch.optim.Adam, "step", functools.partial(phases.wrap, "optimizer"))]
    patches += [(TERMS, name, functools.partial(phases.wrap, "loss terms")) for name in TERMS]
    jitter = torch.Generator().manual_seed(args.seed)

    def run() -> int:  # the batch's final forward pass (its soft labels) counts too, once per batch
        optimize_batch(teacher, start, targets, args.steps, AlignmentConfig(), low, high, jitter)
        return args.steps

    model = make_model(args, device, seed_offset=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = random_labels(len(start), args, generator).to(device)
    reference = Phases(device)

    def train() -> int:
        for _ in range(args.steps):
            with reference("forward"):
                loss = F.cross_entropy(model(start), labels)
            with reference("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with reference("optimizer"):
                optimizer.step()
        return args.steps

    return timed_round(device, phases, run, tuple(patches)), timed_round(device, reference, train)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--batch_size", type=positive_int, default=64, help="expected Poisson batch B of both "
                        "private stages")
    parser.add_argument("--physical_batch_size", type=positive_int, default=256, help="largest physical chunk")
    parser.add_argument("--synthesis_batch_size", type=positive_int, default=80, help="images per synthesis batch")
    parser.add_argument("--steps", type=positive_int, default=8, help="steps of each side in a round (N = steps * B)")
    parser.add_argument("--mode", choices=GRAD_SAMPLE_MODES, default=GRAD_SAMPLE_MODES[0],
                        help="per-example clipping mode of the DP-SGD step")
    parser.add_argument("--pad_batches", action="store_true", help="also profile the DP-SGD step with padded "
                        "batches, and compare the two")
    args = parser.parse_args(argv)
    device = set_up(args)
    generator = torch.Generator().manual_seed(args.seed)
    size = args.batch_size * args.steps
    dataset = TensorDataset(random_images(size, args, generator), random_labels(size, args, generator))
    sides = {"plain": plain_side(args, device, dataset), "dp_sgd": dp_sgd_side(args, device, dataset, pad=False)}
    if args.pad_batches:
        sides["padded"] = dp_sgd_side(args, device, dataset, pad=True)
    sides["statistics"], sides["forward"] = statistics_sides(args, device, dataset)
    sides["synthesis"], sides["training"] = synthesis_sides(args, device)
    split = measure(sides, args.repeats, args.warmup)
    print(f"# medians of {args.repeats} round(s) of {args.steps} steps per side, sides interleaved")
    unpadded = print_table(f"DP-SGD logical step ({args.mode}) over a plain step, batch {args.batch_size}",
                           split["dp_sgd"], split["plain"], "plain")
    if args.pad_batches:
        padded = print_table(f"DP-SGD logical step ({args.mode}, padded batches) over a plain step, batch "
                             f"{args.batch_size}", split["padded"], split["plain"], "plain")
        print(f"\npadded / unpadded DP-SGD step: {padded / unpadded:.2f}")
    print_table(f"DP statistics step over an eval forward pass, batch {args.batch_size}", split["statistics"],
                split["forward"], "forward")
    print_table(f"Synthesis step over a training step, batch {args.synthesis_batch_size}", split["synthesis"],
                split["training"], "training")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
