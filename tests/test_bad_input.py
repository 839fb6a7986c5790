"""Bad input to every stage CLI: one line ``error: ...`` saying what to do, exit code 2, nothing clobbered.

One table, one row per mistake. Each row calls a stage's ``main`` in this process with arguments
built from the artifacts of the session's tiny pipeline (``tiny_pipeline`` in conftest.py: teacher,
statistics, releases k=0/k=3, students). A row may first *prepare* its input in the test's own
folder -- copy an artifact there, then corrupt, truncate, edit or damage the copy -- so the shared
artifacts are only ever read. Every row asserts:

* ``SystemExit`` with code 2;
* stderr is exactly one line, starting with ``error: ``, with no traceback, and it contains the row's
  keywords (what is wrong, and what to do about it);
* every file that existed before the call (the test's folder, with any copied or damaged artifact and
  any existing output, and the whole pipeline folder) is still there, byte-identical (sha256).

``{pipe}`` in a row is the pipeline's folder, ``{work}`` the test's own folder. Arguments given twice
take their last value (argparse), so a row appends its bad flag to the stage's valid base arguments.
docs/errors.md's table "When something is wrong" lists each kind of row with the message users see.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import evaluate_release
import run_pipeline
import save_dp_db_stats
import synthesize
import train_dp
import train_student

# Valid base arguments of each stage on the tiny pipeline's artifacts; rows add the bad part.
TEACHER = ("--dataset mnist5k --model small_cnn --epochs 1 --train_batch_size 256 --lr 1 --device cpu "
           "--no_progress --output {work}/teacher.dppt")
STATS = ("--teacher {pipe}/teacher.dppt --epochs 1 --train_batch_size 256 --max_norm 1 --device cpu "
         "--no_progress --output {work}/statistics.dppt")
SYNTH = ("--teacher {pipe}/statistics.dppt --public_set photos --num_samples 40 --g_steps 1 --batch_size 20 "
         "--device cpu --no_progress --output {work}/release")
STUDENT = ("--release {pipe}/release_k3 --model small_cnn --epochs 1 --batch_size 64 --lr 0.05 --T 4 "
           "--device cpu --no_progress --output {work}/student")
EVALUATE = "--release {pipe}/release_k3 --max_synthetic 50 --max_private 50 --device cpu --output {work}/eval"
PIPELINE = "--config {work}/config.yaml --no_progress"

# A valid pipeline config (never run to the end: every row using it fails before any training).
CONFIG = {
    "output": "{work}/pipe", "dataset": "mnist5k", "model": "small_cnn", "noise_multiplier": 1.0, "device": "cpu",
    "teacher": {"epochs": 1, "train_batch_size": 256, "lr": 1.0, "max_norm": 1.0, "seed": 0},
    "statistics": {"epochs": 1, "train_batch_size": 256, "max_norm": 1.0, "public_set": "photos"},
    "synthesis": {"public_set": "photos", "num_samples": 40, "g_steps": [0], "batch_size": 20},
    "student": {"model": "small_cnn", "epochs": 1, "batch_size": 64, "lr": 0.05, "T": 4.0, "seeds": [1]},
}

Prepare = Callable[[Path, Path], None]  # (pipeline folder, test folder)


# ----------------------------------------------------------------------------------------- inputs
def copy(name: str, to: str | None = None) -> Prepare:
    """Copy a pipeline artifact (file or folder) into the test folder."""
    def prepare(pipe: Path, work: Path) -> None:
        source, target = pipe / name, work / (to or name)
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return prepare


def corrupted(name: str, to: str = "bad.dppt") -> Prepare:
    """The checkpoint with its pickled header (bytes 64..576) overwritten by junk; same length."""
    def prepare(pipe: Path, work: Path) -> None:
        data = (pipe / name).read_bytes()
        junk = hashlib.sha256(b"junk").digest() * 16
        (work / to).write_bytes(data[:64] + junk + data[64 + len(junk):])
    return prepare


def truncated(name: str, to: str = "bad.dppt") -> Prepare:
    """The first half of the checkpoint's bytes (an interrupted download or copy)."""
    def prepare(pipe: Path, work: Path) -> None:
        data = (pipe / name).read_bytes()
        (work / to).write_bytes(data[:len(data) // 2])
    return prepare


def edited(name: str, to: str = "bad.dppt", drop: tuple[str, ...] = (), **changes) -> Prepare:
    """The checkpoint re-saved with some keys changed or dropped (a plain, loadable .dppt)."""
    def prepare(pipe: Path, work: Path) -> None:
        payload = torch.load(pipe / name, map_location="cpu", weights_only=True)
        for key in drop:
            del payload[key]
        payload.update(changes)
        torch.save(payload, work / to)
    return prepare


def damaged_release(how: str, name: str = "release") -> Prepare:
    """A copy of release_k3 with one file deleted, swapped for release_k0's, bit-flipped, or cut short."""
    def prepare(pipe: Path, work: Path) -> None:
        release = work / name
        shutil.copytree(pipe / "release_k3", release)
        if how == "missing images":
            (release / "images.npy").unlink()
        elif how == "swapped soft labels":  # a valid array of the right shape, from another release
            shutil.copy2(pipe / "release_k0" / "soft_labels.npy", release / "soft_labels.npy")
        elif how == "flipped byte":
            data = bytearray((release / "images.npy").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (release / "images.npy").write_bytes(bytes(data))
        elif how == "cut metadata":
            text = (release / "metadata.json").read_text()
            (release / "metadata.json").write_text(text[:len(text) // 2])
        else:
            raise ValueError(how)
    return prepare


def config(**changes) -> Prepare:
    """``{work}/config.yaml``: CONFIG with ``section.key`` (dots as ``__``) changed; None removes a key."""
    def prepare(pipe: Path, work: Path) -> None:
        raw = json.loads(json.dumps(CONFIG).replace("{work}", str(work)))
        for dotted, value in changes.items():
            *sections, key = dotted.split("__")
            node = raw
            for section in sections:
                node = node[section]
            if value is None:
                node.pop(key)
            else:
                node[key] = value
        (work / "config.yaml").write_text(yaml.safe_dump(raw))
    return prepare


def both(*steps: Prepare) -> Prepare:
    def prepare(pipe: Path, work: Path) -> None:
        for step in steps:
            step(pipe, work)
    return prepare


# ------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Case:
    id: str
    main: Callable
    argv: str  # base arguments plus the bad part; {pipe} and {work} are filled in
    says: tuple[str, ...]  # keywords the error line must contain: what is wrong, what to do
    prepare: Prepare | None = None


CASES = [
    # ---- train_dp.py: names, data, hyper-parameters, budget, existing output
    Case("teacher: unknown dataset", train_dp.main, TEACHER + " --dataset nosuchset", ("'nosuchset'", "valid names")),
    Case("teacher: unknown model", train_dp.main, TEACHER + " --model nosuchnet", ("'nosuchnet'", "valid names")),
    Case("teacher: unknown preset", train_dp.main, TEACHER + " --preset nosuchpreset",
         ("'nosuchpreset'", "choose one of")),
    Case("teacher: missing data root", train_dp.main, TEACHER + " --dataset mnist --data_root {work}/nothing",
         ("MNIST", "--download")),
    Case("teacher: NaN clipping norm", train_dp.main, TEACHER + " --max_norm nan", ("--max_norm", "finite")),
    Case("teacher: inf learning rate", train_dp.main, TEACHER + " --lr inf", ("--lr", "finite")),
    Case("teacher: negative sigma", train_dp.main, TEACHER + " --noise_multiplier -1",
         ("--noise_multiplier", "positive")),
    Case("teacher: zero sigma", train_dp.main, TEACHER + " --noise_multiplier 0", ("--noise_multiplier", "positive")),
    Case("teacher: zero clipping norm", train_dp.main, TEACHER + " --max_norm 0", ("--max_norm", "positive")),
    Case("teacher: zero epochs", train_dp.main, TEACHER + " --epochs 0", ("--epochs", "positive")),
    Case("teacher: negative batch size", train_dp.main, TEACHER + " --train_batch_size -5",
         ("--train_batch_size", "positive")),
    Case("teacher: unreachable target epsilon", train_dp.main, TEACHER + " --target_epsilon 1e-4",
         ("unreachable", "choose a larger target epsilon")),
    Case("teacher: output exists with other settings", train_dp.main, TEACHER + " --noise_multiplier 3",
         ("different settings", "choose another --output"), copy("teacher.dppt")),
    # ---- save_dp_db_stats.py: the teacher checkpoint, names, hyper-parameters, existing output
    Case("statistics: missing checkpoint", save_dp_db_stats.main, STATS + " --teacher {work}/missing.dppt",
         ("missing.dppt", "check the path")),
    Case("statistics: corrupted checkpoint", save_dp_db_stats.main, STATS + " --teacher {work}/bad.dppt",
         ("cannot read", "re-create it"), corrupted("teacher.dppt")),
    Case("statistics: truncated checkpoint", save_dp_db_stats.main, STATS + " --teacher {work}/bad.dppt",
         ("cannot read", "re-create it"), truncated("teacher.dppt")),
    Case("statistics: checkpoint without ledger", save_dp_db_stats.main, STATS + " --teacher {work}/bad.dppt",
         ("privacy violation", "privacy ledger"), edited("teacher.dppt", drop=("privacy",))),
    Case("statistics: checkpoint of the wrong stage", save_dp_db_stats.main,
         STATS + " --teacher {pipe}/statistics.dppt",
         ("stage 'statistics'", "teacher checkpoint")),
    Case("statistics: weights of another architecture", save_dp_db_stats.main, STATS + " --teacher {work}/bad.dppt",
         ("do not fit", "'resnet18'"), edited("teacher.dppt", architecture="resnet18")),
    Case("statistics: dataset differs from the teacher's", save_dp_db_stats.main, STATS + " --dataset mnist",
         ("'mnist5k'", "drop --dataset")),
    Case("statistics: unknown public set", save_dp_db_stats.main, STATS + " --public_set nosuchpublic",
         ("'nosuchpublic'", "valid names")),
    Case("statistics: NaN sigma", save_dp_db_stats.main, STATS + " --noise_multiplier nan",
         ("--noise_multiplier", "finite")),
    Case("statistics: negative clipping norm", save_dp_db_stats.main, STATS + " --max_norm -1",
         ("--max_norm", "positive")),
    Case("statistics: zero epochs", save_dp_db_stats.main, STATS + " --epochs 0", ("--epochs", "positive")),
    Case("statistics: zero batch size", save_dp_db_stats.main, STATS + " --train_batch_size 0",
         ("--train_batch_size", "positive")),
    Case("statistics: output exists with other settings", save_dp_db_stats.main, STATS,
         ("different settings", "choose another --output"), copy("statistics.dppt")),
    # ---- synthesize.py: the statistics checkpoint, names, hyper-parameters, existing release
    Case("synthesis: corrupted checkpoint", synthesize.main, SYNTH + " --teacher {work}/bad.dppt",
         ("cannot read", "re-create it"), corrupted("statistics.dppt")),
    Case("synthesis: truncated checkpoint", synthesize.main, SYNTH + " --teacher {work}/bad.dppt",
         ("cannot read", "re-create it"), truncated("statistics.dppt")),
    Case("synthesis: teacher checkpoint with g_steps > 0", synthesize.main,
         SYNTH + " --teacher {pipe}/teacher.dppt --g_steps 3",
         ("without DP statistics", "save_dp_db_stats.py")),
    Case("synthesis: weights of another architecture", synthesize.main, SYNTH + " --teacher {work}/bad.dppt",
         ("do not fit", "'resnet18'"), edited("statistics.dppt", architecture="resnet18")),
    Case("synthesis: unknown public set", synthesize.main, SYNTH + " --public_set nosuchpublic",
         ("'nosuchpublic'", "valid names")),
    Case("synthesis: NaN learning rate", synthesize.main, SYNTH + " --lr_g nan", ("--lr_g", "finite")),
    Case("synthesis: zero batch size", synthesize.main, SYNTH + " --batch_size 0", ("--batch_size", "positive")),
    Case("synthesis: negative sample count", synthesize.main, SYNTH + " --num_samples -3",
         ("--num_samples", "positive")),
    Case("synthesis: release exists with other settings", synthesize.main, SYNTH,
         ("different settings", "choose another --output"), copy("release_k3", "release")),
    # ---- train_student.py: the release, names, hyper-parameters, existing student
    Case("student: missing release", train_student.main, STUDENT + " --release {work}/norelease",
         ("norelease", "synthesize.py")),
    Case("student: release file missing", train_student.main, STUDENT + " --release {work}/release",
         ("images.npy", "regenerate"), damaged_release("missing images")),
    Case("student: release file swapped", train_student.main, STUDENT + " --release {work}/release",
         ("soft_labels.npy", "sha256"), damaged_release("swapped soft labels")),
    Case("student: release file corrupted", train_student.main, STUDENT + " --release {work}/release",
         ("images.npy", "sha256"), damaged_release("flipped byte")),
    Case("student: release metadata damaged", train_student.main, STUDENT + " --release {work}/release",
         ("metadata.json", "regenerate"), damaged_release("cut metadata")),
    Case("student: unknown model", train_student.main, STUDENT + " --model nosuchnet", ("'nosuchnet'", "valid names")),
    Case("student: unknown dataset", train_student.main, STUDENT + " --dataset nosuchset",
         ("'nosuchset'", "valid names")),
    Case("student: missing data root", train_student.main, STUDENT + " --dataset mnist --data_root {work}/nothing",
         ("MNIST", "--download")),
    Case("student: NaN temperature", train_student.main, STUDENT + " --T nan", ("--T", "finite")),
    Case("student: inf learning rate", train_student.main, STUDENT + " --lr inf", ("--lr", "finite")),
    Case("student: zero epochs", train_student.main, STUDENT + " --epochs 0", ("--epochs", "positive")),
    Case("student: negative batch size", train_student.main, STUDENT + " --batch_size -1",
         ("--batch_size", "positive")),
    Case("student: output exists with other settings", train_student.main, STUDENT,
         ("different settings", "choose another --output"), copy("student_k3_seed1", "student")),
    # ---- evaluate_release.py: the release, its teacher, names, output
    Case("evaluation: missing release", evaluate_release.main, EVALUATE + " --release {work}/norelease",
         ("norelease", "synthesize.py")),
    Case("evaluation: release file missing", evaluate_release.main, EVALUATE + " --release {work}/release",
         ("images.npy", "regenerate"), damaged_release("missing images")),
    Case("evaluation: release file swapped", evaluate_release.main, EVALUATE + " --release {work}/release",
         ("soft_labels.npy", "sha256"), damaged_release("swapped soft labels")),
    Case("evaluation: release file corrupted", evaluate_release.main, EVALUATE + " --release {work}/release",
         ("images.npy", "sha256"), damaged_release("flipped byte")),
    Case("evaluation: release metadata damaged", evaluate_release.main, EVALUATE + " --release {work}/release",
         ("metadata.json", "regenerate"), damaged_release("cut metadata")),
    Case("evaluation: teacher other than the release's", evaluate_release.main,
         EVALUATE + " --teacher {pipe}/teacher.dppt",
         ("sha256", "pass --teacher")),
    Case("evaluation: unknown dataset", evaluate_release.main, EVALUATE + " --dataset nosuchset",
         ("'nosuchset'", "valid names")),
    Case("evaluation: zero sample count", evaluate_release.main, EVALUATE + " --max_synthetic 0",
         ("--max_synthetic", "positive")),
    Case("evaluation: output inside the release", evaluate_release.main,
         EVALUATE + " --release {work}/release --output {work}/release/eval",
         ("inside the release", "outside it"), copy("release_k3", "release")),
    # ---- run_pipeline.py: the config file, its values, an existing output folder
    Case("pipeline: missing config", run_pipeline.main, PIPELINE, ("config.yaml", "check the --config path")),
    Case("pipeline: unknown config key", run_pipeline.main, PIPELINE, ("'teacher.epoch'", "valid keys"),
         config(teacher__epoch=3)),
    Case("pipeline: unknown dataset", run_pipeline.main, PIPELINE, ("'nosuchset'", "valid names"),
         config(dataset="nosuchset")),
    Case("pipeline: NaN learning rate", run_pipeline.main, PIPELINE, ("'teacher.lr'", "finite"),
         config(teacher__lr=float("nan"))),
    # checked before any stage runs, not hours later when the student starts
    Case("pipeline: inf student temperature", run_pipeline.main, PIPELINE, ("'student.T'", "finite"),
         config(student__T=float("inf"))),
    Case("pipeline: negative sigma", run_pipeline.main, PIPELINE, ("'noise_multiplier'", "positive"),
         config(noise_multiplier=-1.0)),
    Case("pipeline: zero student epochs", run_pipeline.main, PIPELINE, ("'student.epochs'", "positive"),
         config(student__epochs=0)),
    Case("pipeline: unreachable target epsilon", run_pipeline.main, PIPELINE,
         ("unreachable", "choose a larger target epsilon"), config(noise_multiplier=None, target_epsilon=1e-4)),
    Case("pipeline: output exists with other settings", run_pipeline.main, PIPELINE,
         ("different settings", "choose another --output"),
         both(copy("teacher.dppt", "pipe/teacher.dppt"), config(teacher__epochs=3))),
]


# -------------------------------------------------------------------------------------- the test
def snapshot(*folders: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def pipe(tiny_pipeline) -> Path:
    return tiny_pipeline[0]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, pipe: Path, tmp_path: Path, capsys, single_thread) -> None:
    work = tmp_path
    if case.prepare:
        case.prepare(pipe, work)
    argv = case.argv.format(pipe=pipe, work=work).split()
    before = snapshot(work, pipe)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        case.main(argv)

    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for keyword in case.says:
        assert keyword in lines[0], f"{keyword!r} not in {lines[0]!r}"
    after = snapshot(work, pipe)
    assert {path: after.get(path) for path in before} == before, "an existing file was changed or deleted"
