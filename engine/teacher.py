"""Stage 1 orchestration: data, model, calibration, resumable DP-SGD, the teacher `.dppt`."""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import privacy
import registry
from engine import distributed
from engine.artifacts import completed_dppt, require_same_settings, with_suffix_once
from engine.data import default_workers
from engine.dp_sgd import DPSGDConfig, DPSGDTrainer
from engine.evaluation import evaluate
from engine.runtime import atomic_torch_save, rng_state, seed_everything, set_rng_state, setup_logging
from errors import DPImgSynError
from privacy.sampling import private_seed
from privacy.split import split_by_content

# Arguments that determine the teacher's content; a rerun must match them to resume.
# The seed is deliberately absent: whoever knows it can regenerate the noise, so it never
# leaves the local resume file (see private_seed).
CONTENT_SETTINGS = ("dataset", "model", "epochs", "train_batch_size", "lr", "max_norm",
                    "noise_multiplier", "val_split", "delta", "accountant",
                    "grad_sample_mode", "secure_mode", "target_epsilon", "stats_epochs", "stats_batch_size")
# Printed beside every figure that reads private data outside the mechanisms (local terminal and log only).
NON_PRIVATE_NOTE = "[non-private diagnostics: local log only, never in an artifact]"
TEST_ACC_NOTE = "private test split, final epoch; outside the DP guarantee"


def default_output(args: argparse.Namespace) -> Path:
    """The original code's naming: ``checkpoints/<dataset>_<model>_nm_<sigma>_<suffix>_.dppt``."""
    dataset = args.dataset.replace("folder:", "folder_").replace("/", "_")
    return Path("checkpoints") / f"{dataset}_{args.model}_nm_{args.noise_multiplier:g}_{args.suffix}_.dppt"


def pipeline_plan(num_examples: int, args: argparse.Namespace) -> list[tuple[float, int]]:
    """(sample rate, steps) of the whole pipeline's private mechanisms: DP-SGD, then DP statistics."""
    return [privacy.poisson_plan(num_examples, args.train_batch_size, args.epochs),
            privacy.poisson_plan(num_examples, args.stats_batch_size, args.stats_epochs)]


def statistics_plan(num_examples: int, args: argparse.Namespace) -> dict:
    """The planned DP-statistics stage, stored in the teacher: ``save_dp_db_stats.py``'s defaults.

    Public facts only (hyper-parameters, N, the epsilon they compose to), so the teacher can be
    shared with its plan, and stage 2 run by hand meets the budget that stage 1 calibrated for.
    """
    mechanisms = [(args.noise_multiplier, rate, steps) for rate, steps in pipeline_plan(num_examples, args)]
    return {"target_epsilon": args.target_epsilon, "delta": args.delta, "accountant": args.accountant,
            "total_epsilon": privacy.compute_epsilon(mechanisms, args.delta, args.accountant),
            "statistics": {"noise_multiplier": args.noise_multiplier, "epochs": args.stats_epochs,
                           "train_batch_size": args.stats_batch_size}}


def _teacher_entry(args: argparse.Namespace, sample_rate: float, steps: int) -> dict:
    return privacy.mechanism_entry(
        "dp_sgd", args.noise_multiplier, sample_rate, steps, args.max_norm,
        epochs=args.epochs, batch_size=args.train_batch_size, stage="teacher")


