"""Fault tolerance: every stage survives SIGKILL at a random point, and no write is ever half-visible.

Each stage CLI runs in a real process on tiny mnist5k/small_cnn settings with fixed seeds. Once it
has checkpointed some progress (its resume file or first shard exists), it is killed with SIGKILL
after a random short delay, then the same command is run again. The rerun must finish, its
artifacts must load, its ledger must count exactly the steps of an uninterrupted run (no budget
lost, none counted twice) and, with fixed seeds, its weights and arrays must be bit-identical to
the uninterrupted run's.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

import privacy
import save_dp_db_stats
import synthesize
import train_dp
import train_student
from synthesizer import release as release_io

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = 20240607  # the kill points are random, but reproducibly so
POLL_SECONDS = 0.02
STAGE_TIMEOUT = 240.0
QUIET = ["--device", "cpu", "--no_progress"]


def single_threaded_env() -> dict[str, str]:
    """Subprocess environment: one BLAS/OpenMP thread, as the in-process reference runs use."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Stage:
    """One stage CLI: how to call it, what it writes, and which file proves it has made progress."""

    name: str
    module: Any
    argv: Callable[[Path, Path], list[str]]  # (reference root, this stage's folder) -> arguments
    artifact: str  # the stage's final output, relative to its folder
    progress_marker: str  # appears once some progress is checkpointed, relative to its folder
    max_kill_delay: float  # seconds after the marker; well inside the remaining work
    resumed_says: tuple[str, ...]  # what the rerun prints when it continues (empty: prints nothing)


STAGES = (
    Stage("teacher", train_dp,
          lambda ref, out: ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", "2",
                            "--train_batch_size", "1000", "--lr", "1", "--noise_multiplier", "2",
                            "--seed", "11", "--output", str(out / "teacher.dppt")],
          "teacher.dppt", "teacher.dppt.resume", 1.5, ("resuming", "already complete")),
    # 375 steps; the statistics stage checkpoints every 100.
    Stage("statistics", save_dp_db_stats,
          lambda ref, out: ["--teacher", str(ref / "teacher" / "teacher.dppt"), "--epochs", "3",
                            "--train_batch_size", "32", "--max_norm", "1", "--noise_multiplier", "2",
                            "--seed", "12", "--output", str(out / "statistics.dppt")],
          "statistics.dppt", "statistics.dppt.resume", 1.0, ("resuming", "already complete")),
    Stage("synthesis", synthesize,
          lambda ref, out: ["--teacher", str(ref / "statistics" / "statistics.dppt"), "--public_set", "photos",
                            "--num_samples", "240", "--g_steps", "8", "--batch_size", "40",
                            "--batches_per_shard", "1", "--seed", "13", "--output", str(out / "release")],
          "release", "release/.shards/shard_000000.sha256", 0.6, ()),
    Stage("student", train_student,
          lambda ref, out: ["--release", str(ref / "synthesis" / "release"), "--model", "small_cnn",
                            "--epochs", "20", "--batch_size", "32", "--lr", "0.05", "--T", "4", "--seed", "14",
                            "--output", str(out / "student")],
          "student", "student/student.resume", 0.8, ("resuming", "already complete")),
)
STAGE_NAMES = [stage.name for stage in STAGES]


# --------------------------------------------------------------------------- file checks
def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _load_npz(path: Path) -> None:
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            archive[key]


