"""Stage 2 orchestration: DP normalization statistics of a DP teacher -> the statistics `.dppt`."""
from __future__ import annotations

import argparse
import statistics as pystats
import time
from pathlib import Path

import torch

import privacy
import registry
from engine import distributed
from engine.artifacts import completed_dppt, model_from_checkpoint, require_same_settings, with_suffix_once
from engine.data import default_workers, stack_items
from engine.fetch import resolve_checkpoint
from engine.runtime import atomic_torch_save, setup_logging
from privacy.sampling import private_seed
from privacy.split import split_by_content
from synthesizer.dp_stats import compute_dp_statistics, public_clip_norm, public_scales, relative_errors
from synthesizer.stat_norm import attach_stat_layers

# No seed here: it determines the noise and stays out of every artifact (see private_seed).
PUBLIC_SCALE_IMAGES = 2000  # public images for pre-scaling and the public clipping norm

CONTENT_SETTINGS = ("teacher_sha256", "dataset", "epochs", "train_batch_size", "max_norm", "noise_multiplier",
                    "public_set", "clip_quantile", "non_private", "secure_mode")
# The mechanism's settings when the teacher records no plan (imported or older teachers): Table 1's
# most common statistics row and the paper's shared sigma.
# Keys of teachers written by earlier versions that held exact, non-private numbers (per-epoch losses and
# accuracies) or local paths: never copied into a statistics checkpoint.
NOT_SHAREABLE_KEYS = ("history", "args")
PLAN_KEYS = ("noise_multiplier", "epochs", "train_batch_size")
UNPLANNED_DEFAULTS = {"noise_multiplier": 0.5, "epochs": 2, "train_batch_size": 64}


def load_teacher(path: str | Path, non_private: bool) -> tuple[dict, dict]:
    """A stage-1 checkpoint and its privacy block; refuses ledger-less or other-stage files."""
    checkpoint = privacy.load_dppt(path)
    block = privacy.require_privacy_block(checkpoint, f"teacher checkpoint {path}", allow_non_private=non_private)
    privacy.check_dppt(checkpoint, stage="teacher")
    return checkpoint, block


def apply_plan(args: argparse.Namespace, checkpoint: dict) -> dict | None:
    """Fill the mechanism flags left unset from the teacher's plan (else the unplanned defaults).

    Returns the plan (``None`` for a teacher without one), so the caller can compare the result.
    """
    plan = checkpoint.get("plan")
    planned = plan["statistics"] if isinstance(plan, dict) else UNPLANNED_DEFAULTS
    for key in PLAN_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, planned[key])
    return plan if isinstance(plan, dict) else None


def plan_report(plan: dict | None, args: argparse.Namespace, total_epsilon: float) -> str | None:
    """Why the total epsilon differs from what stage 1 planned (``None`` when the run follows the plan)."""
    if plan is None:
        return ("the teacher records no plan for this stage (imported or older checkpoint): "
                f"total epsilon {total_epsilon:.3f}")
    deviations = [f"--{key} {getattr(args, key):g} instead of the planned {plan['statistics'][key]:g}"
                  for key in PLAN_KEYS if getattr(args, key) != plan["statistics"][key]]
    if not deviations:
        return None
    target = plan.get("target_epsilon")
    wanted = f"target {target:g}" if target is not None else f"planned {plan['total_epsilon']:.3f}"
    return f"total epsilon {total_epsilon:.3f} differs from stage 1's {wanted}: " + "; ".join(deviations)


