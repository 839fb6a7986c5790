"""What every benchmark shares: arguments, interleaved timing, the reference training step, figure lines.

A figure compares one *measured* side with its *reference* side on the same model, batch and data.
Each round runs every side once, in an order rotated from round to round, so that a slow phase of
a loaded machine hits all sides alike. The printed ratio is the median of the per-round ratios
measured / reference; the spread is their minimum and maximum. Absolute times are context only.

Peak memory is the process's resident-set high-water mark while a side ran (its counter is reset
before each side; on CUDA, the allocator's peak instead), so it includes what the process already
held.
"""
from __future__ import annotations

import operator
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import registry  # noqa: E402
from common.cli import ArgumentParser, HelpFormatter, nonnegative_int, positive_int  # noqa: E402
from common.runtime import resolve_device, seed_everything  # noqa: E402

COMPARISONS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}
FIGURE_LINE = re.compile(r"^(?P<name>[\w.-]+): ratio (?P<ratio>\d+\.\d\d) \(goal (?P<goal>[^)]*)\)"
                         r"(?:\s+spread (?P<low>\d+\.\d\d)-(?P<high>\d+\.\d\d))?")
_HIGH_WATER = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


# --------------------------------------------------------------------------- arguments and set-up
def benchmark_parser(doc: str, repeats: int = 5, threads: int = 1) -> ArgumentParser:
    """The flags every benchmark has; the script adds its size flags. ``doc``: the script's docstring.

    ``threads``: the default of ``--threads``, 1, or 0 (all cores) where a goal is stated for the cores the
    stages use.
    """
    lines = doc.strip().splitlines()
    parser = ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]) or None,
                            formatter_class=HelpFormatter)
    parser.add_argument("--model", choices=list(registry.MODELS), default="small_cnn",
                        help="network under test (resnet18 for a GPU run)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=positive_int, default=repeats, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs of every side first")
    why = ("torch's choice (all cores) by default: the goals are for the cores the stages use" if threads == 0 else
           "one by default because on a shared machine extra threads make ratios swing with other processes' load")
    parser.add_argument("--threads", type=nonnegative_int, default=threads,
                        help=f"torch intra-op threads, 0 for torch's own choice; {why}")
    parser.add_argument("--image_size", type=positive_int, default=32, help="side of the square input images")
    parser.add_argument("--num_classes", type=positive_int, default=10, help="classifier outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, models and sampling")
    return parser


def set_up(args) -> torch.device:
    """Seed, threads and device from the common flags; prints the context line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    print(f"# torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
          f"model {args.model}, {args.repeats} round(s)")
    return device


def make_model(args, device: torch.device, seed_offset: int = 0) -> nn.Module:
    """A fresh model from the registry; the same ``seed_offset`` gives the same initial weights."""
    torch.manual_seed(args.seed + seed_offset)
    return registry.get_model(args.model, args.num_classes).to(device)


def random_images(count: int, args, generator: torch.Generator, channels: int = 3) -> torch.Tensor:
    """Normalized-looking images; content does not change the cost of any stage."""
    return torch.randn(count, channels, args.image_size, args.image_size, generator=generator)


def random_labels(count: int, args, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, args.num_classes, (count,), generator=generator)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor) -> float:
    """THE reference of most figures: one non-private supervised step (forward, backward, update)."""
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per item of one side, one entry per round, and its peak memory."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def peak_mib(device: torch.device) -> float:
    """The process's resident-set high-water mark (on CUDA, the allocator's peak), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(_HIGH_WATER.search(Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sides(sides: Mapping[str, Callable[[], int]], repeats: int, warmup: int,
               device: torch.device) -> dict[str, Timing]:
    """Run every side ``warmup`` times untimed, then ``repeats`` interleaved rounds.

    A side is a callable doing one unit of work and returning how many items it processed,
    so that sides of different sizes are compared per item.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    timings = {name: Timing() for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            _reset_peak(device)
            start = time.perf_counter()
            items = sides[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            timings[name].seconds.append(elapsed / max(items, 1))
            timings[name].peak_mib = max(timings[name].peak_mib, peak_mib(device))
    return timings


# --------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Goal:
    """``"<= 1.5"``-style goal of a figure; ``Goal()`` means measured only."""

    comparison: str = ""
    value: float = 0.0

    def met(self, ratio: float) -> bool | None:
        return COMPARISONS[self.comparison](ratio, self.value) if self.comparison else None

    def __str__(self) -> str:
        return f"{self.comparison} {self.value:g}" if self.comparison else "measured"


def report(name: str, measured: Timing, reference: Timing, goal: Goal, unit: str) -> float:
    """Print the figure line and its memory line; returns the median ratio."""
    ratios = [m / r for m, r in zip(measured.seconds, reference.seconds)]
    ratio = statistics.median(ratios)
    print(f"{name}: ratio {ratio:.2f} (goal {goal})  spread {min(ratios):.2f}-{max(ratios):.2f} "
          f"over {len(ratios)} round(s); {format_seconds(measured.median)} vs "
          f"{format_seconds(reference.median)} per {unit}")
    print(f"{name}: peak memory {measured.peak_mib:.0f} MiB vs {reference.peak_mib:.0f} MiB")
    return ratio


def format_seconds(seconds: float) -> str:
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {suffix}"
    return f"{seconds / 1e-9:.3g} ns"