def _load_png(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def _load_csv(path: Path) -> None:
    """A complete CSV: a header and rows of as many fields, ending with a newline (written atomically)."""
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert text.endswith("\n") and rows and all(len(row) == len(rows[0]) for row in rows), text


def _load_sha256(path: Path) -> None:
    digest = path.read_text().strip()
    assert len(digest) == 64 and int(digest, 16) >= 0, digest


# Every file kind a stage writes under its final name, and how to prove it is complete.
LOADERS: dict[str, Callable[[Path], Any]] = {
    ".dppt": privacy.load_dppt,
    ".resume": lambda path: torch.load(path, map_location="cpu", weights_only=True),
    ".pt": lambda path: torch.load(path, map_location="cpu", weights_only=True),
    ".json": _load_json,
    ".npy": lambda path: np.load(path, allow_pickle=False),
    ".npz": _load_npz,
    ".png": _load_png,
    ".sha256": _load_sha256,
    ".csv": _load_csv,
}
UNCHECKED_SUFFIXES = (".log", ".tmp")  # logs are append-only text; ".tmp" are never final names


def unreadable_final_files(folder: Path) -> list[str]:
    """Files under their final names that do not load completely (there must be none)."""
    broken = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(UNCHECKED_SUFFIXES):
            continue
        loader = LOADERS.get(path.suffix)
        if loader is None:
            broken.append(f"{path.relative_to(folder)} (unknown kind of file)")
            continue
        try:
            loader(path)
        except Exception as error:  # noqa: BLE001 - any failure means a torn write
            broken.append(f"{path.relative_to(folder)} ({type(error).__name__}: {error})")
    return broken


# --------------------------------------------------------------------------- running and killing
@dataclass
class KilledRun:
    """What happened to one stage: the kill, the files left behind, and the rerun."""

    folder: Path
    command: list[str]
    kill_delay: float
    returncode_at_kill: int | None = None
    broken_after_kill: list[str] | None = None
    rerun_returncode: int | None = None
    rerun_output: str = ""


def _launch(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(command, cwd=REPO, env=single_threaded_env(), stdout=handle,
                                stderr=subprocess.STDOUT)


def kill_each_after_progress(runs: dict[str, KilledRun]) -> None:
    """Start every run at once; SIGKILL each a random delay after its progress marker appears."""
    processes = {name: _launch(run.command, run.folder.with_name(f"{name}.killed.out")) for name, run in runs.items()}
    kill_at: dict[str, float] = {}
    deadline = time.monotonic() + STAGE_TIMEOUT
    try:
        while any(run.returncode_at_kill is None for run in runs.values()):
            if time.monotonic() > deadline:
                raise AssertionError(f"stages still running after {STAGE_TIMEOUT}s: "
                                     f"{[n for n, r in runs.items() if r.returncode_at_kill is None]}")
            for name, run in runs.items():
                if run.returncode_at_kill is not None:
                    continue
                process = processes[name]
                if process.poll() is not None:  # ended on its own: not interrupted
                    run.returncode_at_kill = process.returncode
                    continue
                marker = run.folder / STAGE_BY_NAME[name].progress_marker
                if name not in kill_at and marker.exists():
                    kill_at[name] = time.monotonic() + run.kill_delay
                if name in kill_at and time.monotonic() >= kill_at[name]:
                    process.send_signal(signal.SIGKILL)
                    run.returncode_at_kill = process.wait()
            time.sleep(POLL_SECONDS)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def rerun_all(runs: dict[str, KilledRun]) -> None:
    """Run every same command again, all at once, until each exits."""
    logs = {name: run.folder.with_name(f"{name}.rerun.out") for name, run in runs.items()}
    processes = {name: _launch(run.command, logs[name]) for name, run in runs.items()}
    for name, process in processes.items():
        runs[name].rerun_returncode = process.wait(timeout=STAGE_TIMEOUT)
        runs[name].rerun_output = logs[name].read_text()[-3000:]


STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory) -> tuple[Path, dict[str, KilledRun]]:
    """Uninterrupted reference runs (in process), then every stage killed once and rerun."""
    root = tmp_path_factory.mktemp("fault")
    reference = root / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the single-threaded subprocesses
    try:
        for stage in STAGES:
            stage.module.run(stage.argv(reference, reference / stage.name) + QUIET)
    finally:
        torch.set_num_threads(threads)

    rng = random.Random(KILL_SEED)
    runs = {}
    for stage in STAGES:
        folder = root / "killed" / stage.name
        folder.mkdir(parents=True)
        command = [sys.executable, f"{stage.module.__name__}.py", *stage.argv(reference, folder), *QUIET]
        runs[stage.name] = KilledRun(folder, command, kill_delay=rng.uniform(0.0, stage.max_kill_delay))
    kill_each_after_progress(runs)
    for run in runs.values():
        run.broken_after_kill = unreadable_final_files(run.folder)
    rerun_all(runs)
    return reference, runs


# --------------------------------------------------------------------------- comparisons
def assert_identical(reference: Any, resumed: Any, where: str, ignore: tuple[str, ...] = ()) -> None:
    """Recursive exact equality of plain values, tensors and arrays (keys in ``ignore`` skipped)."""
    if isinstance(reference, dict):
        assert isinstance(resumed, dict), where
        keys = set(reference) - set(ignore)
        assert keys == set(resumed) - set(ignore), f"{where}: keys {sorted(keys ^ (set(resumed) - set(ignore)))}"
        for key in sorted(keys, key=str):
            assert_identical(reference[key], resumed[key], f"{where}.{key}", ignore)
    elif isinstance(reference, (list, tuple)):
        assert isinstance(resumed, (list, tuple)) and len(reference) == len(resumed), where
        for index, (left, right) in enumerate(zip(reference, resumed)):
            assert_identical(left, right, f"{where}[{index}]", ignore)
    elif isinstance(reference, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and torch.equal(reference, resumed), f"{where} differs"
    elif isinstance(reference, np.ndarray):
        assert isinstance(resumed, np.ndarray) and np.array_equal(reference, resumed), f"{where} differs"
    elif isinstance(reference, float) and reference != reference:
        assert isinstance(resumed, float) and resumed != resumed, where
    else:
        assert reference == resumed, f"{where}: {reference!r} != {resumed!r}"


def ledger_steps(block: dict) -> list[tuple[str, int]]:
    return [(entry["stage"], entry["steps"]) for entry in block["ledger"]]


def compare_checkpoints(reference: Path, resumed: Path) -> None:
    """Same ledger step counts, then the whole payload bit-identical."""
    expected, actual = privacy.load_dppt(reference), privacy.load_dppt(resumed)
    privacy.check_dppt(actual, stage=expected["stage"])
    assert ledger_steps(actual["privacy"]) == ledger_steps(expected["privacy"])
    assert actual["privacy"]["epsilon"] == expected["privacy"]["epsilon"]
    assert_identical(expected, actual, resumed.name)


def compare_releases(reference: Path, resumed: Path) -> None:
    expected, actual = release_io.load(reference, verify=True), release_io.load(resumed, verify=True)
    assert ledger_steps(actual.metadata["privacy"]) == ledger_steps(expected.metadata["privacy"])
    for name, left, right in zip(release_io.ARRAY_FILES, expected.tensors(), actual.tensors()):
        assert torch.equal(left, right), name
    assert_identical(expected.metadata, actual.metadata, "metadata.json")
    assert not (resumed / release_io.SHARDS_DIR).exists()


def compare_students(reference: Path, resumed: Path) -> None:
    load = lambda folder: torch.load(folder / "student.pt", map_location="cpu", weights_only=True)  # noqa: E731
    assert_identical(load(reference), load(resumed), "student.pt")
    metrics = _load_json(resumed / "metrics.json")
    assert metrics["epochs"] == len(metrics["history"]) == 20  # every epoch trained exactly once
    assert_identical(_load_json(reference / "metrics.json"), metrics, "metrics.json", ignore=("seconds",))
    assert not (resumed / "student.resume").exists()


COMPARE = {"teacher": compare_checkpoints, "statistics": compare_checkpoints,
           "synthesis": compare_releases, "student": compare_students}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_was_killed_mid_run_and_left_only_complete_files(fault_runs, name):
    _, runs = fault_runs
    run = runs[name]
    assert run.returncode_at_kill == -signal.SIGKILL, (
        f"{name} ended by itself (exit {run.returncode_at_kill}) before the kill; give it more work")
    assert run.broken_after_kill == []


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_rerun_after_kill_equals_the_uninterrupted_run(fault_runs, name):
    reference, runs = fault_runs
    run = runs[name]
    assert run.rerun_returncode == 0, run.rerun_output
    stage = STAGE_BY_NAME[name]
    assert not stage.resumed_says or any(words in run.rerun_output for words in stage.resumed_says), (
        f"{name} started over instead of resuming:\n{run.rerun_output}")
    COMPARE[name](reference / name / stage.artifact, run.folder / stage.artifact)
    assert unreadable_final_files(run.folder) == []


# --------------------------------------------------------------------------- torn writes
WRITER = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
import privacy
from common.files import atomic_write_text
from synthesizer.release import ReleaseWriter

folder = Path(sys.argv[1])
writer = ReleaseWriter(folder / "release", num_samples=64, shard_size=16, image_shape=(1, 64, 64),
                       num_classes=4, settings={"purpose": "torn-write test"})
weights = torch.empty(1_000_000)
(folder / "ready.json").write_text("{}")
for iteration in range(10**9):
    privacy.save_dppt(folder / "model.dppt", {"iteration": iteration, "weights": weights.fill_(iteration)})
    atomic_write_text(folder / "metadata.json", json.dumps({"iteration": iteration, "pad": [iteration] * 100_000}))
    value = (iteration % 100) / 100
    images = np.full((16, 1, 64, 64), value, dtype=np.float32)
    writer.write_shard(iteration % 4, images=images, initial_images=images,
                       soft_labels=np.full((16, 4), value, dtype=np.float32),
                       targets=np.full(16, iteration % 4, dtype=np.int64))
"""
TORN_WRITE_KILLS = 2  # kills that must land inside a write (a temp file left behind)
MAX_KILLS = 12  # a kill aimed at a write can still land just after it; give up after this many


def consistent_shard(path: Path) -> bool:
    """A verified shard is whole: every array holds the single value of one write."""
    with np.load(path, allow_pickle=False) as shard:
        value = float(shard["images"].flat[0])
        return (all(np.all(shard[key] == value) for key in ("images", "initial_images", "soft_labels"))
                and len(set(shard["targets"].tolist())) == 1)


def test_kills_during_writes_never_leave_a_torn_file_under_a_final_name(tmp_path):
    rng = random.Random(KILL_SEED + 1)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "out"
    folder.mkdir()
    env = {**single_threaded_env(), "PYTHONPATH": str(REPO)}
    kills = interrupted_writes = 0
    while interrupted_writes < TORN_WRITE_KILLS and kills < MAX_KILLS:
        kills += 1
        (folder / "ready.json").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, str(script), str(folder)], cwd=REPO, env=env,
                                   stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not (folder / "ready.json").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(POLL_SECONDS)
        time.sleep(rng.uniform(0.3, 1.0))
        while not any(folder.rglob(".*.tmp")) and time.monotonic() < deadline:
            pass  # aim the kill at a write in progress: one has just started
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        process.stderr.close()
        temp_files = list(folder.rglob(".*.tmp"))
        interrupted_writes += bool(temp_files)

        assert unreadable_final_files(folder) == []
        model = privacy.load_dppt(folder / "model.dppt")
        assert torch.all(model["weights"] == model["iteration"])
        metadata = _load_json(folder / "metadata.json")
        assert metadata["pad"] == [metadata["iteration"]] * 100_000
        writer = release_io.ReleaseWriter(folder / "release", num_samples=64, shard_size=16,
                                          image_shape=(1, 64, 64), num_classes=4,
                                          settings={"purpose": "torn-write test"})
        verified = set(range(writer.num_shards)) - set(writer.pending_shards())
        shards = folder / "release" / release_io.SHARDS_DIR
        assert all(consistent_shard(shards / f"shard_{index:06d}.npz") for index in verified)
        for leftover in temp_files:  # so that the next kill is counted on its own
            leftover.unlink(missing_ok=True)
    # The kills must really have hit writes in progress, or this test proves nothing.
    assert interrupted_writes == TORN_WRITE_KILLS, f"only {interrupted_writes} of {kills} kills hit a write"
