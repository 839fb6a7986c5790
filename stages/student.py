"""Stage 4 orchestration: a student distilled from a release, evaluated on the private test split."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import TensorDataset

import registry
from common.cli import RunOptions, content_settings, fraction, nonnegative_int, option
from common.errors import DPImgSynError
from common.files import atomic_torch_save, atomic_write_text, require_same_settings, resumed_history
from common.precision import PRECISION_HELP, PRECISIONS, use_bf16
from common.runtime import seed_everything
from evaluation.report import accuracy_key, split_notes
from privacy.split import split_by_content
from stages.skeleton import StageRun
from stages.teacher import EVAL_SPLIT_HELP, EVAL_SPLITS
from synthesizer import release as release_io
from training.accuracy import evaluate
from training.distill import DistillationConfig, StudentTrainer
from training.frontend import training_inputs


@dataclass(frozen=True, kw_only=True)
class StudentConfig(DistillationConfig, registry.FolderViewOptions, RunOptions):
    """Stage 4's settings: a student trained on the release alone (the paper's recipe by default)."""

    release: tuple[str, ...] = option(help="release folder written by synthesize.py; several (e.g. one run's k = 0 "
                                      "and k = 10) train one student on all their images, at their one epsilon: "
                                      "they must come from the same DP teacher and statistics",
                                      run_only=True)  # recorded by the checksums of their files
    dataset: str | None = option(None, "private dataset for the test split (default: the release's; required for "
                                 "a folder: set, which releases record by its folder name only); "
                                 + registry.dataset_choices("private"))
    model: str = option(registry.DEFAULT_MODEL, f"student architecture, {registry.model_choices()}")
    eval_every: int = option(0, "log test accuracy every N epochs (information only; 0 = final epoch only)",
                             parse=nonnegative_int)
    eval_split: str = option("test", EVAL_SPLIT_HELP, choices=EVAL_SPLITS)
    val_split: float = option(0.0, "with eval_split validation: the teacher's val_split, which picks the same "
                              "held-out records", parse=fraction)
    seed: int = option(111, "seed of init and batch order")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS, run_only=True)  # recorded as bf16 or not
    output: str = option(help="folder for metrics.json and student.pt", run_only=True)


def scored_set(dataset: str, config: StudentConfig, view: dict):
    """The split the student is scored on: the test split, or the teacher's held-out training records."""
    if config.eval_split == "test":
        return registry.get_split(dataset, "test", config.data_root, config.download, **view)
    return split_by_content(registry.get_split(dataset, "train", config.data_root, config.download, **view),
                            config.val_split)[1]


def joined_k(ks: Sequence[int | None]) -> str:
    """The label of a student of several releases: their k values, e.g. ``0+10``."""
    return "+".join(str(k) for k in ks)


def train_student(config: StudentConfig) -> dict:
    """Run (or resume) stage 4; returns the metrics rank 0 writes to ``<output>/metrics.json``.

    Under torchrun the other ranks train their share and return ``{}``.
    """
    with StageRun(config.device) as run:
        bundles, paths, dataset, view = _releases(config)
        bundle, output, bf16 = bundles[0], Path(config.output), use_bf16(config.precision, run.device)
        if config.eval_split == "validation" and not config.val_split:
            raise DPImgSynError("--eval_split validation needs the teacher's --val_split")
        checksums = [release.metadata.get("files", {}) for release in bundles]
        settings = {"release_sha256": checksums[0] if len(bundles) == 1 else checksums, **content_settings(config),
                    "dataset": registry.artifact_name(dataset), "bf16": bf16}
        metrics_path, final_key = output / "metrics.json", accuracy_key("student", config.eval_split)
        if metrics_path.exists():
            return _finished(metrics_path, settings, final_key, config.eval_split, run)
        run.open_log(output / "train_student.log", "stage 4 (student)", settings, output / "student.resume")
        with run.dist.main_first():  # only rank 0 evaluates; it alone may download the split
            test_set = scored_set(dataset, config, view) if run.is_main else None
        model, trainer = _student(config, bundles, run, bf16)
        history = resumed_history(run.resume_file, settings, trainer)
        if history:
            run.say(f"resuming student after epoch {trainer.epoch}")
        epoch_key = f"{config.eval_split}_acc"

        def after_epoch(stats: dict) -> None:
            """Rank 0 logs the epoch (metrics.csv, the log) and saves the resume state."""
            if not run.is_main:
                return
            if config.eval_every and (trainer.epoch % config.eval_every == 0 or trainer.epoch == config.epochs):
                stats[epoch_key] = evaluate(model, test_set, run.device)
            history.append(stats)
            test = f"  {config.eval_split} acc {stats[epoch_key]:.4f}" if epoch_key in stats else ""
            run.logger.info("epoch %d/%d  loss %.4f%s", stats["epoch"], config.epochs, stats["loss"], test)
            run.write_metrics(output / "metrics.csv", history, ("epoch", "loss", epoch_key))
            run.save_state(trainer=trainer.state_dict(), history=history)

        trainer.fit(config.progress, after_epoch)
        if not run.is_main:
            return {}
        final_acc = evaluate(model, test_set, run.device)
        # The student is post-processing of its releases: it carries their one privacy block (refuse_mixed_sources).
        atomic_torch_save({"model": model.state_dict(), "architecture": config.model,
                           "num_classes": trainer.soft_labels.shape[1], "dataset": dataset,
                           "privacy": bundle.metadata.get("privacy"),
                           **({registry.VIEW_KEY: view} if view else {})}, output / "student.pt")
        ks = [release.metadata.get("k") for release in bundles]
        metrics = {final_key: final_acc, **split_notes(config.eval_split), "epochs": config.epochs,
                   "dataset": dataset, "release": str(Path(paths[0])) if len(paths) == 1
                   else [str(Path(path)) for path in paths], "k": ks[0] if len(ks) == 1 else joined_k(ks),
                   "public_set": bundle.metadata.get("public_set"), "seed": config.seed,
                   "epsilon": bundle.metadata.get("privacy", {}).get("epsilon"), "eval_split": config.eval_split,
                   "seconds": time.time() - run.started, "history": history, "settings": settings}
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
        run.finish(f"student {config.eval_split} accuracy {final_acc:.4f} (final epoch) -> {metrics_path}")
        return metrics


