"""glibc's default malloc versus memory kept for reuse, as every stage CLI sets it.

By default glibc returns large freed blocks to the kernel, so each step rebuilds its activations
on fresh pages, one page fault per 4 KiB; the CLIs call ``common.runtime.keep_freed_memory``.
malloc's settings cannot be undone in a process, so each round runs two fresh child processes,
one with ``DPIMGSYN_KEEP_FREED_MEMORY=0`` and one as the CLIs run (their order alternating);
each times the demo's synthesis step and the reference training step and counts the minor page
faults per step. Ratios are kept / default: below 1 is the saving.

    python benchmarks/bench_allocator.py
    python benchmarks/bench_allocator.py --repeats 1 --steps 2 --batch_size 8 --image_size 16
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

# harness first: it puts the repository on sys.path
from harness import Goal, Timing, benchmark_parser, peak_mib, report, set_up
from bench_synthesis import add_size_flags, make_sides
from common.cli import main_guard
from common.runtime import KEEP_FREED_MEMORY_ENV

SIDES = ("synthesis", "training")
MODES = {"default": "0", "kept": "1"}  # the value of KEEP_FREED_MEMORY_ENV in the child


def measure_here(args) -> dict:
    """One child's measurement: per side, seconds and minor page faults per step; and peak memory."""
    device = set_up(args)
    sides = make_sides(args, device)
    result = {}
    for name in SIDES:
        for _ in range(args.warmup):
            sides[name]()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        sides[name]()
        elapsed = time.perf_counter() - start
        result[name] = {"seconds": elapsed / args.steps,
                        "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps}
    result["peak_mib"] = peak_mib(device)
    return result


def measure_in_child(argv: list[str], mode: str) -> dict:
    env = {**os.environ, KEEP_FREED_MEMORY_ENV: MODES[mode]}
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"the {mode} child failed:\n{finished.stderr}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3)  # a round is two processes: ~25 s on 2 CPU cores
    add_size_flags(parser)
    parser.add_argument("--child", action="store_true",
                        help="(internal) measure once in this process and print the result as JSON")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_here(args)))
        return
    device = set_up(args)
    if device.type != "cpu":  # e.g. within the GPU run of run_all.py
        print(f"# allocator: the figures are about the CPU's malloc; nothing to measure on {device}")
        return
    argv = sys.argv[1:] if argv is None else argv
    timings = {(mode, side): Timing() for mode in MODES for side in SIDES}
    faults = {key: [] for key in timings}
    for round_index in range(args.repeats):
        for mode in (list(MODES) if round_index % 2 == 0 else list(reversed(MODES))):
            measured = measure_in_child(argv, mode)
            for side in SIDES:
                timings[mode, side].seconds.append(measured[side]["seconds"])
                timings[mode, side].peak_mib = max(timings[mode, side].peak_mib, measured["peak_mib"])
                faults[mode, side].append(measured[side]["faults"])
    print(f"# batch {args.batch_size}, {args.steps} steps per child and side, {args.repeats} pair(s) of children")
    for side in SIDES:
        median_faults = {mode: statistics.median(faults[mode, side]) for mode in MODES}
        print(f"# {side}: minor page faults per step, default {median_faults['default']:.0f}, "
              f"kept {median_faults['kept']:.0f}")
        report(f"allocator_{side}_kept_vs_default", timings["kept", side], timings["default", side], Goal(),
               unit="step")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
