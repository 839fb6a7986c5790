"""Same seeds, same machine (CPU, one thread): a whole tiny pipeline writes byte-identical artifacts.

Three in-process runs of every stage (teacher, DP statistics, synthesis with k = 2, student) with one
fixed config and seeds:

* runs 1 and 2 write into the *same* folder (run 1's output is moved aside before run 2). Then every
  artifact must be byte-identical (sha256 equal): ``teacher.dppt``, ``statistics.dppt``, the release's
  ``images.npy`` / ``soft_labels.npy`` / ``targets.npy`` / ``metadata.json`` / ``preview.png`` and the
  student's ``student.pt``. Only wall-clock fields are left out: the ``*.log`` files (timestamps on
  every line), ``seconds`` in ``report.json`` and in the student's ``metrics.json``, ``seconds.json``,
  and ``report.md`` (its "Seconds per stage" line).
* run 3 writes into a *different* folder. Shareable artifacts (checkpoints, releases) name no local
  path, so they are byte-identical there too; only the local records may differ, in these keys
  (anything else differing fails the test):

  - student ``metrics.json``: ``release`` (path of the release folder) and ``seconds``;
  - ``report.json``: ``releases`` (release folder paths) and ``seconds``.

  The student weights stay identical across folders.

A real nondeterminism found this way (and fixed in ``common.files.atomic_torch_save``): ``torch.save``
given a path names the zip archive inside the file after that path's stem, and the atomic writers
passed their random temp name (``.teacher.dppt.k3j9x.tmp``), so equal checkpoints had different bytes.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from common.batches import single_threaded
from stages.config import validate_config
from stages.pipeline import run_pipeline

CONFIG = {
    "output": "unused", "dataset": "mnist5k", "model": "small_cnn", "noise_multiplier": 1.0, "delta": 1e-5,
    "device": "cpu",
    "teacher": {"epochs": 1, "train_batch_size": 500, "lr": 1.0, "max_norm": 1.0, "seed": 21},
    "statistics": {"epochs": 1, "train_batch_size": 500, "public_set": "photos",
                   "clip_quantile": 0.5, "seed": 22},
    "synthesis": {"public_set": "photos", "num_samples": 60, "g_steps": [2], "batch_size": 30,
                  "batches_per_shard": 1, "seed": 23},
    "student": {"model": "small_cnn", "epochs": 1, "batch_size": 30, "lr": 0.05, "T": 4.0, "seeds": [24]},
}
RELEASE, STUDENT = "release_k2", "student_k2_seed24"
ARTIFACTS = ["teacher.dppt", "statistics.dppt", f"{RELEASE}/images.npy", f"{RELEASE}/soft_labels.npy",
             f"{RELEASE}/targets.npy", f"{RELEASE}/metadata.json", f"{RELEASE}/preview.png",
             f"{STUDENT}/student.pt"]
# Files whose bytes carry wall-clock time; the JSON ones are compared without their "seconds" key.
TIMED_FILES = {"report.json", "report.md", f"{STUDENT}/metrics.json", "results.csv", "seconds.json"}
# Keys (paths into the payload) that record a file system location, or a hash of a file that does.
PATH_KEYS = {
    f"{STUDENT}/metrics.json": [("release",), ("seconds",)],
    "report.json": [("releases",), ("seconds",)],
}


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    output, first, elsewhere = root / "run", root / "first", root / "elsewhere" / "run"
    with single_threaded():
        run_pipeline(validate_config(copy.deepcopy(CONFIG)), output, progress=False)
        shutil.move(output, first)
        run_pipeline(validate_config(copy.deepcopy(CONFIG)), output, progress=False)
        run_pipeline(validate_config(copy.deepcopy(CONFIG)), elsewhere, progress=False)
    return first, output, elsewhere


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_names(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.is_file() and path.suffix != ".log")


def load(path: Path):
    if path.suffix in (".dppt", ".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    return json.loads(path.read_text())


def without(payload, keys: list[tuple[str, ...]]):
    payload = copy.deepcopy(payload)
    for key in keys:
        node = payload
        for part in key[:-1]:
            node = node[part]
        assert key[-1] in node, f"expected key {'.'.join(key)} is gone: update PATH_KEYS"
        del node[key[-1]]
    return payload


def assert_same_payload(left, right, where: str = "") -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_same_payload(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_payload(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


def test_same_folder_every_artifact_is_byte_identical(three_runs):
    first, second, _ = three_runs
    assert file_names(first) == file_names(second)
    assert set(ARTIFACTS) <= set(file_names(first))
    different = [name for name in file_names(first)
                 if name not in TIMED_FILES and sha256(first / name) != sha256(second / name)]
    assert different == []
    for name in ("report.json", f"{STUDENT}/metrics.json"):  # equal but for wall-clock seconds
        assert without(load(first / name), [("seconds",)]) == without(load(second / name), [("seconds",)])
    assert results_without_time(first) == results_without_time(second)


def results_without_time(folder: Path) -> list[dict]:
    """results.csv but its wall-clock minutes and the run folder's name."""
    with open(folder / "results.csv") as handle:
        return [{key: value for key, value in row.items() if key not in ("run_minutes", "run")}
                for row in csv.DictReader(handle)]


def test_other_folder_differs_only_in_path_keys(three_runs):
    _, second, elsewhere = three_runs
    assert file_names(second) == file_names(elsewhere)
    for name in file_names(second):
        if name in PATH_KEYS:
            assert_same_payload(without(load(second / name), PATH_KEYS[name]),
                                without(load(elsewhere / name), PATH_KEYS[name]), name)
        elif name == "results.csv":
            assert results_without_time(second) == results_without_time(elsewhere)
        elif name not in ("report.md", "seconds.json"):
            assert sha256(second / name) == sha256(elsewhere / name), name
    left, right = (load(folder / STUDENT / "student.pt")["model"] for folder in (second, elsewhere))
    assert left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)