def _releases(config: StudentConfig) -> tuple[list[release_io.ReleaseDataset], tuple[str, ...], str, dict]:
    """The releases a student trains on, checked (the same sources, a recorded private set), their paths, the
    private set they name and the view it is seen in (the release's, i.e. the teacher's view of a folder: set)."""
    paths = (config.release,) if isinstance(config.release, str) else tuple(config.release)
    if not paths:
        raise DPImgSynError("give at least one release folder")
    bundles = [release_io.load(path, verify=True) for path in paths]  # a swapped or damaged array is refused
    release_io.refuse_mixed_sources(bundles)
    bundle, name = bundles[0], " + ".join(paths)
    recorded = bundle.metadata.get("dataset")
    if not recorded:
        raise DPImgSynError(f"{paths[0]} does not record its private dataset; regenerate it with synthesize.py")
    dataset = config.dataset or registry.local_dataset(recorded, None, f"release {name}")
    view = registry.recorded_view(recorded, bundle.metadata.get(registry.VIEW_KEY)
                                  or registry.shape_view(bundle.images.shape[1:]), config.image_size,
                                  config.channels, f"release {name}")
    registry.check_model_input(config.model, bundle.images.shape[-1])
    return bundles, paths, dataset, view


def _finished(metrics_path: Path, settings: dict, final_key: str, eval_split: str, run: StageRun) -> dict:
    """The metrics of this student, trained already (refused if trained with other settings)."""
    metrics = json.loads(metrics_path.read_text())
    require_same_settings(metrics_path, metrics.get("settings", {}), settings)
    if final_key not in metrics:  # a validation student of an earlier version filed it as a test accuracy
        raise DPImgSynError(f"{metrics_path} holds no {final_key} (an earlier version wrote it); delete "
                            f"{metrics_path.parent} to train this student again")
    run.say(f"{metrics_path} already complete (student {eval_split} accuracy {metrics[final_key]:.4f}); nothing to do")
    return metrics


def _student(config: StudentConfig, bundles: list[release_io.ReleaseDataset], run: StageRun,
             bf16: bool) -> tuple[torch.nn.Module, StudentTrainer]:
    """The student network and its trainer on the releases' images (normalized as the teacher saw them) and soft
    labels; the targets are the synthesis aims, not labels."""
    seed_everything(config.seed)
    arrays = [release.tensors() for release in bundles]
    images, soft_labels = (torch.cat([array[index] for array in arrays]) for index in (0, 1))
    labels = torch.cat([release.labels_tensor() for release in bundles])
    mean = torch.tensor(bundles[0].metadata["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bundles[0].metadata["std"]).view(1, -1, 1, 1)
    images = (images - mean) / std
    model = registry.get_model(config.model, soft_labels.shape[1], images.shape[1], images.shape[-1])
    # A fixed front end (scatter_cnn's scattering) runs once per released image, not once per epoch;
    # training the head on its outputs trains ``model``, which is then evaluated and saved whole. The images
    # are DP outputs: their features are kept for every student on them.
    trained, inputs = training_inputs(model, TensorDataset(images, labels), augmented=config.augment,
                                      device=run.device, public=True)
    return model, StudentTrainer(trained, inputs.tensors[0], soft_labels, labels, config, run.device, config.seed,
                                 run.dist, bf16)
