"""Run every benchmark (``make bench``) and print one table of their figures.

Each benchmark runs in its own process (so that one's memory and threads do not disturb the
next), its output is shown as it comes, and its figure lines (``name: ratio X.XX (goal ...)``)
are collected into a Markdown table at the end: figure, ratio, goal, spread over the rounds and
whether the goal is met. Sized to finish in about ten minutes on two CPU cores.

    python benchmarks/run_all.py
    python benchmarks/run_all.py --model resnet18 --device cuda --paper     # the GPU run
    python benchmarks/run_all.py --only synthesis student --table perf.md
    python benchmarks/run_all.py --only paper_row --model resnet18 --device cuda  # GPU-minutes of a paper row
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# harness first: it puts the repository on sys.path
from harness import COMPARISONS, FIGURE_LINE
from common.cli import ArgumentParser, main_guard, nonnegative_int, positive_int
from common.files import atomic_write_text

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    script: str
    arguments: tuple[str, ...] = ()
    paper_arguments: tuple[str, ...] = ()  # the paper's batch sizes (--paper), in place of the demo's
    common_flags: bool = True  # takes --model/--device/--threads (benchmarks.common's parser)

    @property
    def name(self) -> str:
        return self.script.removeprefix("bench_").removesuffix(".py")


BENCHMARKS = (
    Benchmark("bench_dp_sgd.py", paper_arguments=("--batch_size", "128", "--physical_batch_size", "128")),
    Benchmark("bench_dp_stats.py", paper_arguments=("--batch_size", "64")),
    Benchmark("bench_synthesis.py", paper_arguments=("--batch_size", "80")),
    Benchmark("bench_student.py", paper_arguments=("--batch_size", "256", "--num_images", "10240",
                                                   "--temperature", "100")),
    Benchmark("bench_scatter.py"),  # scatter_cnn (the demo's model) whatever --model says
    Benchmark("bench_data_path.py"),
    Benchmark("bench_release_load.py", ("--num_original", "10000"), common_flags=False),
    Benchmark("bench_allocator.py"),
    Benchmark("bench_paper_row.py"),
    Benchmark("bench_overlap.py"),
    Benchmark("bench_frontend_cache.py"),  # scatter_cnn's front-end cache on a folder set and a release
    Benchmark("bench_accountant.py", common_flags=False),  # calibration and per-epoch epsilons of a teacher
)


@dataclass(frozen=True)
class Figure:
    name: str
    ratio: float
    goal: str
    spread: str

    @property
    def met(self) -> str:
        comparison, _, value = self.goal.partition(" ")
        if comparison not in COMPARISONS:
            return "-"
        return "yes" if COMPARISONS[comparison](self.ratio, float(value)) else "no"


def parse_figures(output: str) -> list[Figure]:
    """Every figure line of a benchmark's output."""
    figures = []
    for line in output.splitlines():
        match = FIGURE_LINE.match(line)
        if match:
            spread = f"{match['low']}-{match['high']}" if match["low"] else "-"
            figures.append(Figure(match["name"], float(match["ratio"]), match["goal"], spread))
    return figures


def table(figures: list[Figure]) -> str:
    rows = ["| figure | ratio | goal | spread | met |", "|---|---|---|---|---|"]
    rows += [f"| {f.name} | {f.ratio:.2f} | {f.goal} | {f.spread} | {f.met} |" for f in figures]
    return "\n".join(rows) + "\n"


def run(benchmark: Benchmark, forwarded: list[str], repeats: list[str], paper: bool) -> tuple[str, int]:
    """Run one script, echoing its output; returns (stdout, exit code)."""
    sizes = benchmark.paper_arguments if paper else ()
    command = [sys.executable, str(HERE / benchmark.script), *benchmark.arguments, *sizes, *repeats]
    if benchmark.common_flags:
        command += forwarded
    print(f"## {benchmark.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = process.wait()
    print(f"## {benchmark.name}: {time.perf_counter() - started:.0f} s, exit code {code}", flush=True)
    return "".join(lines), code


def main(argv: list[str] | None = None) -> None:
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=names, default=names, help="benchmarks to run")
    parser.add_argument("--model", default=None, help="forwarded: network under test")
    parser.add_argument("--device", default=None, help="forwarded: cpu, cuda, ...")
    parser.add_argument("--threads", type=nonnegative_int, default=None,
                        help="forwarded: torch intra-op threads (0: torch's choice; default: each benchmark's own, "
                             "1, and all cores for bench_scatter.py, whose goal is stated for them)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="forwarded: interleaved rounds")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's batch sizes (DP-SGD 128, statistics 64, synthesis 80, student 256)")
    parser.add_argument("--table", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    forwarded = [token for flag in ("model", "device", "threads")
                 if getattr(args, flag) is not None for token in (f"--{flag}", str(getattr(args, flag)))]
    repeats = ["--repeats", str(args.repeats)] if args.repeats else []

    figures: list[Figure] = []
    failed = []
    started = time.perf_counter()
    for benchmark in BENCHMARKS:
        if benchmark.name in args.only:
            output, code = run(benchmark, forwarded, repeats, args.paper)
            figures += parse_figures(output)
            if code != 0:
                failed.append(benchmark.name)
    print(f"\n## all benchmarks: {time.perf_counter() - started:.0f} s\n")
    summary = table(figures)
    print(summary, end="")
    if args.table:
        atomic_write_text(args.table, summary)
    if failed:
        raise SystemExit(f"benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
