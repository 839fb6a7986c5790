"""The stage CLIs as real processes: one-line errors without a traceback, and --help for every flag.

The in-process matrix of bad inputs is tests/test_bad_input.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest


def test_real_process_prints_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train_dp.py", "--dataset", "nosuchset", "--output",
                             str(tmp_path / "t.dppt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["train_dp.py", "save_dp_db_stats.py", "synthesize.py", "train_student.py",
                                    "run_pipeline.py", "evaluate_release.py"])
def test_help_documents_every_flag(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--output" in result.stdout and "usage" in result.stdout
