"""Stage 3 orchestration: teacher + DP statistics + public images -> a release bundle.

Reads no private data: the private set is known only through `registry.recorded_spec`
(its public shape and normalization constants) and through the DP artifacts.

Under torchrun, rank r synthesizes the shards whose index is r modulo the number of ranks; every
shard draws from its own seeded generator, so the merged release equals a single-process one.
Rank 0 assembles it once every rank has written its shards.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import time
from pathlib import Path

import numpy as np
import opacus
import torch
from tqdm import tqdm

import privacy
import registry
from engine import distributed
from engine.artifacts import model_from_checkpoint
from engine.data import stack_items
from engine.fetch import resolve_checkpoint
from engine.precision import use_bf16
from engine.runtime import setup_logging
from errors import DPImgSynError
from synthesizer.deepinversion import SynthesisWeights, cyclic_targets, optimize_batch
from synthesizer.release import ReleaseWriter
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, set_mode

SAMPLING_SEED = 0  # which public images are used is fixed per (public set, count), as the original lists


def load_teacher_for_synthesis(path: str | Path, non_private: bool, device: torch.device):
    """The stage-2 teacher with its stat layers in synthesis mode, and its checkpoint dict."""
    checkpoint = privacy.load_dppt(path)
    block = privacy.require_privacy_block(checkpoint, f"teacher checkpoint {path}", allow_non_private=non_private)
    privacy.check_dppt(checkpoint)
    if checkpoint.get("stage") != "statistics" or "dp_statistics" not in checkpoint:
        if not non_private:
            raise DPImgSynError(
                f"{path} is a stage-{checkpoint.get('stage', '?')} checkpoint without DP statistics; "
                "run save_dp_db_stats.py on it first")
    model = model_from_checkpoint(checkpoint, path)
    attach_stat_layers(model)
    if "dp_statistics" in checkpoint:
        load_dp_statistics(model, checkpoint["dp_statistics"])
        set_mode(model, "synthesis")
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, checkpoint, block


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """Per-shard randomness, so any shard can be (re)computed alone with identical results."""
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def synthesize(args: argparse.Namespace) -> Path:
    """Run (or resume) stage 3 and return the release folder."""
    dist, device = distributed.setup(args.device)
    output = Path(args.output)
    with dist.main_first():  # a URL is downloaded once
        args.teacher = resolve_checkpoint(args.teacher, args.sha256, progress=not args.no_progress)
    teacher, checkpoint, block = load_teacher_for_synthesis(args.teacher, args.non_private, device)
    if args.g_steps > 0 and "dp_statistics" not in checkpoint:
        raise DPImgSynError(f"--g_steps {args.g_steps} matches statistics, but {args.teacher} holds none; "
                            "run save_dp_db_stats.py (or --g_steps 0)")
    private_name = checkpoint["dataset"]
    spec = registry.recorded_spec(private_name, checkpoint["num_classes"])
    with dist.main_first():
        public = registry.aligned(args.public_set, spec, args.data_root, args.download)
    indices = registry.sampling_list(args.public_set, args.num_samples, SAMPLING_SEED, available=len(public))
    weights = SynthesisWeights(bn=args.bn, oh=args.oh, tv=args.tv, l2=args.l2, adv=0.0, lr=args.lr_g,
                               flip=not args.no_flip)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    low, high = ((0 - mean) / std).flatten().to(device), ((1 - mean) / std).flatten().to(device)
    settings = {
        "teacher_sha256": privacy.file_sha256(args.teacher), "public_set": registry.artifact_name(args.public_set),
        "num_samples": args.num_samples, "g_steps": args.g_steps, "batch_size": args.batch_size,
        "bn": args.bn, "oh": args.oh, "tv": args.tv, "l2": args.l2, "lr_g": args.lr_g,
        "targets": args.targets, "flip": not args.no_flip, "seed": args.seed, "non_private": args.non_private,
        "bf16": use_bf16(args.precision, device),
    }
    shard_size = args.batch_size * args.batches_per_shard
    with dist.main_first():  # rank 0 records the settings (or refuses the folder) first
        writer = ReleaseWriter(output, num_samples=args.num_samples, shard_size=shard_size,
                               image_shape=(spec.channels, spec.image_size, spec.image_size),
                               num_classes=checkpoint["num_classes"], settings=settings)
    logger = setup_logging(output.parent / f"{output.name}.log" if dist.is_main else None)
    logger.info("stage 3 (synthesis) settings: %s", settings)
    pending = [shard for shard in writer.pending_shards() if dist.owns(shard)]
    started = time.time()
    bar = tqdm(total=len(pending) * shard_size, unit="img", desc=f"synthesis k={args.g_steps}",
               disable=args.no_progress or not dist.is_main, dynamic_ncols=True)
    for shard in pending:
        start, stop = writer.shard_range(shard)
        generator = shard_generator(args.seed, shard)
        parts: dict[str, list[torch.Tensor]] = {"images": [], "initial": [], "logits": [], "targets": []}
        for batch_start in range(start, stop, args.batch_size):
            batch_stop = min(batch_start + args.batch_size, stop)
            x0 = stack_items(public, indices[batch_start:batch_stop]).to(device)
            if args.targets == "teacher":
                with torch.no_grad():
                    targets = teacher(x0).argmax(1)
            else:
                targets = cyclic_targets(batch_start, batch_stop, checkpoint["num_classes"]).to(device)
            result = optimize_batch(teacher, x0, targets, args.g_steps, weights, low, high, generator,
                                    grayscale=spec.grayscale, bf16=settings["bf16"])
            parts["images"].append((result.images * std.to(device) + mean.to(device)).clamp(0, 1).cpu())
            parts["initial"].append((x0 * std.to(device) + mean.to(device)).clamp(0, 1).cpu())
            parts["logits"].append(result.logits.float().cpu())
            parts["targets"].append(targets.cpu())
            bar.update(batch_stop - batch_start)
            bar.set_postfix({name: f"{value:.3g}" for name, value in result.losses.items()})
        writer.write_shard(shard, images=torch.cat(parts["images"]).numpy(),
                           soft_labels=torch.cat(parts["logits"]).numpy(),
                           targets=torch.cat(parts["targets"]).numpy().astype(np.int64),
                           initial_images=torch.cat(parts["initial"]).numpy())
    bar.close()
    dist.barrier()  # every rank's shards are on disk
    if not dist.is_main:
        dist.barrier()  # return once rank 0 has assembled the release
        return output
    metadata = {
        "privacy": block, "dataset": private_name, "mean": list(spec.mean), "std": list(spec.std),
        "public_set": settings["public_set"], "k": args.g_steps, "settings": settings,
        "teacher_file": Path(args.teacher).name, "teacher_sha256": settings["teacher_sha256"],
        "teacher_architecture": checkpoint["architecture"], "num_classes": checkpoint["num_classes"],
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "opacus": opacus.__version__, "numpy": np.__version__},
    }
    writer.finalize(metadata)
    elapsed = time.time() - started
    print(f"release written to {output} ({args.num_samples} images, k={args.g_steps}, "
          f"epsilon {block['epsilon']:.3f}); preview: {output / 'preview.png'}")
    logger.info("synthesis finished in %.1fs", elapsed)
    dist.barrier()
    return output
