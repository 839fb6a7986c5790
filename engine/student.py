"""Stage 4 orchestration: a student distilled from a release, evaluated on the private test split."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import registry
from engine import distributed
from engine.artifacts import require_same_settings
from engine.distill import StudentConfig, StudentTrainer
from engine.evaluation import evaluate
from engine.precision import use_bf16
from engine.runtime import atomic_torch_save, atomic_write_text, seed_everything, setup_logging
from errors import DPImgSynError
from synthesizer import release as release_io


def train_student(args: argparse.Namespace) -> dict:
    """Run (or resume) stage 4; returns the metrics rank 0 writes to ``<output>/metrics.json``.

    Under torchrun the other ranks train their share and return ``{}``.
    """
    dist, device = distributed.setup(args.device)
    bundle = release_io.load(args.release, verify=True)  # a swapped or damaged array is refused
    recorded = bundle.metadata.get("dataset")
    if not recorded:
        raise DPImgSynError(f"{args.release} does not record its private dataset; regenerate it with synthesize.py")
    dataset = args.dataset or registry.local_dataset(recorded, None, f"release {args.release}")
    output = Path(args.output)
    config = StudentConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           temperature=args.T, alpha=args.alpha, beta=args.beta, augment=args.augment)
    bf16 = use_bf16(args.precision, device)
    settings = {"release_sha256": bundle.metadata.get("files", {}), "dataset": recorded, "model": args.model,
                "seed": args.seed, "bf16": bf16, **vars(config)}
    metrics_path = output / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        require_same_settings(metrics_path, metrics.get("settings", {}), settings)
        if dist.is_main:
            print(f"{metrics_path} already complete (student test accuracy {metrics['student_test_acc']:.4f})")
        return metrics
    logger = setup_logging(output / "train_student.log" if dist.is_main else None)
    logger.info("stage 4 (student) settings: %s", settings)
    with dist.main_first():  # only rank 0 evaluates; it alone may download the test split
        test_set = registry.get_split(dataset, "test", args.data_root, args.download) if dist.is_main else None

    seed_everything(args.seed)
    images, soft_labels, targets = bundle.tensors()
    mean = torch.tensor(bundle.metadata["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bundle.metadata["std"]).view(1, -1, 1, 1)
    images = (images - mean) / std
    model = registry.get_model(args.model, soft_labels.shape[1])
    trainer = StudentTrainer(model, images, soft_labels, targets.long(), config, device, args.seed, dist, bf16)
    resume_path = output / "student.resume"
    history: list[dict] = []
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        require_same_settings(resume_path, state["settings"], settings)
        trainer.load_state_dict(state["trainer"])
        history = list(state["history"])
        if dist.is_main:
            print(f"resuming student after epoch {trainer.epoch}")
    started = time.time()
    while trainer.epoch < config.epochs:
        stats = trainer.train_epoch(progress=not args.no_progress)
        if not dist.is_main:
            continue
        if args.eval_every and (trainer.epoch % args.eval_every == 0 or trainer.epoch == config.epochs):
            stats["test_acc"] = evaluate(trainer.model, test_set, device)
        history.append(stats)
        logger.info("epoch %s", stats)
        atomic_torch_save({"settings": settings, "trainer": trainer.state_dict(), "history": history}, resume_path)
    if not dist.is_main:
        dist.barrier()  # return once rank 0 has written the student
        return {}
    final_acc = evaluate(trainer.model, test_set, device)
    atomic_torch_save({"model": trainer.model.state_dict(), "architecture": args.model,
                       "num_classes": soft_labels.shape[1], "dataset": dataset}, output / "student.pt")
    metrics = {"student_test_acc": final_acc, "epochs": config.epochs, "dataset": dataset,
               "release": str(Path(args.release)), "k": bundle.metadata.get("k"),
               "public_set": bundle.metadata.get("public_set"), "seed": args.seed,
               "epsilon": bundle.metadata.get("privacy", {}).get("epsilon"),
               "seconds": time.time() - started, "history": history, "settings": settings}
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    resume_path.unlink(missing_ok=True)
    print(f"student test accuracy {final_acc:.4f} (final epoch) -> {metrics_path}")
    dist.barrier()
    return metrics