def train_teacher(args: argparse.Namespace) -> Path:
    """Run (or resume) stage 1 and return the path of the final `.dppt` (written by rank 0 alone)."""
    dist, device = distributed.setup(args.device)
    seed = private_seed(args.seed, args.secure_mode)  # None in secure mode, which refuses a seed
    if args.val_split < 0 or args.val_split >= 1:
        raise DPImgSynError(f"--val_split must be in [0, 1), got {args.val_split}")
    with dist.main_first():  # one download (--download), shared by all ranks
        num_classes, train_set, test_set = registry.get_dataset(args.dataset, args.data_root, args.download)
    train_set, val_set = split_by_content(train_set, args.val_split)
    num_examples = len(train_set)
    if args.train_batch_size > num_examples:
        raise DPImgSynError(f"--train_batch_size {args.train_batch_size} exceeds the {num_examples} training examples")
    if args.delta >= 1 / num_examples and dist.is_main:
        logging.getLogger("dpimgsyn").warning("delta %.3g >= 1/N = %.3g: a weak guarantee", args.delta, 1 / num_examples)

    if args.target_epsilon is not None:
        args.noise_multiplier = privacy.calibrate_noise_multiplier(
            args.target_epsilon, args.delta, pipeline_plan(num_examples, args), args.accountant)
        if dist.is_main:
            print(f"calibrated noise multiplier {args.noise_multiplier:.4f} for total epsilon "
                  f"{args.target_epsilon} over DP-SGD + DP statistics")

    output = with_suffix_once(args.output or default_output(args), ".dppt")
    settings = {key: getattr(args, key) for key in CONTENT_SETTINGS}
    settings["dataset"] = registry.artifact_name(args.dataset)
    logger = setup_logging(with_suffix_once(output.with_suffix(""), ".log") if dist.is_main else None)
    logger.info("stage 1 (DP-SGD teacher) settings: %s", settings)
    if completed_dppt(output, "settings", settings):
        return output

    # One sampling/noise stream for all ranks; in secure mode the seed only initializes the model.
    init_seed = dist.broadcast_int(private_seed(None) if seed is None else seed)
    seed_everything(init_seed)
    seed = None if seed is None else init_seed
    model = registry.get_model(args.model, num_classes)
    config = DPSGDConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                         max_norm=args.max_norm, noise_multiplier=args.noise_multiplier,
                         max_physical_batch_size=args.max_physical_batch_size,
                         grad_sample_mode=args.grad_sample_mode, secure_mode=args.secure_mode)
    workers = default_workers(device)
    trainer = DPSGDTrainer(model, train_set, config, device, seed, num_workers=workers, dist=dist)
    resume_path = with_suffix_once(output, ".resume")
    history: list[dict] = []
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        require_same_settings(resume_path, state["settings"], settings)
        trainer.load_state_dict(state["trainer"])
        set_rng_state(state["rng"])
        history = list(state["history"])
        if dist.is_main:
            print(f"resuming {output} after epoch {trainer.epoch} ({trainer.steps_done} steps already counted)")

    started = time.time()
    while trainer.epoch < args.epochs:
        stats = trainer.train_epoch(progress=not args.no_progress)
        if not dist.is_main:
            continue  # the other ranks wait for rank 0 at the next step's all-reduce
        stats["test_acc"] = evaluate(trainer.model, test_set, device, num_workers=workers)
        if val_set is not None:
            stats["val_acc"] = evaluate(trainer.model, val_set, device, num_workers=workers)
        stats["epsilon"] = privacy.compute_epsilon(
            [(args.noise_multiplier, trainer.sample_rate, trainer.steps_done)], args.delta, args.accountant)
        stats["epoch"] = trainer.epoch
        history.append(stats)
        validation = f"  val acc {stats['val_acc']:.4f}" if "val_acc" in stats else ""
        line = (f"epoch {trainer.epoch}/{args.epochs}  loss {stats['loss']:.4f}  train acc {stats['train_acc']:.4f}"
                f"{validation}  test acc {stats['test_acc']:.4f}  epsilon {stats['epsilon']:.3f}  {NON_PRIVATE_NOTE}")
        print(line, flush=True)
        logger.info(line)
        atomic_torch_save({"settings": settings, "trainer": trainer.state_dict(), "rng": rng_state(),
                           "history": history}, resume_path)

    if not dist.is_main:
        dist.barrier()  # return once rank 0 has written the teacher
        return output
    ledger = [_teacher_entry(args, trainer.sample_rate, trainer.steps_done)]
    block = privacy.privacy_block(ledger, args.delta, args.accountant)
    final_acc = history[-1]["test_acc"] if history else float("nan")
    # Only DP outputs and public facts: the per-epoch losses and train/validation accuracies read the
    # private data outside the mechanism and stay in the local log.
    payload = privacy.dppt_payload("teacher", trainer.model.state_dict(), args.model, num_classes,
                                   settings["dataset"], block, settings=settings,
                                   plan=statistics_plan(num_examples, args), test_acc=final_acc,
                                   test_acc_note=TEST_ACC_NOTE)
    privacy.save_dppt(output, payload)
    resume_path.unlink(missing_ok=True)
    logger.info("DP-SGD took %.1fs", time.time() - started)
    summary = (f"teacher written to {output}: test accuracy {final_acc:.4f} (final epoch), "
               f"epsilon {block['epsilon']:.3f} at delta {args.delta:g} ({args.accountant})")
    print(summary)
    logger.info(summary)
    dist.barrier()
    return output


def check_finite(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Reject NaN/inf in values that may come from a preset rather than the command line."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
            raise DPImgSynError(f"--{name} must be a positive finite number, got {value!r}")
