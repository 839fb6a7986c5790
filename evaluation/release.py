"""Evaluation of a release against the private data: utility, obfuscation, fidelity, release card.

This is an *analysis* tool for the data owner. It reads the private training and test images,
so everything it measures is internal: it goes into the card's internal part and the output
folder, never into the release (which is only read). The publishable part of the card repeats
what the release itself already discloses, with its privacy block re-verified against its ledger.

Any other method's release (an ``.npz`` of images and hard labels, :mod:`evaluation.foreign`) gets
the same figures where they can be computed: students trained from scratch on it by this project's
trainer, the obfuscation figures, fidelity in a given teacher's features (else its own student's);
its card says what could not be computed, first of all its privacy ("privacy unknown").
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import privacy
import registry
from common.batches import stack_items
from common.cli import RunOptions, content_settings, option, positive_int
from common.errors import DPImgSynError
from common.files import atomic_path, sha256_file
from common.runtime import resolve_device, say, seed_everything, setup_logging
from evaluation import (PUBLISHABLE_FIELDS, build_card, frechet_distance, gallery_rows, nn_report,
                        obfuscation_verdict, penultimate_features, precision_recall, write_card)
from evaluation.card import JSON_FILE, MARKDOWN_FILE, PRIVATE_VIEW_FIELD, card_path
from evaluation.foreign import ForeignRelease, fit_view, is_foreign, read_foreign
from registry import model_from_checkpoint
from synthesizer import overlap, release as release_io
from training.accuracy import evaluate
from training.distill import PAPER_SEEDS, DistillationConfig, StudentTrainer, hard_label_config

GALLERY_PAIRS_PER_ROW = 4
PRECISION_RECALL_K = 3
SUBSAMPLE_SEED = 0  # which images a capped evaluation uses; fixed so two releases are compared alike
REPRODUCTION_TOLERANCE = 1e-5  # pixel-space match of the regenerated public initialization (k = 0)
GALLERY_FILE = "closest_pairs.png"
NEIGHBOURS_FILE = "nearest_neighbours.npz"
LOG_FILE = "evaluate_release.log"
FOREIGN_PREVIEW_FILE = "release_preview.png"  # a foreign release has no preview: one is drawn from its images
PREVIEW_PER_CLASS = 8
UNKNOWN = "unknown"
INPUTS_FIELD = "inputs_sha256"  # internal: what the figures were computed from (a rerun on the same reuses them)
PRIVACY_UNKNOWN = "privacy unknown"

SUBSETS = ("synthetic", "private_train", "private_test")  # order fixes each subset's random stream
PRIVATE_TEST_REFERENCE = "private test (reference)"
PUBLIC_INIT_REFERENCE = "public init (reference)"


def announce(release: Path, dataset: str) -> str:
    """The first thing the tool says: it reads private data and writes nothing into the release."""
    return (f"evaluate_release reads the PRIVATE training and test data of {dataset!r}: its results are "
            f"internal diagnostics for the data owner, not for publication. {release} is only read.")


def _recorded_teacher(metadata: dict, release: Path) -> Path:
    """Where the teacher the release names (by file name only) is found: beside the release, else in
    ``checkpoints/``; releases of earlier versions recorded a path."""
    name = Path(str(metadata.get("teacher_file", ""))).name
    if not name:
        return Path(str(metadata.get("teacher_path", "")))
    candidates = [release.parent / name, Path("checkpoints") / name]
    return next((path for path in candidates if path.is_file()), candidates[0])


def verified_teacher_path(metadata: dict, release: Path, teacher: str | os.PathLike | None = None) -> Path:
    """The teacher the release was made with: ``teacher`` or the recorded file, checked by sha256."""
    expected = metadata.get("teacher_sha256")
    if not isinstance(expected, str) or not expected:
        raise DPImgSynError(f"{release / release_io.METADATA_FILE} records no teacher_sha256, so its teacher "
                            "cannot be verified; regenerate the release with synthesize.py")
    path = Path(teacher) if teacher is not None else _recorded_teacher(metadata, release)
    origin = "--teacher" if teacher is not None else f"the teacher recorded in {release / release_io.METADATA_FILE}"
    if not path.is_file():
        raise DPImgSynError(f"{origin} ({path}) is not a file; pass --teacher with the checkpoint the release "
                            f"was made with (sha256 {expected})")
    actual = sha256_file(path)
    if actual != expected:
        raise DPImgSynError(f"{origin} ({path}) has sha256 {actual}, but the release was made with a teacher of "
                            f"sha256 {expected}; pass --teacher with the checkpoint synthesize.py used")
    return path


def load_teacher(path: Path, device: torch.device, **expected) -> tuple[torch.nn.Module, dict]:
    """The teacher model in eval mode (weights only) and its checkpoint dict (checked for ``expected``)."""
    checkpoint = privacy.load_dppt(path)
    privacy.check_dppt(checkpoint, **expected)
    return model_from_checkpoint(checkpoint, path).to(device).eval(), checkpoint


def student_results(paths: Sequence[str | os.PathLike], metadata: dict) -> list[dict] | None:
    """One row per ``metrics.json`` (``None`` without any), refusing students of another release."""
    if not paths:
        return None
    runs = []
    for path in map(Path, paths):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DPImgSynError(f"--metrics {path} cannot be read ({exc}); pass a metrics.json of train_student.py")
        if isinstance(metrics, dict) and metrics.get("eval_split", "test") != "test":
            raise DPImgSynError(f"--metrics {path} scores its student on the {metrics['eval_split']} split, but the "
                                "card reports test accuracies; pass the metrics.json of a student trained with "
                                "--eval_split test")
        if not isinstance(metrics, dict) or "student_test_acc" not in metrics:
            raise DPImgSynError(f"--metrics {path} has no student_test_acc; pass a metrics.json of train_student.py")
        trained_on = metrics.get("settings", {}).get("release_sha256")
        if trained_on != metadata.get("files"):
            raise DPImgSynError(f"--metrics {path} belongs to a student trained on another release (its release "
                                "checksums differ); pass the metrics.json of students trained on this release")
        runs.append({"k": metrics.get("k"), "seed": metrics.get("seed"),
                     "model": metrics.get("settings", {}).get("model"),
                     "student_test_acc": float(metrics["student_test_acc"]), "metrics": str(path)})
    return runs


def subsample(total: int, limit: int, stream: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``total`` items, the same ones on every run."""
    if total <= limit:
        return np.arange(total)
    rng = np.random.default_rng([SUBSAMPLE_SEED, stream])
    return np.sort(rng.choice(total, size=limit, replace=False))


