#!/usr/bin/env python
"""Empirical privacy audit: canary attacks on the DP statistics mechanism and on a DP-SGD step.

Each configuration runs the project's own mechanism many times on a dataset with and without a
worst-case canary, chooses a threshold test on half of the trials, and turns its true/false
positive rates on the other half into an epsilon lower bound (Clopper-Pearson, 95%). A sound
mechanism's bound stays below the accountant's epsilon; the same audit on deliberately broken
mechanisms (clipping disabled, noise divided by 10) must exceed it, showing the audit has power.

A bound below the accountant is evidence, not proof, of correct code: with n evaluation trials
no bound can exceed about ln(n / 3.7), which is why the audited configurations have low epsilon.

Exit code 0 when every configuration behaves as expected, 1 when one does not (a sound mechanism
above the accountant: a privacy bug; a broken one not caught: too little power), 2 on bad input.

Example:
  python audit_privacy.py --output runs/privacy_audit.json
  python audit_privacy.py --long --output runs/privacy_audit_long.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from common.cli import ArgumentParser, main_guard, nonnegative_int, positive_int, probability
from privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT, DEFAULT_DELTA

DEFAULT_OUTPUT = "runs/privacy_audit.json"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser.for_script(__doc__)
    parser.add_argument("--trials", type=positive_int,
                        help="runs of the mechanism per world (with / without canary), half of them to choose "
                             "the test (default 4000, or 20000 with --long; at least 4)")
    parser.add_argument("--long", action="store_true",
                        help="also audit subsampled and multi-step configurations, with more trials (minutes)")
    parser.add_argument("--mechanisms", nargs="+", choices=("dp_statistics", "dp_sgd"),
                        default=["dp_statistics", "dp_sgd"], help="mechanisms to audit (default both)")
    parser.add_argument("--delta", type=probability, default=DEFAULT_DELTA,
                        help="delta of the bound and of the accountant (default %(default)g)")
    parser.add_argument("--accountant", choices=tuple(ACCOUNTANTS), default=DEFAULT_ACCOUNTANT,
                        help="accountant whose epsilon the bounds are compared with (default %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of every trial's sampling and noise (default 0)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON result file (default {DEFAULT_OUTPUT})")
    return parser


def _row(result) -> str:
    config = result.config
    verdict = "ok" if result.passed else ("PRIVACY VIOLATION" if result.expected == "below" else "NOT CAUGHT")
    mechanism = config.mechanism + (f" K={config.augmult}" if config.augmult else "")
    return (f"{mechanism:<14} {config.breakage:<13} sigma={config.noise_multiplier:<4g} "
            f"q={result.sample_rate:<4g} steps={result.steps:<3d} lower bound {result.epsilon_lower_bound:5.2f}  "
            f"accountant {result.accountant_epsilon:5.2f}  (max {result.max_certifiable_epsilon:4.2f})  "
            f"expected {result.expected:<5}  {verdict}")


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from audit.canary import run_audit, suite
    from common.files import atomic_write_text

    configs = [replace(config, delta=args.delta) for config in suite(args.long, args.trials)
               if config.mechanism in args.mechanisms]
    print(f"auditing {len(configs)} configurations, {configs[0].trials} trials per world each", flush=True)
    results = []
    for config in configs:
        result = run_audit(config, seed=args.seed, accountant=args.accountant)
        print(_row(result), flush=True)
        results.append(result)
    report = {"seed": args.seed, "delta": args.delta, "accountant": args.accountant, "long": args.long,
              "passed": all(result.passed for result in results),
              "results": [result.to_dict() for result in results]}
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    if not report["passed"]:
        print("audit FAILED: see the rows not marked ok", file=sys.stderr)
        raise SystemExit(1)
    return report


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