def capture_statistics(args: argparse.Namespace) -> Path:
    """Run (or resume) stage 2; return the path of the statistics `.dppt` (written by rank 0 alone)."""
    dist, device = distributed.setup(args.device)
    seed = private_seed(args.seed, args.secure_mode)  # None in secure mode, which refuses a seed
    with dist.main_first():  # a URL is downloaded once
        args.teacher = resolve_checkpoint(args.teacher, args.sha256, progress=not args.no_progress)
    checkpoint, block = load_teacher(args.teacher, args.non_private)
    dataset = registry.local_dataset(checkpoint["dataset"], args.dataset, f"teacher {args.teacher}")
    plan = apply_plan(args, checkpoint)
    output = with_suffix_once(args.output, ".dppt")
    settings = {"teacher_sha256": privacy.file_sha256(args.teacher), **{
        key: getattr(args, key) for key in CONTENT_SETTINGS if key != "teacher_sha256"},
        "dataset": checkpoint["dataset"],
        "public_set": args.public_set and registry.artifact_name(args.public_set)}
    logger = setup_logging(with_suffix_once(output.with_suffix(""), ".log") if dist.is_main else None)
    logger.info("stage 2 (DP statistics) settings: %s", settings)
    if completed_dppt(output, "statistics_settings", settings):
        return output

    model = model_from_checkpoint(checkpoint, args.teacher).to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    attach_stat_layers(model)
    scales, max_norm = None, args.max_norm
    if args.public_set:
        with dist.main_first():
            public = registry.aligned(args.public_set, dataset, args.data_root, args.download)
        chosen = registry.sampling_list(args.public_set, min(PUBLIC_SCALE_IMAGES, len(public)), 0, len(public))
        public = stack_items(public, chosen)
        scales = public_scales(model, public, device=device)
        if args.clip_quantile is not None:
            max_norm = public_clip_norm(model, public, scales, quantile=args.clip_quantile, device=device)
            if dist.is_main:
                print(f"clipping norm {max_norm:.4g} from the public set ({args.clip_quantile:g} quantile)")
    with dist.main_first():
        _, train_set, _ = registry.get_dataset(dataset, args.data_root, args.download)
    # Exactly the records stage 1 trained on: the same content-keyed split (see privacy.split).
    train_set, _ = split_by_content(train_set, checkpoint.get("settings", {}).get("val_split", 0.0))

    resume_path = with_suffix_once(output, ".resume")
    state = None
    if resume_path.exists():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        require_same_settings(resume_path, saved["settings"], settings)
        state = saved["state"]
        if dist.is_main:
            print(f"resuming DP statistics at step {state['step']}")

    def checkpoint_fn(loop_state: dict) -> None:
        if dist.is_main:
            atomic_torch_save({"settings": settings, "state": loop_state}, resume_path)

    started = time.time()
    result = compute_dp_statistics(
        model, train_set, epochs=args.epochs, batch_size=args.train_batch_size, max_norm=max_norm,
        noise_multiplier=args.noise_multiplier, seed=None if seed is None else dist.broadcast_int(seed),
        secure_mode=args.secure_mode, device=device, scales=scales, non_private=args.non_private,
        progress=not args.no_progress, state=state,
        checkpoint_fn=checkpoint_fn, num_workers=default_workers(device), dist=dist)
    if not dist.is_main:
        dist.barrier()  # return once rank 0 has written the statistics
        return output
    mechanism = dict(result.mechanism)
    entry = (privacy.non_private_entry(mechanism.pop("name"), stage="statistics") if mechanism.get("non_private")
             else privacy.mechanism_entry(mechanism.pop("name"), mechanism.pop("noise_multiplier"),
                                          mechanism.pop("sample_rate"), mechanism.pop("steps"),
                                          mechanism.pop("max_norm"), stage="statistics",
                                          epochs=args.epochs, batch_size=args.train_batch_size, **mechanism))
    new_block = privacy.privacy_block(list(block["ledger"]) + [entry], block["delta"], block["accountant"])
    kept = {key: value for key, value in checkpoint.items() if key not in NOT_SHAREABLE_KEYS}
    payload = {**kept, "stage": "statistics", "dp_statistics": result.stats, "privacy": new_block,
               "statistics_settings": settings}
    privacy.save_dppt(output, payload)
    resume_path.unlink(missing_ok=True)
    logger.info("DP statistics took %.1fs", time.time() - started)
    summary = (f"DP statistics written to {output}: total epsilon {new_block['epsilon']:.3f} at delta "
               f"{new_block['delta']:g} (teacher + statistics, {new_block['accountant']}); "
               f"teacher test accuracy {checkpoint.get('test_acc', float('nan')):.4f}")
    print(summary)
    logger.info(summary)
    deviation = None if args.non_private else plan_report(plan, args, new_block["epsilon"])
    if deviation:
        print(f"note: {deviation}")
        logger.info("note: %s", deviation)
    if args.report_bias:
        report_bias(model, train_set, result.stats, device, logger, not args.no_progress)
    dist.barrier()
    return output


def report_bias(model, train_set, dp_stats: dict, device, logger, progress: bool) -> None:
    """Local diagnostic: relative L2 error of the DP statistics against the exact ones.

    It re-reads the private training set without any privacy protection, so its figures go to
    the terminal and the local log only, never into an artifact or a release.
    """
    print("--report_bias: re-reading the private training set for a NON-PRIVATE diagnostic (do not publish)")
    exact = compute_dp_statistics(model, train_set, epochs=1, batch_size=1, max_norm=1.0, noise_multiplier=1.0,
                                  seed=0, device=device, non_private=True, progress=progress).stats
    errors = relative_errors(dp_stats, exact)
    for key in ("mean", "var"):
        values = [layer[key] for layer in errors.values()]
        line = (f"clipping+noise error of DP {key}s (relative L2 per layer): median {pystats.median(values):.3f}, "
                f"max {max(values):.3f} over {len(values)} layers [non-private diagnostic]")
        print(line)
        logger.info(line)
