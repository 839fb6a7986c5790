"""Stage 4: knowledge distillation of a student from a release bundle alone.

Soft labels come from the bundle (the teacher's logits on the final images), so no teacher
forward pass is needed per step and the student never needs the teacher or private
training data. A release without soft labels (another method's images and hard labels) trains
the same way on cross-entropy alone (:func:`hard_label_config`), so both the student stage and the
evaluation of any release use this one trainer.

Under torchrun the student is wrapped in DistributedDataParallel and a DistributedSampler deals
each rank its part of every epoch; ``batch_size`` stays the global batch (split over the ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from common.cli import nonnegative_float, option, positive_float, positive_int
from common.distributed import Distributed
from common.errors import DPImgSynError
from common.precision import autocast, channels_last
from common.runtime import keyed_seed
from training.augment import AUGMENT_FLIP, random_crop_flip

PAPER_SEEDS = (111, 2023, 50173)  # the paper's student seeds: a pipeline's and a foreign release's default
POSTFIX_EVERY = 10  # steps between progress-bar loss updates: each one waits for the device


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
            temperature: float, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + beta * CE(s, targets); alpha = 0 needs no teacher logits."""
    loss = student_logits.new_zeros(())
    if alpha:
        if teacher_logits is None:
            raise DPImgSynError("the distillation term (alpha > 0) needs soft labels; train on hard labels with "
                                "alpha 0 and beta 1")
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                        F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
        loss = loss + alpha * temperature * temperature * soft
    if beta:
        loss = loss + beta * F.cross_entropy(student_logits, targets)
    return loss


@dataclass(frozen=True, kw_only=True)
class DistillationConfig:
    """The student's training; the defaults are the paper's (ResNet-18's recipe: batch 256, SGD 0.1/0.9/1e-4,
    200 epochs, steps at 120/150/180, T = 100)."""

    epochs: int = option(200, "training epochs", parse=positive_int)
    batch_size: int = option(256, "batch size (the global batch under torchrun)", parse=positive_int)
    lr: float = option(0.1, "SGD learning rate (MultiStepLR at 60/75/90%%)", parse=positive_float)
    momentum: float = option(0.9, "SGD momentum", parse=nonnegative_float)
    weight_decay: float = option(1e-4, "SGD weight decay", parse=nonnegative_float)
    temperature: float = option(100.0, "distillation temperature (paper: 100)", parse=positive_float, aliases=("T",))
    alpha: float = option(1.0, "weight of the soft (KL) term", parse=nonnegative_float)
    beta: float = option(0.0, "weight of the hard-label CE term", parse=nonnegative_float)
    augment: bool = option(False, "random crops (and flips with augment_flip) of the released images")
    augment_flip: bool = option(AUGMENT_FLIP, "with augment: flip horizontally too (not for digits or text)")

    def milestones(self) -> list[int]:
        """120/150/180 of 200 epochs, scaled to the configured length."""
        return [int(round(self.epochs * f)) for f in (0.6, 0.75, 0.9)]


def hard_label_config(config: DistillationConfig) -> DistillationConfig:
    """The same recipe on hard labels: cross-entropy only (alpha 0, beta 1), for releases without soft labels."""
    recipe = DistillationConfig(**{field.name: getattr(config, field.name) for field in fields(DistillationConfig)})
    return replace(recipe, alpha=0.0, beta=1.0)


def _resident(tensors: tuple[torch.Tensor | None, ...], device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """The release on the accelerator when it takes under a quarter of its free memory: no copy per step."""
    if device.type != "cuda":
        return tensors
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if sum(tensor.nbytes for tensor in tensors if tensor is not None) > free_bytes // 4:
        return tensors
    return tuple(tensor if tensor is None else tensor.to(device) for tensor in tensors)


class StudentTrainer:
    """SGD + MultiStepLR over in-memory (images, soft labels, targets) tensors; resumable per epoch.

    ``soft_labels`` may be ``None`` for a release of images and hard labels only; the config must then
    not weigh the distillation term (:func:`hard_label_config`). ``model`` stays the bare network
    (weights, evaluation); ``network`` is what trains (DDP under torchrun).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, soft_labels: torch.Tensor | None,
                 targets: torch.Tensor, config: DistillationConfig, device: torch.device, seed: int,
                 dist: Distributed = Distributed(), bf16: bool = False) -> None:
        if config.batch_size % dist.world_size:
            raise DPImgSynError(f"--batch_size {config.batch_size} must be a multiple of the "
                                f"{dist.world_size} processes (it is the global batch)")
        if soft_labels is None and config.alpha:
            raise DPImgSynError("a release without soft labels trains on hard labels only: alpha must be 0 "
                                "(and beta > 0)")
        self.model = channels_last(model.to(device), device, bf16)
        self.bf16 = bf16
        self.network = self.model
        if dist.enabled:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.images, self.soft_labels, self.targets = _resident((images, soft_labels, targets), device)
        self.config = config
        self.device = device
        self.dist = dist
        self.seed = seed
        # The epoch's permutation is the sampler's (seed + epoch); rank r takes every world_size-th index.
        self.sampler = DistributedSampler(range(len(images)), num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, config.milestones(), gamma=0.1)
        self.epoch = 0

    def train_epoch(self, progress: bool = True) -> dict:
        self.network.train()
        self.sampler.set_epoch(self.epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        batches = order.split(self.config.batch_size // self.dist.world_size)
        key = keyed_seed(self.seed, self.epoch)  # every image once per epoch: drawn per (seed, epoch, image)
        loss_sum = torch.zeros((), device=self.device)  # on the device: no step waits for a copy to the host
        seen = 0
        bar = tqdm(batches, desc=f"student epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not (progress and self.dist.is_main), leave=False, dynamic_ncols=True)
        for step, indices in enumerate(bar, start=1):
            x = self.images[indices].to(self.device, non_blocking=True)
            if self.config.augment:
                x = random_crop_flip(x, indices, key, flip=self.config.augment_flip)
            t = None if self.soft_labels is None else self.soft_labels[indices].to(self.device, non_blocking=True)
            y = self.targets[indices].to(self.device, non_blocking=True)
            with autocast(self.device, self.bf16):
                logits = self.network(channels_last(x, self.device, self.bf16))
            loss = kd_loss(logits.float(), t, y, self.config.temperature, self.config.alpha, self.config.beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().float() * len(indices)
            seen += len(indices)
            if progress and (step % POSTFIX_EVERY == 0 or step == len(batches)):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
        self.scheduler.step()
        self.epoch += 1
        totals = self.dist.all_reduce_sum(torch.stack([loss_sum.float(),
                                                       torch.tensor(float(seen), device=self.device)]))
        return {"epoch": self.epoch, "loss": totals[0].item() / max(totals[1].item(), 1)}

    def fit(self, progress: bool = True, after_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs (all of them, or those left after a resume); returns each epoch's stats.

        ``after_epoch`` sees every epoch's stats as they come, e.g. to log them or save a resume file.
        """
        history = []
        while self.epoch < self.config.epochs:
            stats = self.train_epoch(progress=progress)
            if after_epoch is not None:
                after_epoch(stats)
            history.append(stats)
        return history

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
