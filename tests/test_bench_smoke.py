"""Smoke tests: every benchmark script runs at a tiny size and prints its summary line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_release_load_smoke(tmp_path: Path) -> None:
    output = run_benchmark("bench_release_load.py", "--num_images", "200", "--repeats", "1",
                           "--workdir", str(tmp_path))
    match = re.search(r"^release_load: ratio (\d+\.\d\d) \(goal >= 20\)$", output, re.MULTILINE)
    assert match and float(match.group(1)) > 0, output
    assert re.search(r"peak memory \d+ MiB", output), output
    assert list(tmp_path.iterdir()) == []  # the temporary release and files are cleaned up
