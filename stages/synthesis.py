"""Stage 3 orchestration: teacher + DP statistics + public images -> a release bundle.

The private set is known through `registry.recorded_spec` (its public shape and normalization
constants) and through the DP artifacts. Its images are read for one check only, when either set is
a ``folder:`` set: no public image may be a private one (:mod:`synthesizer.overlap`), refused before
anything is written; nothing of the private images enters the release.

Under torchrun, rank r synthesizes the shards whose index is r modulo the number of ranks; every
shard draws from its own seeded generator, so the merged release equals a single-process one.
Rank 0 assembles it once every rank has written its shards.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from tqdm import tqdm

import privacy
import registry
from common.batches import stack_items
from common.cli import RunOptions, content_settings, nonnegative_int, option, positive_int
from common.errors import DPImgSynError
from common.files import sha256_file
from common.precision import PRECISION_HELP, PRECISIONS, use_bf16
from common.runtime import keyed_generator
from registry import model_from_checkpoint
from stages.fetch import resolve_checkpoint
from stages.skeleton import StageRun
from synthesizer import overlap
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.release import ReleaseWriter, check_class_names, is_complete
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, set_mode


@dataclass(frozen=True, kw_only=True)
class SynthesisConfig(AlignmentConfig, registry.FolderViewOptions, registry.SamplingOptions, RunOptions):
    """Stage 3's settings; the defaults are the paper's."""

    # The teacher is recorded by its sha256 (it names the private set), the local private set is read for the
    # overlap check only, and the precision by whether it computes in bf16.
    teacher: str = option(help="stage-2 .dppt (teacher with DP statistics): a local path or an http(s)/file URL, "
                          "downloaded to checkpoints/pretrained_DP_models/", run_only=True)
    sha256: str | None = option(None, "expected SHA-256 of --teacher (required for a URL without a known digest)",
                                run_only=True)
    public_set: str = option(help=f"public dataset, {registry.dataset_choices('public')}")
    dataset: str | None = option(None, "the teacher's private dataset on this machine (default: the teacher's; "
                                 "required for a folder: set, which artifacts record by its folder name only): "
                                 "when either set is a folder: set, the public images are compared with the "
                                 "private ones by content and refused if any is a private image; "
                                 + registry.dataset_choices("private"), run_only=True)
    num_samples: int = option(60000, "number of images to release", parse=positive_int)
    k: int = option(1, "optimization steps per batch (0 = public images as they are)", parse=nonnegative_int,
                    aliases=("g_steps",))
    batch_size: int = option(80, "images optimized together (paper: 80)", parse=positive_int)
    batches_per_shard: int = option(25, "batches per resumable shard", parse=positive_int)
    targets: str = option("cyclic", "cyclic: classes 0..C-1 repeated (paper); teacher: the teacher's prediction "
                          "on the public image", choices=("cyclic", "teacher"))
    non_private: bool = option(False, "ablation only: accept a teacher without DP statistics or ledger "
                               "(epsilon = inf)")
    seed: int = option(0, "seed of the jitter/flip draws (per shard)")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS, run_only=True)
    output: str = option(help="release folder to create (or resume)", run_only=True)


def load_teacher_for_synthesis(path: str | Path, non_private: bool, device: torch.device):
    """The stage-2 teacher with its stat layers in synthesis mode, and its checkpoint dict."""
    checkpoint = privacy.load_dppt(path)
    block = privacy.require_privacy_block(checkpoint, f"teacher checkpoint {path}", allow_non_private=non_private)
    privacy.check_dppt(checkpoint)
    if not non_private and (checkpoint.get("stage") != "statistics" or "dp_statistics" not in checkpoint):
        raise DPImgSynError(f"{path} is a stage-{checkpoint.get('stage', '?')} checkpoint without DP statistics; "
                            "run save_dp_db_stats.py on it first")
    model = model_from_checkpoint(checkpoint, path)
    attach_stat_layers(model)
    if "dp_statistics" in checkpoint:
        load_dp_statistics(model, checkpoint["dp_statistics"])
        set_mode(model, "synthesis")
    model.to(device).eval().requires_grad_(False)
    return model, checkpoint, block


def synthesize(config: SynthesisConfig) -> Path:
    """Run (or resume) stage 3 and return the release folder."""
    with StageRun(config.device) as run:
        output = Path(config.output)
        with run.dist.main_first():  # a URL is downloaded once
            config = replace(config, teacher=str(resolve_checkpoint(config.teacher, config.sha256,
                                                                      progress=config.progress)))
        teacher, checkpoint, block = load_teacher_for_synthesis(config.teacher, config.non_private, run.device)
        if config.k > 0 and "dp_statistics" not in checkpoint:
            raise DPImgSynError(f"--k {config.k} matches statistics, but {config.teacher} holds none; "
                                "run save_dp_db_stats.py (or --k 0)")
        view = registry.recorded_view(checkpoint["dataset"], checkpoint.get(registry.VIEW_KEY), config.image_size,
                                      config.channels, f"teacher {config.teacher}")
        spec = registry.recorded_spec(checkpoint["dataset"], checkpoint["num_classes"], view)
        class_names = check_class_names(checkpoint.get(registry.CLASS_NAMES_KEY), checkpoint["num_classes"],
                                        f"teacher {config.teacher}", "re-create it")
        public, indices = _public_images(config, checkpoint["dataset"], spec, view, run)
        # The list is found by its file name in --sampling_dir (run-only), so its content is what identifies it.
        settings = {"teacher_sha256": sha256_file(config.teacher), **content_settings(config),
                    "public_set": registry.artifact_name(config.public_set),
                    "sampling_sha256": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest(),
                    "bf16": use_bf16(config.precision, run.device)}
        with run.dist.main_first():  # rank 0 records the settings (or refuses the folder) first
            writer = ReleaseWriter(output, num_samples=config.num_samples,
                                   shard_size=config.batch_size * config.batches_per_shard,
                                   image_shape=(spec.channels, spec.image_size, spec.image_size),
                                   num_classes=checkpoint["num_classes"], settings=settings)
        run.open_log(output.parent / f"{output.name}.log", "stage 3 (synthesis)", settings)
        if is_complete(output):  # the writer has checked that it was made with these settings
            if run.is_main:
                writer.remove_shards()
            run.say(f"{output} already complete ({config.num_samples} images, k={config.k}, "
                    f"epsilon {block['epsilon']:.3f}); nothing to do")
            return output
        pending = [shard for shard in writer.pending_shards() if run.dist.owns(shard)]
        bar = tqdm(total=sum(stop - start for start, stop in map(writer.shard_range, pending)), unit="img",
                   desc=f"synthesis k={config.k}", disable=not (config.progress and run.is_main), dynamic_ncols=True)
        loss_rows: list[dict] = []  # the last step's loss terms of every batch this process optimized
        for shard in pending:
            loss_rows += _write_shard(writer, shard, teacher, public, indices, config, spec, settings["bf16"],
                                      run.device, bar)
        bar.close()
        if loss_rows:  # beside the release's log, never inside the release
            run.write_metrics(output.parent / f"{output.name}.metrics.csv", loss_rows)
        run.dist.barrier()  # every rank's shards are on disk
        if run.is_main:
            writer.finalize({
                "privacy": block, "dataset": checkpoint["dataset"], "mean": list(spec.mean), "std": list(spec.std),
                "public_set": settings["public_set"], "sampling_list": registry.sampling_list_path(
                    config.public_set, config.num_samples, registry.SAMPLING_SEED).name,
                "k": config.k, "settings": settings,
                **({registry.VIEW_KEY: view} if view else {}),
                **({registry.CLASS_NAMES_KEY: class_names} if class_names else {}),
                "teacher_file": Path(config.teacher).name, "teacher_sha256": settings["teacher_sha256"],
                "teacher_architecture": checkpoint["architecture"], "num_classes": checkpoint["num_classes"],
                "software": {"python": platform.python_version(), "torch": torch.__version__,
                             "opacus": opacus.__version__, "numpy": np.__version__}})
            run.finish(f"release written to {output} ({config.num_samples} images, k={config.k}, "
                       f"epsilon {block['epsilon']:.3f}); preview: {output / 'preview.png'}")
        return output


def _public_images(config: SynthesisConfig, private_name: str, spec: registry.DatasetSpec, view: dict,
                   run: StageRun) -> tuple[Any, np.ndarray]:
    """The public set in the private view and the indices of the images to release, refused if any is private."""
    with run.dist.main_first():
        public = registry.aligned(config.public_set, spec, config.data_root, config.download)
    indices = registry.sampling_list(config.public_set, config.num_samples, registry.SAMPLING_SEED, len(public),
                                     config.sampling_dir)
    if config.dataset is not None or overlap.needs_check(private_name, config.public_set):
        local = registry.local_dataset(private_name, config.dataset, f"teacher {config.teacher}")
        overlap.check_public_items(config.public_set, public, indices, local, config.data_root, view,
                                   f"public set {config.public_set}")
    return public, indices


def _write_shard(writer: ReleaseWriter, shard: int, teacher: torch.nn.Module, public: Any, indices: np.ndarray,
                 config: SynthesisConfig, spec: registry.DatasetSpec, bf16: bool, device: torch.device,
                 bar: tqdm) -> list[dict]:
    """Align one shard's public images batch by batch and write it; the last step's loss terms of each batch."""
    mean, std = torch.tensor(spec.mean).view(-1, 1, 1), torch.tensor(spec.std).view(-1, 1, 1)
    low, high = ((0 - mean) / std).flatten().to(device), ((1 - mean) / std).flatten().to(device)
    start, stop = writer.shard_range(shard)
    generator = keyed_generator(config.seed, shard)  # any shard is redone alone, identically
    parts: dict[str, list[torch.Tensor]] = {"images": [], "initial": [], "logits": [], "targets": []}
    loss_rows = []
    for batch_start in range(start, stop, config.batch_size):
        batch_stop = min(batch_start + config.batch_size, stop)
        x0 = stack_items(public, indices[batch_start:batch_stop]).to(device)
        if config.targets == "teacher":
            with torch.no_grad():
                targets = teacher(x0).argmax(1)
        else:
            targets = cyclic_targets(batch_start, batch_stop, writer.num_classes).to(device)
        result = optimize_batch(teacher, x0, targets, config.k, config, low, high, generator,
                                grayscale=spec.grayscale, bf16=bf16)
        parts["images"].append((result.images * std.to(device) + mean.to(device)).clamp(0, 1).cpu())
        parts["initial"].append((x0 * std.to(device) + mean.to(device)).clamp(0, 1).cpu())
        parts["logits"].append(result.logits.float().cpu())
        parts["targets"].append(targets.cpu())
        bar.update(batch_stop - batch_start)
        bar.set_postfix({name: f"{value:.3g}" for name, value in result.losses.items()})
        loss_rows.append({"shard": shard, "first_image": batch_start, **result.losses})
    writer.write_shard(shard, images=torch.cat(parts["images"]).numpy(),
                       soft_labels=torch.cat(parts["logits"]).numpy(),
                       targets=torch.cat(parts["targets"]).numpy().astype(np.int64),
                       initial_images=torch.cat(parts["initial"]).numpy())
    return loss_rows

