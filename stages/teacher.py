"""Stage 1: data, model, calibration, resumable DP-SGD, the teacher `.dppt`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

import privacy
import registry
from common.batches import decode_all, default_workers
from common.cli import RunOptions, content_settings, fraction, option, positive_float, positive_int, probability
from common.errors import DPImgSynError
from common.files import resumed_history, with_suffix_once
from common.runtime import rng_state, seed_everything
from privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from privacy.checkpoint import completed_dppt
from privacy.sampling import private_seed
from privacy.split import split_by_content
from stages.recipe import recipe_argument, with_recipe
from stages.skeleton import StageRun
from synthesizer.release import check_class_names
from training.accuracy import evaluate
from training.dp_sgd import DPSGDConfig, DPSGDTrainer
from training.frontend import scoring_features, training_inputs, whole_model

# Printed beside every figure that reads private data outside the mechanisms (local terminal and log only).
NON_PRIVATE_NOTE = "[non-private diagnostics: local log only, never in an artifact]"
TEST_ACC_NOTE = "private test split, final epoch; outside the DP guarantee"
EVAL_SPLITS = ("test", "validation")
EVAL_SPLIT_HELP = ("where accuracies are measured: 'test' (the private test split), or 'validation' (the val_split "
                   "part of the private training records, to choose hyper-parameters without reading the test split)")
METRICS_COLUMNS = ("epoch", "loss", "train_acc", "val_acc", "test_acc", "epsilon", "scope")
# Above this planned total, a run without --target_epsilon is warned: the paper's largest budget short of ImageNette.
LARGE_EPSILON = 10.0


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(DPSGDConfig, registry.FolderViewOptions, RunOptions):
    """Stage 1's settings; the defaults are the paper's (Table 1's rows are presets of train_dp.py)."""

    dataset: str | None = option(None, f"private dataset, {registry.dataset_choices('private')}")
    model: str = option(registry.DEFAULT_MODEL, f"architecture, {registry.model_choices()}")
    epochs: int = option(14, "eta_train: DP-SGD epochs", parse=positive_int)
    train_batch_size: int = option(128, "Omega_train: expected (logical) Poisson batch size", parse=positive_int)
    lr: float = option(0.01, "gamma_train: SGD learning rate", parse=positive_float)
    max_norm: float = option(1.0, "C: per-sample gradient clipping norm", parse=positive_float)
    noise_multiplier: float = option(0.5, "sigma: noise std / C (ignored with target_epsilon)", parse=positive_float)
    target_epsilon: float | None = option(None, "calibrate sigma so that DP-SGD plus the planned DP statistics "
                                          "stage total this epsilon", parse=positive_float)
    stats_epochs: int = option(2, "eta_bn of the planned DP statistics stage (calibration, and stored as "
                               "save_dp_db_stats.py's default)", parse=positive_int)
    stats_batch_size: int = option(64, "Omega_bn of the planned DP statistics stage (calibration, and stored as "
                                   "save_dp_db_stats.py's default)", parse=positive_int)
    stats_noise_ratio: float = option(1.0, "sigma of the planned DP statistics stage / sigma of DP-SGD; with "
                                      "target_epsilon both are calibrated jointly to meet it (1: the paper's one "
                                      "shared sigma)", parse=positive_float)
    delta: float = option(privacy.DEFAULT_DELTA, "delta of the (epsilon, delta) guarantee", parse=probability)
    accountant: str = option(DEFAULT_ACCOUNTANT, "privacy accountant", choices=tuple(ACCOUNTANTS))
    val_split: float = option(0.0, "expected fraction of the private training records held out for validation; a "
                              "record's side is fixed by a hash of its content, both private stages train on the "
                              "rest, and validation accuracy goes to the local log only (non-private)", parse=fraction)
    eval_split: str = option("test", EVAL_SPLIT_HELP, choices=EVAL_SPLITS)
    recipe: str | None = option(None, "'auto' or a recipe file (configs/recipe_auto.yaml): choose epochs, "
                                "train_batch_size, lr, max_norm, momentum, stats_epochs and stats_batch_size by rules "
                                "of N and target_epsilon (stages/recipe.py); those flags are then refused",
                                parse=recipe_argument)
    seed: int | None = option(None, "seed of sampling and noise (default: fresh OS entropy). Anyone who knows it can "
                              "regenerate the noise: keep a fixed seed secret; it is never stored in artifacts",
                              run_only=True)  # whoever knows it can regenerate the noise (see private_seed)
    suffix: str = option("", "free text in the default output name", run_only=True)
    output: str | None = option(None, "teacher .dppt path (default "
                                "checkpoints/<dataset>_<model>_nm_<sigma>_<suffix>_.dppt)", run_only=True)


def default_output(config: TeacherConfig) -> Path:
    """The original code's naming: ``checkpoints/<dataset>_<model>_nm_<sigma>_<suffix>_.dppt``."""
    dataset = config.dataset.replace("folder:", "folder_").replace("/", "_")
    return Path("checkpoints") / f"{dataset}_{config.model}_nm_{config.noise_multiplier:g}_{config.suffix}_.dppt"


def pipeline_plan(num_examples: int, config: TeacherConfig) -> list[tuple[float, int]]:
    """(sample rate, steps) of the whole pipeline's private mechanisms: DP-SGD, then DP statistics."""
    return [privacy.poisson_plan(num_examples, config.train_batch_size, config.epochs),
            privacy.poisson_plan(num_examples, config.stats_batch_size, config.stats_epochs)]


def statistics_sigma(config: TeacherConfig) -> float:
    """The planned DP statistics stage's sigma: DP-SGD's times the configured ratio."""
    return config.noise_multiplier * config.stats_noise_ratio


def statistics_plan(num_examples: int, config: TeacherConfig) -> dict:
    """The planned DP-statistics stage, stored in the teacher: ``save_dp_db_stats.py``'s defaults.

    Public facts only (hyper-parameters, N, the epsilon they compose to), so the teacher can be
    shared with its plan, and stage 2 run by hand meets the budget that stage 1 calibrated for.
    """
    sigmas = (config.noise_multiplier, statistics_sigma(config))
    mechanisms = [(sigma, rate, steps) for sigma, (rate, steps) in zip(sigmas, pipeline_plan(num_examples, config))]
    return {"target_epsilon": config.target_epsilon, "delta": config.delta, "accountant": config.accountant,
            "total_epsilon": privacy.compute_epsilon(mechanisms, config.delta, config.accountant),
            "statistics": {"noise_multiplier": sigmas[1], "epochs": config.stats_epochs,
                           "train_batch_size": config.stats_batch_size}}


def _teacher_entry(config: TeacherConfig, sample_rate: float, steps: int) -> dict:
    return privacy.mechanism_entry(
        "dp_sgd", config.noise_multiplier, sample_rate, steps, config.max_norm,
        epochs=config.epochs, batch_size=config.train_batch_size, stage="teacher")


class PrivateData(NamedTuple):
    """The private set as stage 1 reads it: its view, spec and class names (public schema), and its splits."""

    view: dict
    spec: registry.DatasetSpec
    num_classes: int
    class_names: list[str] | None
    train: Dataset
    val: Dataset | None
    test: Dataset


def train_teacher(config: TeacherConfig) -> Path:
    """Run (or resume) stage 1 and return the path of the final `.dppt` (written by rank 0 alone)."""
    with StageRun(config.device) as run:
        seed = private_seed(config.seed, config.secure_mode)  # None in secure mode, which refuses a seed
        data = _private_data(config, run)
        num_examples = len(data.train)
        config = with_recipe(config, num_examples, run.is_main)  # its numbers become the config's, recorded below
        config = _calibrated(config, num_examples, run)
        output = with_suffix_once(config.output or default_output(config), ".dppt")
        # What makes the teacher what it is (a rerun must match it to resume); a folder: set by its folder name and
        # the view it is seen in (image_size and channels; nothing for registry sets).
        settings = {**content_settings(config), "dataset": registry.artifact_name(config.dataset), **data.view}
        run.open_log(with_suffix_once(output.with_suffix(""), ".log"), "stage 1 (DP-SGD teacher)", settings,
                     with_suffix_once(output, ".resume"))
        if completed_dppt(output, "settings", settings):
            return output
        plan = statistics_plan(num_examples, config)  # stored in the teacher; without a target, said before training
        if config.target_epsilon is None:
            _say_plan(plan, config, run)
        # One sampling/noise stream for all ranks; in secure mode the seed only initializes the model.
        init_seed = run.dist.broadcast_int(private_seed(None) if seed is None else seed)
        seed_everything(init_seed)
        model = registry.get_model(config.model, data.num_classes, data.spec.channels, data.spec.image_size)
        # A fixed front end (scatter_cnn's scattering) runs once per example, not once per epoch: the same
        # per-example gradients, so the same mechanism over the same N records (training_inputs says which).
        trained, inputs = training_inputs(model, data.train, augmented=config.augmult > 0, device=run.device)
        trainer = DPSGDTrainer(trained, inputs, config, run.device, None if seed is None else init_seed,
                               num_workers=default_workers(run.device), dist=run.dist)
        history = resumed_history(run.resume_file, settings, trainer)
        if history:
            run.say(f"resuming {output} after epoch {trainer.epoch} ({trainer.steps_done} steps already counted)")
        released = _train(trainer, model, trained, data, history, config, run,
                          with_suffix_once(output.with_suffix(""), ".metrics.csv"))  # beside the log: local only
        if not run.is_main:
            return output
        block = privacy.privacy_block([_teacher_entry(config, trainer.sample_rate, trainer.steps_done)],
                                      config.delta, config.accountant)
        final_acc = history[-1]["test_acc" if config.eval_split == "test" else "val_acc"] if history else float("nan")
        # Only DP outputs and public facts: the per-epoch losses and train/validation accuracies read the
        # private data outside the mechanism and stay in the local log. The test-split accuracy may be
        # shared, labelled; with eval_split validation the test split was not read (NaN).
        privacy.save_dppt(output, privacy.dppt_payload(
            "teacher", released.state_dict(), config.model, data.num_classes, settings["dataset"], block,
            settings=settings, plan=plan, test_acc=final_acc if config.eval_split == "test" else float("nan"),
            test_acc_note=TEST_ACC_NOTE, **({registry.VIEW_KEY: data.view} if data.view else {}),
            **({registry.CLASS_NAMES_KEY: data.class_names} if data.class_names else {})))
        run.finish(f"teacher written to {output}: {config.eval_split} accuracy {final_acc:.4f} (final epoch), "
                   f"epsilon {block['epsilon']:.3f} at delta {config.delta:g} ({config.accountant})")
        return output


def _private_data(config: TeacherConfig, run: StageRun) -> PrivateData:
    """The private set, checked before anything is written; the training split is what both private stages read."""
    # The view of a folder: set (given, or inferred from its files' format): recorded, so later stages reuse it.
    view, note = registry.folder_view(config.dataset, config.image_size, config.channels)
    spec = registry.dataset_info(config.dataset, **view)
    registry.check_model_input(config.model, spec.image_size)
    if note:
        run.say(note)
    with run.dist.main_first():  # one download (--download), shared by all ranks
        num_classes, train_set, test_set = registry.get_dataset(config.dataset, config.data_root, config.download,
                                                                **view)
    if config.dataset.startswith(registry.FOLDER_PREFIX):  # a user's files, unlike the registry's fixed sets:
        for images in (train_set, test_set):  # an unreadable one stops the run here, before anything is written
            decode_all(images, default_workers(run.device))
    if config.eval_split == "validation" and not config.val_split:
        raise DPImgSynError("--eval_split validation needs a validation part: give --val_split (e.g. 0.1)")
    # Public schema like N (a folder: set's class folder names): recorded so that releases and exports name
    # their classes; a set without names records none.
    class_names = check_class_names(registry.class_names(config.dataset) or None, num_classes,
                                    f"dataset {registry.artifact_name(config.dataset)}",
                                    "rename its class folders in train/")
    train_set, val_set = split_by_content(train_set, config.val_split)
    return PrivateData(view, spec, num_classes, class_names, train_set, val_set, test_set)


def _calibrated(config: TeacherConfig, num_examples: int, run: StageRun) -> TeacherConfig:
    """The config with DP-SGD's sigma calibrated to the target epsilon (when given), once the plan is checked."""
    if config.train_batch_size > num_examples:
        raise DPImgSynError(f"--train_batch_size {config.train_batch_size} exceeds the {num_examples} training "
                            "examples")
    if config.delta >= 1 / num_examples and run.is_main:
        logging.getLogger("dpimgsyn").warning("delta %.3g >= 1/N = %.3g: a weak guarantee", config.delta,
                                              1 / num_examples)
    if config.target_epsilon is None:
        return config
    sigmas = privacy.calibrate_noise_multiplier(config.target_epsilon, config.delta,
                                                pipeline_plan(num_examples, config), config.accountant,
                                                ratios=[1.0, config.stats_noise_ratio])
    config = replace(config, noise_multiplier=sigmas[0])
    statistics = "" if config.stats_noise_ratio == 1 else f" (DP statistics: {statistics_sigma(config):.4f})"
    run.say(f"calibrated noise multiplier {config.noise_multiplier:.4f}{statistics} for total epsilon "
            f"{config.target_epsilon} over DP-SGD + DP statistics")
    return config


def _say_plan(plan: dict, config: TeacherConfig, run: StageRun) -> None:
    """Without a target epsilon, the total that the given sigma spends, said before training (warned when large)."""
    run.say(f"noise multiplier {config.noise_multiplier:g} (no --target_epsilon): planned total epsilon "
            f"{plan['total_epsilon']:.3g} over DP-SGD + DP statistics at delta {config.delta:g}")
    if plan["total_epsilon"] > LARGE_EPSILON and run.is_main:
        run.logger.warning("planned total epsilon %.3g exceeds %g, the paper's largest budget short of ImageNette: "
                           "a weak guarantee; give --target_epsilon to calibrate the noise to a budget",
                           plan["total_epsilon"], LARGE_EPSILON)


def _train(trainer: DPSGDTrainer, model: torch.nn.Module, trained: torch.nn.Module, data: PrivateData,
           history: list[dict], config: TeacherConfig, run: StageRun, metrics_path: Path) -> torch.nn.Module:
    """DP-SGD's remaining epochs, each scored by rank 0 (non-private diagnostics: local log and metrics only) and
    saved for resumption; returns what DP-SGD outputs (the averaged weights with ema_decay), as the whole network."""
    def released() -> torch.nn.Module:
        return trainer.released_model if trained is model else whole_model(model, trainer.released_model)

    scored = {"test_acc": data.test} if config.eval_split == "test" else {}
    if data.val is not None:
        scored["val_acc"] = data.val
    # The front end's outputs for the scored sets, computed once (None: the network scores the images).
    features = {key: scoring_features(model, trained, dataset, run.device)
                for key, dataset in scored.items() if run.is_main}

    def score(key: str) -> float:
        if features.get(key) is not None:
            return evaluate(trainer.released_model, features[key], run.device)
        return evaluate(released(), scored[key], run.device, num_workers=default_workers(run.device))

    while trainer.epoch < config.epochs:
        stats = trainer.train_epoch(progress=config.progress)
        if not run.is_main:
            continue  # the other ranks wait for rank 0 at the next step's all-reduce
        stats.update({key: score(key) for key in scored})
        stats["epsilon"] = privacy.compute_epsilon(
            [(config.noise_multiplier, trainer.sample_rate, trainer.steps_done)], config.delta, config.accountant)
        stats["epoch"] = trainer.epoch
        history.append(stats)
        scores = "".join(f"  {name} acc {stats[key]:.4f}" for key, name in (("val_acc", "val"), ("test_acc", "test"))
                         if key in stats)
        run.say(f"epoch {trainer.epoch}/{config.epochs}  loss {stats['loss']:.4f}  train acc "
                f"{stats['train_acc']:.4f}{scores}  epsilon {stats['epsilon']:.3f}  {NON_PRIVATE_NOTE}")
        run.write_metrics(metrics_path, history, METRICS_COLUMNS, scope=NON_PRIVATE_NOTE)
        run.save_state(trainer=trainer.state_dict(), rng=rng_state(), history=history)
    return released()