def to_pixels(normalized: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Undo the dataset normalization: images in pixel space [0, 1], like released images."""
    return (normalized * std + mean).clamp(0, 1)


def _folder_options(dataset: str, image_shape: Sequence[int], image_size: int | None = None,
                    channels: int | None = None) -> dict:
    """A ``folder:`` dataset's view is the release's image shape; a given size or channel count must agree."""
    return registry.recorded_view(dataset, registry.shape_view(image_shape), image_size, channels, "the release")


@dataclass
class ImageSets:
    """Every image set of one evaluation, in pixel space [0, 1], with the subsets that were used."""

    synthetic: Tensor
    public_init: Tensor | None  # None for a foreign release, which records no public initialization
    private_train: Tensor
    private_test: Tensor
    used: dict[str, np.ndarray]  # indices into the release / the private splits
    totals: dict[str, int]
    mean: Tensor
    std: Tensor
    digests: dict[int, tuple[Tensor, str]] = field(default_factory=dict, init=False, repr=False)

    def digest(self, images: Tensor) -> str:
        """:func:`_content_digest` of one of these tensors, computed once per evaluation (both the neighbour
        search and the features are keyed by it)."""
        kept = self.digests.get(id(images))
        if kept is None or kept[0] is not images:
            kept = self.digests[id(images)] = (images, _content_digest(images))
        return kept[1]

    def normalize(self, batch: Tensor) -> Tensor:
        """Pixel space to the teacher's input space."""
        return (batch - self.mean.to(batch)) / self.std.to(batch)

    def sampling(self) -> dict:
        return {name: {"used": len(self.used[name]), "total": self.totals[name]} for name in SUBSETS}

    def sampling_note(self) -> str | None:
        capped = [name for name in SUBSETS if len(self.used[name]) < self.totals[name]]
        if not capped:
            return None
        return (f"random subsets of {', '.join(capped)} were used (see sampling): nearest-neighbour distances "
                "are to the closest image of the private-train subset, an upper bound on the distance to the "
                "whole set, and fidelity is estimated on the subsets; raise --max_private/--max_synthetic to "
                "use more images")


def load_image_sets(bundle: release_io.ReleaseDataset, dataset: str, public_set: str, data_root, options: dict,
                    max_synthetic: int, max_private: int, sampling_dir: str | None = None) -> ImageSets:
    """Release images, their regenerated public initialization, and the private splits (subsampled).

    The release stores only final images, so the public initialization is rebuilt exactly as
    synthesis built it: the aligned public set in the order of its fixed sampling list.
    """
    sets = private_image_sets(bundle.images, dataset, data_root, options, max_synthetic, max_private)
    public = registry.aligned(public_set, dataset, data_root, **options)
    public_order = registry.sampling_list(public_set, len(bundle), registry.SAMPLING_SEED, len(public), sampling_dir)
    sets.public_init = to_pixels(stack_items(public, public_order[sets.used["synthetic"]]), sets.mean, sets.std)
    return sets


def private_image_sets(synthetic: np.ndarray, dataset: str, data_root, options: dict, max_synthetic: int,
                       max_private: int) -> ImageSets:
    """A fixed subset of the release's images (pixel space, N x C x H x W, an array or memory map) and of both
    private splits.

    Every release, ours or another method's, is compared with the same private images for the same caps.
    """
    image_shape = tuple(synthetic.shape[1:])
    spec = registry.dataset_info(dataset, **options)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    splits = {"private_train": registry.get_split(dataset, "train", data_root, **options),
              "private_test": registry.get_split(dataset, "test", data_root, **options)}
    totals = {"synthetic": len(synthetic), **{name: len(split) for name, split in splits.items()}}
    limits = {"synthetic": max_synthetic, "private_train": max_private, "private_test": max_private}
    used = {name: subsample(totals[name], limits[name], stream) for stream, name in enumerate(SUBSETS)}
    private = {name: to_pixels(stack_items(split, used[name]), mean, std) for name, split in splits.items()}
    if tuple(private["private_train"].shape[1:]) != image_shape:
        raise DPImgSynError(f"{dataset!r} images have shape {tuple(private['private_train'].shape[1:])} but the "
                            f"release's have {image_shape}; pass the --dataset the release was made for")
    return ImageSets(
        synthetic=torch.from_numpy(np.array(synthetic[used["synthetic"]])), public_init=None,
        private_train=private["private_train"], private_test=private["private_test"],
        used=used, totals=totals, mean=mean, std=std)


class _Computed:
    """Figures of image sets already computed in this process, by the sets' content: a pipeline's cards of two
    releases share the private references, and a k = 0 release is its own regenerated public initialization.
    Private-derived values, held in memory only; a few sets, the most recently used."""

    def __init__(self, size: int) -> None:
        self.size, self.kept = size, OrderedDict()

    def get(self, key: tuple, compute: Callable[[], object]) -> object:
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        value = self.kept[key] = compute()
        while len(self.kept) > self.size:
            self.kept.popitem(last=False)
        return value


_COMPUTED = _Computed(size=8)


def _content_digest(images: Tensor) -> str:
    """The sha256 of a tensor's shape, dtype and bytes."""
    digest = hashlib.sha256(repr((tuple(images.shape), str(images.dtype))).encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def obfuscation(sets: ImageSets, k: int | None, k_ssim: int, device: torch.device) -> tuple[dict, dict]:
    """Nearest private training image of the synthetic images and of both references, and the verdict.

    Returns the card section and the synthetic images' per-image report (for the gallery).
    """
    compared = (("synthetic", sets.synthetic), (PRIVATE_TEST_REFERENCE, sets.private_test),
                (PUBLIC_INIT_REFERENCE, sets.public_init))
    private = sets.digest(sets.private_train)
    reports = {name: _COMPUTED.get(("nearest", sets.digest(images), private, k_ssim, str(device)),
                                   lambda images=images: nn_report(images, sets.private_train, k_ssim=k_ssim,
                                                                   device=device))
               for name, images in compared if images is not None}
    section = {
        "verdict": obfuscation_verdict(reports["synthetic"], reports[PRIVATE_TEST_REFERENCE]),
        "l2_to_nearest_private_train": {name: report["summary"]["l2"] for name, report in reports.items()},
        "ssim_to_most_similar_private_train": {name: report["summary"]["ssim"] for name, report in reports.items()},
        "ssim_candidates": reports["synthetic"]["k_ssim"],
    }
    if k == 0 and sets.public_init is not None:
        mismatch = float((sets.public_init - sets.synthetic).abs().max())
        section["public_init_reproduced"] = mismatch <= REPRODUCTION_TOLERANCE
        if mismatch > REPRODUCTION_TOLERANCE:
            logging.getLogger("dpimgsyn").warning(
                "the regenerated public initialization differs from this k = 0 release by up to %.3g: the "
                "public-init reference is not this release's initialization", mismatch)
    return section, reports["synthetic"]


def fidelity(model: torch.nn.Module, sets: ImageSets, device: torch.device, model_sha256: str | None = None) -> dict:
    """Fréchet distance and precision/recall in ``model``'s feature space (the teacher's for our releases),
    each set against private test. ``model_sha256``: the checksum of the file ``model`` was loaded from, so that
    a set's features computed by an earlier card of the same process are reused (None: computed here)."""
    def features(images: Tensor) -> Tensor:
        def compute() -> Tensor:
            return penultimate_features(model, images, device=device, preprocess=sets.normalize)
        if model_sha256 is None:
            return compute()
        return _COMPUTED.get(("features", model_sha256, sets.digest(images), sets.digest(sets.mean),
                              sets.digest(sets.std), str(device)), compute)

    real = features(sets.private_test)
    rows = {}
    for name, images in (("synthetic", sets.synthetic), (PUBLIC_INIT_REFERENCE, sets.public_init),
                         ("private train (reference)", sets.private_train)):
        if images is None:
            continue
        fake = features(images)
        scores = precision_recall(real, fake, k=PRECISION_RECALL_K, device=device)
        rows[name] = {"frechet_distance": frechet_distance(fake, real), "precision": scores["precision"],
                      "recall": scores["recall"], "n": len(images)}
    return rows


def write_diagnostics(output: Path, sets: ImageSets, synthetic_nn: dict, gallery_pairs: int) -> Path:
    """The gallery of the closest pairs and the per-image distances (private images and indices: owner-only
    files, 0600)."""
    rows = gallery_rows(sets.synthetic, sets.private_train, synthetic_nn, n=min(gallery_pairs, len(sets.synthetic)))
    tiles = 2 * GALLERY_PAIRS_PER_ROW
    pairs = rows["pairs"]
    gallery = output / GALLERY_FILE
    release_io.save_image_grid(gallery, [pairs[start:start + tiles] for start in range(0, len(pairs), tiles)],
                               group=2, private=True)
    private_index = sets.used["private_train"]
    with atomic_path(output / NEIGHBOURS_FILE, private=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, release_index=sets.used["synthetic"], l2=synthetic_nn["l2"],
                 private_train_index=private_index[synthetic_nn["l2_index"]], ssim=synthetic_nn["ssim"],
                 ssim_private_train_index=private_index[synthetic_nn["ssim_index"]])
    return gallery


def train_students(images: Tensor, soft_labels: Tensor | None, labels: Tensor, num_classes: int, test_set,
                   recipe: DistillationConfig, model_name: str, seeds: Sequence[int], device: torch.device,
                   progress: bool = True) -> tuple[list[dict], torch.nn.Module]:
    """One student per seed, trained from scratch on the release alone (``images`` in the private normalized space)
    by the student stage's trainer, and its final-epoch accuracy on the whole private test split.

    Without ``soft_labels`` the recipe must train on hard labels (:func:`hard_label_config`). Returns a row per
    seed and the first seed's student (its features stand in for a teacher's when none is given).
    """
    logger = logging.getLogger("dpimgsyn")
    rows, first = [], None
    for seed in seeds:
        seed_everything(seed)
        model = registry.get_model(model_name, num_classes, images.shape[1], images.shape[-1])
        trainer = StudentTrainer(model, images, soft_labels, labels, recipe, device, seed)
        trainer.fit(progress, after_epoch=lambda stats, seed=seed: logger.info(
            "student seed %d: epoch %d/%d, loss %.4f", seed, stats["epoch"], recipe.epochs, stats["loss"]))
        accuracy = evaluate(trainer.model, test_set, device)
        logger.info("student seed %d: private test accuracy %.4f (final epoch)", seed, accuracy)
        rows.append({"seed": seed, "model": model_name, "epochs": recipe.epochs, "student_test_acc": accuracy})
        first = trainer.model if first is None else first
    return rows, first


def accuracy_summary(rows: Sequence[dict]) -> dict:
    """Mean, sample standard deviation (only over two or more seeds) and count of the students' accuracies."""
    values = [row["student_test_acc"] for row in rows]
    spread = {"std": statistics.stdev(values)} if len(values) > 1 else {}
    return {"mean": statistics.fmean(values), **spread, "n": len(values),
            "seeds": " ".join(str(row["seed"]) for row in rows)}


def publishable_part(release: Path, output: Path, metadata: dict, block: dict, dataset: str) -> dict:
    """What the release itself discloses, and nothing else (the card enforces the key list)."""
    return {
        "release": card_path(release, output), "dataset": dataset, "public_set": metadata["public_set"],
        "k": metadata.get("k"),
        "num_images": metadata["counts"]["num_samples"],
        "class_names": metadata.get(release_io.CLASS_NAMES_KEY),  # checked when the release was loaded
        "counts_per_class": {str(label): count for label, count in enumerate(metadata["counts"]["per_class"])},
        "label_target_agreement": metadata["counts"].get("label_target_agreement"),
        "epsilon": block["epsilon"], "delta": block["delta"], "accountant": block["accountant"],
        "ledger": block["ledger"],
        "preview_path": card_path(release / release_io.PREVIEW_FILE, output),
    }


def refuse_private_content(bundle: release_io.ReleaseDataset, dataset: str, public_set: str, options: dict,
                           config: EvaluationConfig) -> None:
    """Before anything is written: neither the release's images nor the public images it was made from (its
    regenerated initialization) may be private images (:mod:`synthesizer.overlap`)."""
    if not overlap.needs_check(dataset, public_set):
        return
    release = Path(config.release)
    overlap.check_release_images(bundle.images, public_set, dataset, config.data_root, options, f"release {release}")
    public = registry.aligned(public_set, dataset, config.data_root, **options)
    order = registry.sampling_list(public_set, len(bundle), registry.SAMPLING_SEED, len(public), config.sampling_dir)
    overlap.check_public_items(public_set, public, order, dataset, config.data_root, options,
                               f"public initialization of release {release}")


def _recipe(config: EvaluationConfig) -> DistillationConfig:
    """The student stage's recipe as the flags give it."""
    return DistillationConfig(**{field.name: getattr(config, field.name) for field in fields(DistillationConfig)})


def _distilled_students(bundle: release_io.ReleaseDataset, dataset: str, options: dict, config: EvaluationConfig,
                        device: torch.device) -> list[dict]:
    """Students of one of our releases, distilled as ``train_student.py`` does (soft labels, the same seeds give
    the same students on the same device and precision)."""
    test_set = registry.get_split(dataset, "test", config.data_root, **options)
    images, soft_labels, _ = bundle.tensors()
    mean = torch.tensor(bundle.metadata["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bundle.metadata["std"]).view(1, -1, 1, 1)
    rows, _ = train_students((images - mean) / std, soft_labels, bundle.labels_tensor(), soft_labels.shape[1],
                             test_set, _recipe(config), config.model, config.seeds, device, config.progress)
    return rows


def foreign_publishable_part(foreign: ForeignRelease, dataset: str, num_classes: int, preview: Path,
                             output: Path) -> dict:
    """What a foreign release discloses: its images, labels and size, nothing about its privacy.

    Every field the card asks for is present; what the file does not record is ``unknown``, and there
    is no ledger (``None``, not an empty one, which would claim that nothing touched private data).
    """
    known = {
        "release": card_path(foreign.path, output), "dataset": registry.artifact_name(dataset), "public_set": UNKNOWN,
        "k": UNKNOWN, "num_images": len(foreign), "class_names": registry.class_names(dataset) or None,
        "counts_per_class": {str(label): count for label, count in enumerate(foreign.counts(num_classes))},
        "epsilon": PRIVACY_UNKNOWN, "delta": UNKNOWN, "accountant": "no", "ledger": None,
        "preview_path": card_path(preview, output),
    }
    return {key: known.get(key) for key in PUBLISHABLE_FIELDS}


def write_preview(output: Path, foreign: ForeignRelease, num_classes: int) -> Path:
    """A preview drawn from the release's own images (the first of each class), as a release of ours has one."""
    rows = [foreign.images[np.flatnonzero(foreign.labels == label)[:PREVIEW_PER_CLASS]]
            for label in range(num_classes) if np.any(foreign.labels == label)]
    path = output / FOREIGN_PREVIEW_FILE
    release_io.save_image_grid(path, rows[:release_io.PREVIEW_MAX_CLASSES])
    return path


def _finite_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(DistillationConfig, registry.FolderViewOptions, registry.SamplingOptions, RunOptions):
    """What to evaluate and how much of it (the figures of a capped evaluation use fixed random subsets).

    The student recipe (epochs, batch size, SGD, augmentation) is the student stage's; a foreign release has
    no soft labels, so its students train on cross-entropy over its labels (alpha 0, beta 1, T unused).
    """

    release: str = option(help="release folder written by synthesize.py, or any method's .npz with images x (float "
                          "N x C x H x W in [0, 1] or uint8 N x H x W x C) and labels y (only read)")
    output: str = option(help="folder for the card and diagnostics (outside the release)")
    metrics: tuple[str, ...] = option((), "metrics.json files of students trained on this release (default: not "
                                      "measured)")
    dataset: str | None = option(None, "private dataset to compare with (default: the release's; required for an "
                                 ".npz release and for a folder: set, which releases record by its folder name only); "
                                 + registry.dataset_choices("private"))
    public_set: str | None = option(None, "the release's public set (default: the one it records; required for a "
                                    "folder: set); " + registry.dataset_choices("public"))
    teacher: str | None = option(None, "teacher .dppt (default: the file the release names, looked for beside the "
                                 "release and in checkpoints/); must match the sha256 recorded in the release. For "
                                 "an .npz release: any teacher of --dataset, whose features measure fidelity "
                                 "(default: the first student's)")
    max_synthetic: int = option(5000, "evaluate at most this many release images, a fixed random subset",
                                parse=positive_int)
    max_private: int = option(5000, "use at most this many private train and test images each, a fixed random "
                              "subset; the card says when it subsampled", parse=positive_int)
    k_ssim: int = option(5, "SSIM is computed on this many L2-nearest candidates", parse=positive_int)
    gallery_pairs: int = option(16, "closest synthetic/private pairs in the gallery", parse=positive_int)
    seeds: tuple[int, ...] = option((), "train one student from scratch on the release per seed and report its "
                                    "private test accuracy (default: the paper's seeds for an .npz release; none for a "
                                    "release folder, whose students come from --metrics)", parse=int)
    model: str = option(registry.DEFAULT_MODEL, "architecture of the students trained for --seeds, "
                        + registry.model_choices())


def evaluate_release(config: EvaluationConfig) -> dict:
    """Evaluate one release; write ``release_card.{md,json}``, the gallery and per-image distances.

    Every check that needs no private data (release checksums, its privacy block, the teacher's
    sha256, the students' metrics) runs before any private image is read. Returns the card, the
    written paths and the obfuscation verdict, for the pipeline's report. An ``.npz`` release is
    another method's (:func:`evaluate_foreign`).
    """
    if is_foreign(config.release):
        return evaluate_foreign(config)
    release, output = Path(config.release), Path(config.output)
    if output.resolve() == release.resolve() or release.resolve() in output.resolve().parents:
        raise DPImgSynError(f"--output {output} is inside the release {release}; the evaluation reads private "
                            "data and must never write into a release: choose a folder outside it")
    bundle = release_io.load(release, verify=True)
    metadata = bundle.metadata
    block = privacy.require_privacy_block(metadata, f"release {release}", allow_non_private=True)
    if not metadata.get("dataset"):
        raise DPImgSynError(f"{release} does not record its private dataset; regenerate it with synthesize.py")
    dataset = config.dataset or registry.local_dataset(metadata["dataset"], None, f"release {release}")
    if not metadata.get("public_set"):
        raise DPImgSynError(f"{release / release_io.METADATA_FILE} records no public_set, so the public "
                            "initialization cannot be regenerated; regenerate the release with synthesize.py")
    public_set = config.public_set or registry.local_dataset(metadata["public_set"], None,
                                                             f"release {release} (public set)")
    teacher_path = verified_teacher_path(metadata, release, config.teacher)
    options = _folder_options(dataset, bundle.images.shape[1:], config.image_size, config.channels)
    refuse_private_content(bundle, dataset, public_set, options, config)
    if config.metrics and config.seeds:
        raise DPImgSynError("pass --metrics (students trained by train_student.py) or --seeds (students trained "
                            "here), not both")
    students = student_results(config.metrics, metadata)
    compute = resolve_device(config.device)

    inputs = _inputs_digest(config, metadata, students, dataset, public_set)
    kept = _kept_card(output, inputs)
    if kept is not None:  # its figures are not computed again
        return _said(kept, kept["card"]["internal"]["obfuscation"]["verdict"], setup_logging(output / LOG_FILE),
                     f"already complete for the same release, teacher, students and settings; delete {output} to "
                     "evaluate again; ")
    print(announce(release, dataset), flush=True)
    logger = setup_logging(output / LOG_FILE)
    logger.info("evaluating %s against the private data of %s (teacher %s)", release, dataset, teacher_path)
    started = time.time()
    model, checkpoint = load_teacher(teacher_path, compute)
    sets = load_image_sets(bundle, dataset, public_set, config.data_root, options, config.max_synthetic,
                           config.max_private, config.sampling_dir)
    obfuscation_section, synthetic_nn = obfuscation(sets, metadata.get("k"), config.k_ssim, compute)
    fidelity_section = fidelity(model, sets, compute, metadata["teacher_sha256"])
    gallery = write_diagnostics(output, sets, synthetic_nn, config.gallery_pairs)
    if config.seeds:
        students = [{"k": metadata.get("k"), **row}
                    for row in _distilled_students(bundle, dataset, options, config, compute)]

    internal = {
        "teacher_test_acc": _finite_or_none(checkpoint.get("test_acc")),
        "student_test_acc": students,
        **({"student_test_acc_summary": accuracy_summary(students)} if config.seeds else {}),
        "obfuscation": obfuscation_section,
        "fidelity": fidelity_section,
        "gallery_path": gallery.name,
        "sampling": sets.sampling(),
        **({"sampling_note": note} if (note := sets.sampling_note()) else {}),
        "teacher": {"path": str(teacher_path), "sha256": metadata["teacher_sha256"]},
        "seconds": time.time() - started,
        INPUTS_FIELD: inputs,
    }
    card = build_card(publishable_part(release, output, metadata, block, metadata["dataset"]), internal)
    return _written(output, card, gallery, obfuscation_section["verdict"], logger)


def _written(output: Path, card: dict, gallery: Path, verdict: dict, logger: logging.Logger, said: str = "") -> dict:
    """Write the card, say where it is with the verdict (after ``said``), and return what the pipeline reads."""
    markdown_path, json_path = write_card(output, card)
    return _said(_result(output, card, markdown_path, json_path, gallery, verdict), verdict, logger, said)


def _result(output: Path, card: dict, markdown_path: Path, json_path: Path, gallery: Path, verdict: dict) -> dict:
    return {"card": card, "card_markdown": markdown_path, "card_json": json_path, "gallery": gallery,
            "neighbours": output / NEIGHBOURS_FILE, "obfuscated": verdict["obfuscated"]}


def _said(result: dict, verdict: dict, logger: logging.Logger, said: str) -> dict:
    """Say where the card is, with its verdict (after ``said``); return ``result``."""
    say(logger, f"release card: {result['card_markdown']} ({said}"
                f"{'obfuscated' if verdict['obfuscated'] else 'NOT OBFUSCATED'}: {verdict['reason']}); "
                f"closest pairs: {result['gallery']}")
    return result


def _inputs_digest(config: EvaluationConfig, metadata: dict, students: list[dict] | None, dataset: str,
                   public_set: str) -> str:
    """What the figures of a card of our release are computed from: the release's files and its teacher (by their
    checksums), the students' results, every setting that makes a figure (not the device or progress bars), the
    sampling lists that rebuild the public initialization, and a ``folder:`` set's files (names, sizes, times)."""
    record = {"settings": content_settings(config), "release_files": metadata["files"],
              "teacher_sha256": metadata["teacher_sha256"], "students": students,
              "sampling_dir": config.sampling_dir,
              "folders": [overlap.folder_signature(name) for name in (dataset, public_set)]}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _kept_card(output: Path, inputs: str) -> dict | None:
    """What an earlier evaluation wrote into ``output`` from the same ``inputs`` (card, gallery, per-image distances),
    or None: the evaluation then runs (a card of an earlier version records no inputs and is computed again)."""
    markdown_path, json_path, gallery = output / MARKDOWN_FILE, output / JSON_FILE, output / GALLERY_FILE
    try:
        card = json.loads(json_path.read_text())
        verdict = card["internal"]["obfuscation"]["verdict"]
        if card["internal"][INPUTS_FIELD] != inputs or not isinstance(verdict["obfuscated"], bool):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(path.is_file() for path in (markdown_path, gallery, output / NEIGHBOURS_FILE)):
        return None
    return _result(output, card, markdown_path, json_path, gallery, verdict)


def _foreign_teacher(path: str, dataset: str, options: dict, device: torch.device
                     ) -> tuple[torch.nn.Module, dict, Path]:
    """A teacher of the private set whose features measure fidelity (nothing ties it to the foreign release)."""
    path = Path(path)
    model, checkpoint = load_teacher(path, device, dataset=registry.artifact_name(dataset), what=f"--teacher {path}")
    view = registry.recorded_view(dataset, checkpoint.get(registry.VIEW_KEY))
    if view != options:
        raise DPImgSynError(f"--teacher {path} sees {dataset} as {_describe(view)} images but the release's are "
                            f"{_describe(options)}; pass a teacher of the release's view")
    return model, checkpoint, path


def _describe(view: dict) -> str:
    return f"{view['image_size']} x {view['image_size']} x {view['channels']}"


def reviewed_private_set(dataset: str, options: dict) -> str | None:
    """What the card says when a foreign release makes the evaluation see a ``folder:`` set in another view than
    its own (the one the teacher stage infers from its files' format); ``None`` when it is seen as it is."""
    if not options:
        return None  # a registry set has one fixed view, and fit_view refuses a release of another size
    own, _ = registry.folder_view(dataset)
    if own == options:
        return None
    return f"private set re-viewed at {_describe(options)} to match the release (its own view: {_describe(own)})"


def _refuse_foreign_options(config: EvaluationConfig, release: Path, output: Path) -> None:
    """Flags that mean something only for a release folder of this project, and an output beside the file."""
    if output.resolve() in (release.resolve(), release.resolve().parent):
        raise DPImgSynError(f"--output {output} is the folder holding the release {release}; the evaluation writes "
                            "figures of private data: choose a folder of their own")
    if not config.dataset:
        raise DPImgSynError(f"an .npz release records no private dataset; pass --dataset with the private set "
                            f"{release.name} is to be compared with")
    if config.metrics:
        raise DPImgSynError("--metrics takes students of this project's release folders; the students of an .npz "
                            "release are trained here (--seeds)")
    if config.public_set:
        raise DPImgSynError("an .npz release records no public initialization to regenerate; drop --public_set")


def _feature_network(teacher: tuple[torch.nn.Module, dict, Path] | None, student: torch.nn.Module, seed: int,
                     model_name: str, dataset: str) -> tuple[torch.nn.Module, dict, dict]:
    """The network whose features measure a foreign release's fidelity, the teacher's checkpoint (``{}`` without
    one), and what the card says of both: the features used and what could not be computed."""
    not_computed = {"privacy": f"{PRIVACY_UNKNOWN}: the release carries no DP ledger, so nothing bounds what it "
                               "reveals about its training data",
                    PUBLIC_INIT_REFERENCE: "the release records no public initialization to compare with"}
    if teacher is not None:
        model, checkpoint, path = teacher
        return model, checkpoint, {
            "fidelity_features": f"penultimate layer of --teacher {path.name}: comparable with the cards of other "
                                 "releases evaluated with the same teacher",
            "not_computed": not_computed}
    not_computed["teacher_test_acc"] = "no --teacher given"
    not_computed["fidelity in a teacher's features"] = (f"no --teacher given; pass a teacher .dppt of {dataset} for "
                                                        "figures comparable across releases")
    return student, {}, {
        "fidelity_features": f"penultimate layer of the student trained on this release (seed {seed}, {model_name}), "
                             "as no --teacher was given: a network fitted to this release's own images, so these "
                             "figures compare this card's rows with each other only, not releases with each other",
        "fidelity_note": "The feature-space Fréchet distance and precision/recall use the penultimate layer of a "
                         "student trained on this release (no --teacher was given), not a DP teacher nor "
                         "Inception-v3: compare this card's rows with each other only, not releases with each other.",
        "not_computed": not_computed}


def evaluate_foreign(config: EvaluationConfig) -> dict:
    """Evaluate another method's ``.npz`` release against a private set: the same card, saying what is unknown.

    Its students train on its hard labels with the student stage's recipe; fidelity uses ``--teacher``'s
    features if given, else the first student's, and the card says which. Every check that needs no private
    data (the file, its shape against the private view, the teacher) runs before any private image is read
    and before anything is written.
    """
    release, output = Path(config.release), Path(config.output)
    _refuse_foreign_options(config, release, output)
    foreign = read_foreign(release)
    dataset = config.dataset
    options = _folder_options(dataset, foreign.image_shape, config.image_size, config.channels)
    spec = registry.dataset_info(dataset, **options)
    if spec.role == "public":
        raise DPImgSynError(f"{dataset!r} is a public set with no private test split; pass the private --dataset")
    images = fit_view(foreign, spec, dataset)
    registry.check_model_input(config.model, spec.image_size)
    reviewed = reviewed_private_set(dataset, options)
    compute = resolve_device(config.device)
    teacher = _foreign_teacher(config.teacher, dataset, options, compute) if config.teacher else None
    seeds = config.seeds or PAPER_SEEDS

    print(announce(release, dataset), flush=True)
    logger = setup_logging(output / LOG_FILE)
    logger.info("evaluating the foreign release %s (%s) against the private data of %s", release, foreign.layout,
                dataset)
    if reviewed:
        say(logger, f"note: {reviewed}")
    started = time.time()
    sets = private_image_sets(images.numpy(), dataset, config.data_root, options, config.max_synthetic,
                              config.max_private)
    obfuscation_section, synthetic_nn = obfuscation(sets, None, config.k_ssim, compute)
    recipe = hard_label_config(_recipe(config))
    test_set = registry.get_split(dataset, "test", config.data_root, **options)
    students, first_student = train_students(sets.normalize(images), None, torch.from_numpy(foreign.labels),
                                             spec.num_classes, test_set, recipe, config.model, seeds, compute,
                                             config.progress)
    feature_model, checkpoint, said = _feature_network(teacher, first_student, seeds[0], config.model, dataset)
    fidelity_section = fidelity(feature_model, sets, compute)
    gallery = write_diagnostics(output, sets, synthetic_nn, config.gallery_pairs)
    preview = write_preview(output, foreign, spec.num_classes)

    internal = {
        "teacher_test_acc": _finite_or_none(checkpoint.get("test_acc")),
        "student_test_acc": students,
        "student_test_acc_summary": accuracy_summary(students),
        "student_recipe": {"labels": "hard: cross-entropy on y (the release has no soft labels)",
                           "model": config.model, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
                           "lr": recipe.lr, "augment": recipe.augment},
        "obfuscation": obfuscation_section,
        "fidelity": fidelity_section,
        **said,
        "gallery_path": gallery.name,
        "sampling": sets.sampling(),
        **({"sampling_note": note} if (note := sets.sampling_note()) else {}),
        "foreign_release": {"file": str(release), "sha256": foreign.sha256, "read_as": foreign.layout},
        **({PRIVATE_VIEW_FIELD: reviewed} if reviewed else {}),
        **({"teacher": {"path": str(teacher[2]), "sha256": sha256_file(teacher[2])}} if teacher else {}),
        "seconds": time.time() - started,
    }
    card = build_card(foreign_publishable_part(foreign, dataset, spec.num_classes, preview, output), internal)
    accuracy = internal["student_test_acc_summary"]
    return _written(output, card, gallery, obfuscation_section["verdict"], logger,
                    f"{PRIVACY_UNKNOWN}; student test accuracy {accuracy['mean']:.4f} over {accuracy['n']} seed(s); ")
