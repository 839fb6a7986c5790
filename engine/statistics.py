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
from errors import DPImgSynError
from privacy.sampling import private_seed
from synthesizer.dp_stats import compute_dp_statistics, public_clip_norm, public_scales, relative_errors
from synthesizer.stat_norm import attach_stat_layers

# No seed here: it determines the noise and stays out of every artifact (see private_seed).
PUBLIC_SCALE_IMAGES = 2000  # public images for pre-scaling and the public clipping norm

CONTENT_SETTINGS = ("teacher_sha256", "dataset", "epochs", "train_batch_size", "max_norm", "noise_multiplier",
                    "public_set", "clip_quantile", "non_private")


def load_teacher(path: str | Path, dataset: str | None, non_private: bool) -> tuple[dict, dict]:
    """A stage-1 checkpoint and its privacy block; refuses ledger-less or mismatching files."""
    checkpoint = privacy.load_dppt(path)
    block = privacy.require_privacy_block(checkpoint, f"teacher checkpoint {path}", allow_non_private=non_private)
    privacy.check_dppt(checkpoint, stage="teacher")
    if dataset is not None and dataset != checkpoint["dataset"]:
        raise DPImgSynError(f"{path} is a teacher for dataset {checkpoint['dataset']!r}, not {dataset!r}; "
                            f"drop --dataset, or pass a teacher trained on {dataset!r}")
    return checkpoint, block


def capture_statistics(args: argparse.Namespace) -> Path:
    """Run (or resume) stage 2; return the path of the statistics `.dppt` (written by rank 0 alone)."""
    dist, device = distributed.setup(args.device)
    with dist.main_first():  # a URL is downloaded once
        args.teacher = resolve_checkpoint(args.teacher, args.sha256, progress=not args.no_progress)
    checkpoint, block = load_teacher(args.teacher, args.dataset, args.non_private)
    dataset = checkpoint["dataset"]
    output = with_suffix_once(args.output, ".dppt")
    settings = {"teacher_sha256": privacy.file_sha256(args.teacher), **{
        key: getattr(args, key) for key in CONTENT_SETTINGS if key != "teacher_sha256"}, "dataset": dataset}
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
        noise_multiplier=args.noise_multiplier, seed=dist.broadcast_int(private_seed(args.seed)), device=device,
        scales=scales, non_private=args.non_private, progress=not args.no_progress, state=state,
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
    payload = {**checkpoint, "stage": "statistics", "dp_statistics": result.stats, "privacy": new_block,
               "statistics_settings": settings}
    privacy.save_dppt(output, payload)
    resume_path.unlink(missing_ok=True)
    logger.info("DP statistics took %.1fs", time.time() - started)
    summary = (f"DP statistics written to {output}: total epsilon {new_block['epsilon']:.3f} at delta "
               f"{new_block['delta']:g} (teacher + statistics, {new_block['accountant']}); "
               f"teacher test accuracy {checkpoint.get('test_acc', float('nan')):.4f}")
    print(summary)
    logger.info(summary)
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
