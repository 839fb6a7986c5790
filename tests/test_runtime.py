"""common.runtime: malloc keeps freed memory, so steps stop page-faulting; a module's mode comes back after use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from common import cli, runtime
from training.accuracy import evaluate

ROOT = Path(__file__).resolve().parents[1]

# Tensors built, freed, then built again (as every training or synthesis step does). Prints whether
# malloc was changed and the minor page faults of the second build.
REBUILD = """
import json, resource, torch
from common.runtime import keep_freed_memory
applied = keep_freed_memory()
def build():
    return [torch.ones(2**18) for _ in range(64)]  # 1 MiB each, written
tensors = build()
del tensors
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
tensors = build()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES = 64 * 2**20 // 4096  # pages the second build writes


def rebuild(keep: str) -> dict:
    env = {**os.environ, runtime.KEEP_FREED_MEMORY_ENV: keep, "PYTHONPATH": str(ROOT)}
    finished = subprocess.run([sys.executable, "-c", REBUILD], env=env, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not runtime._glibc(), reason="tunes glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    kept = [rebuild("1") for _ in range(2)]
    assert all(run["applied"] and run["faults"] < PAGES // 4 for run in kept), kept
    # Whether glibc's default gives the memory back depends on the heap's layout (about every other run
    # here): some run of a few must fault the pages in again, or the setting would not matter.
    defaults = []
    while len(defaults) < 6 and not any(run["faults"] > PAGES // 2 for run in defaults):
        defaults.append(rebuild("0"))
    assert not any(run["applied"] for run in defaults) and defaults[-1]["faults"] > PAGES // 2, defaults


def test_every_cli_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main_guard(lambda argv: None)([]) == 0
    assert calls == [True]


class Failing(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken forward pass")


def test_a_scored_model_gets_its_training_mode_back_even_when_its_forward_pass_fails():
    model = Failing().train()
    with pytest.raises(RuntimeError, match="broken forward pass"):
        evaluate(model, TensorDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)), torch.device("cpu"))
    assert model.training
