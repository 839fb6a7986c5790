"""Shared fixtures: one tiny end-to-end pipeline run per test session (mnist5k + photos, small_cnn)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

TINY_CONFIG = {
    "output": "unused", "dataset": "mnist5k", "model": "small_cnn", "target_epsilon": 10.0,
    "delta": 1e-5, "device": "cpu", "exports": ["npz"],
    "teacher": {"epochs": 2, "train_batch_size": 256, "lr": 1.0, "max_norm": 1.0, "seed": 0},
    "statistics": {"epochs": 1, "train_batch_size": 256, "public_set": "photos",
                   "clip_quantile": 0.5, "seed": 0},
    "synthesis": {"public_set": "photos", "num_samples": [500, 400], "g_steps": [0, 3], "batch_size": 100,
                  "batches_per_shard": 2, "lr_g": 0.1},
    "student": {"model": "small_cnn", "epochs": 4, "batch_size": 64, "lr": 0.05, "T": 4.0, "seeds": [1]},
}


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Two cores are shared by the suite; extra intra-op threads only add contention."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _local_cache(tmp_path_factory):
    """The content check keeps private keys in a folder of this session, never in the user's cache."""
    os.environ["DPIMGSYN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    from common.batches import single_threaded

    with single_threaded():
        yield


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, dict]:
    """Run the whole pipeline once (about a minute on 2 cores); tests read its artifacts."""
    from stages.config import validate_config
    from stages.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("pipeline")
    report = run_pipeline(validate_config(copy.deepcopy(TINY_CONFIG)), out, progress=False)
    return out, report
