"""The accountant's share of a teacher stage: noise calibration and every epoch's diagnostic epsilon.

A DP-SGD teacher calibrates its noise multiplier (about ten PRV epsilons of the whole plan) and logs
epsilon after every epoch (one PRV epsilon of the growing ledger each). Opacus's PRV accountant bounds
its grid through RDP, whose fractional orders are Python sums of thousands of terms, and asks for the
same (rate, sigma) curve twice per call and again every epoch; ``privacy.accountant`` computes each
curve once. Both sides run the same calls from a cold start (no cached curve, no cached epsilon), the
reference with Opacus's own ``compute_rdp``; the epsilons are checked to be the same numbers. The
default plan is the demo teacher's at epsilon 10 (N = 4,000, batch 567, 30 epochs, statistics 1 epoch
of 284).

    python benchmarks/bench_accountant.py
    python benchmarks/bench_accountant.py --train_size 60000 --batch_size 8510 --epochs 30 --repeats 3
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import privacy.accountant as accountant  # noqa: E402
from common.cli import ArgumentParser, main_guard, positive_float, positive_int  # noqa: E402
from harness import Goal, Timing, format_seconds  # noqa: E402

GOAL = Goal("<=", 0.5)


@contextlib.contextmanager
def opacus_curves() -> Iterator[None]:
    """Opacus's own compute_rdp for the accountant (the caching context installs nothing)."""
    cached = accountant._cached_rdp
    accountant._cached_rdp = contextlib.nullcontext
    try:
        yield
    finally:
        accountant._cached_rdp = cached


def cold() -> None:
    """Forget every cached curve and epsilon: each side starts like a fresh process."""
    for function in (accountant._rdp_of_one_step, accountant._epsilon_of_history, accountant._rdp_of_mechanism):
        function.cache_clear()


def teacher_accounting(args) -> list[float]:
    """What a teacher stage asks the accountant: its calibrated sigma, then one epsilon per epoch."""
    plan = [accountant.poisson_plan(args.train_size, args.batch_size, args.epochs),
            accountant.poisson_plan(args.train_size, args.stats_batch_size, 1)]
    sigma = accountant.calibrate_noise_multiplier(args.target_epsilon, args.delta, plan, accountant.DEFAULT_ACCOUNTANT)
    rate, steps = plan[0]
    per_epoch = steps // args.epochs
    return [sigma] + [accountant.compute_epsilon([(sigma, rate, per_epoch * epoch)], args.delta,
                                                      accountant.DEFAULT_ACCOUNTANT)
                      for epoch in range(1, args.epochs + 1)]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_size", type=positive_int, default=4000, help="private records N")
    parser.add_argument("--batch_size", type=positive_int, default=567, help="DP-SGD expected batch")
    parser.add_argument("--epochs", type=positive_int, default=30, help="DP-SGD epochs (one epsilon logged each)")
    parser.add_argument("--stats_batch_size", type=positive_int, default=284, help="DP statistics batch (1 epoch)")
    parser.add_argument("--target_epsilon", type=positive_float, default=10.0, help="calibration target")
    parser.add_argument("--delta", type=positive_float, default=accountant.DEFAULT_DELTA, help="delta")
    parser.add_argument("--repeats", type=positive_int, default=2, help="interleaved timing rounds")
    args = parser.parse_args(argv)

    results: dict[str, list[float]] = {}

    def side(name: str, context: Callable[[], contextlib.AbstractContextManager]) -> float:
        cold()
        start = time.perf_counter()
        with context():
            results[name] = teacher_accounting(args)
        return time.perf_counter() - start

    timings = {"cached": Timing(), "opacus": Timing()}
    for round_index in range(args.repeats):
        order = ["cached", "opacus"] if round_index % 2 == 0 else ["opacus", "cached"]
        for name in order:
            timings[name].seconds.append(side(name, contextlib.nullcontext if name == "cached" else opacus_curves))
    if results["cached"] != results["opacus"]:
        raise SystemExit(f"the cached curves changed the numbers: {results['cached']} vs {results['opacus']}")
    print(f"accountant: calibration + {args.epochs} epoch epsilons of N = {args.train_size}, batch "
          f"{args.batch_size} (sigma {results['cached'][0]:.4f}, final epsilon {results['cached'][-1]:.3f}); "
          "the same numbers on both sides")
    ratios = [ours / theirs for ours, theirs in zip(timings["cached"].seconds, timings["opacus"].seconds)]
    print(f"accountant.teacher_stage: ratio {statistics.median(ratios):.2f} (goal {GOAL})  spread "
          f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} round(s); {format_seconds(timings['cached'].median)} "
          f"vs {format_seconds(timings['opacus'].median)} of accounting per teacher stage")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
