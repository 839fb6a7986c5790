"""DeepInversion with public initialization: align public images to the DP statistics (stage 3).

The teacher's stat layers are in synthesis mode, holding the *released* DP statistics; the
images are optimized so that the teacher's per-layer feature statistics on the batch match
them and the teacher assigns the target labels. Nothing here touches private data.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.precision import autocast
from synthesizer.stat_norm import matching_loss, stat_layers


@dataclass(frozen=True)
class SynthesisWeights:
    """Loss weights and optimizer settings; defaults are the paper's."""

    bn: float = 10.0
    oh: float = 1.0
    tv: float = 2.5e-5
    l2: float = 3e-8
    adv: float = 0.0
    lr: float = 0.1
    jitter: bool = True
    flip: bool = True


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 image prior: norms of the four neighbour differences."""
    return (torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:]) + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:]) + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def jensen_shannon(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """JS divergence between the two output distributions (adversarial term of DeepInversion)."""
    p = F.softmax(student_logits, dim=1)
    q = F.softmax(teacher_logits, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    return 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))


def _jitter_and_flip(x: torch.Tensor, weights: SynthesisWeights, generator: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    limit = max(side // 8, 1)
    if weights.jitter:
        dx, dy = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if weights.flip and torch.rand(1, generator=generator).item() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


@dataclass
class BatchResult:
    images: torch.Tensor          # normalized, the teacher's input space
    logits: torch.Tensor          # teacher logits on the final (un-jittered) images
    losses: dict[str, float]      # last step's loss terms (bn, oh, tv, l2, total)


def optimize_batch(teacher: nn.Module, start: torch.Tensor, targets: torch.Tensor, steps: int,
                   weights: SynthesisWeights, low: torch.Tensor, high: torch.Tensor,
                   generator: torch.Generator, grayscale: bool = False,
                   student: nn.Module | None = None, bf16: bool = False) -> BatchResult:
    """Run ``steps`` Adam steps on a batch of public images (``steps == 0`` returns them unchanged).

    ``low``/``high`` are the per-channel valid range in normalized space (pixel 0 and 1).
    For gray private data a single channel is optimized and repeated, so images stay gray;
    jitter, flip, TV and L2 then work on that one channel, and TV and L2 are scaled by
    sqrt(channels): the norms over identical repeated channels, at a third of the cost.
    ``bf16`` runs the networks under bf16 autocast; the statistics loss (the stat layers compute
    moments in float32), the other loss terms, the pixels and the released logits stay float32.
    """
    low, high = low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)
    channels = start.shape[1]
    param = (start[:, :1] if grayscale else start).detach().clone().requires_grad_(steps > 0)
    low_p, high_p = (low[:, :1], high[:, :1]) if grayscale else (low, high)
    repeat_scale = math.sqrt(channels) if grayscale else 1.0
    optimizer = torch.optim.Adam([param], lr=weights.lr, betas=(0.5, 0.99))
    losses: dict[str, float] = {}

    def expand(p: torch.Tensor) -> torch.Tensor:
        return p.expand(-1, channels, -1, -1) if grayscale else p

    for step in range(steps):
        moved = _jitter_and_flip(param, weights, generator)
        jittered = expand(moved)
        with autocast(param.device, bf16):
            logits = teacher(jittered).float()
        terms = {
            "bn": matching_loss(teacher),
            "oh": F.cross_entropy(logits, targets),
            "tv": repeat_scale * total_variation(moved),
            "l2": repeat_scale * torch.norm(moved),
        }
        total = (weights.bn * terms["bn"] + weights.oh * terms["oh"] + weights.tv * terms["tv"]
                 + weights.l2 * terms["l2"])
        if student is not None and weights.adv > 0:
            with autocast(param.device, bf16):
                student_logits = student(jittered).float()
            terms["adv"] = -jensen_shannon(student_logits, logits)
            total = total + weights.adv * terms["adv"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        with torch.no_grad():
            param.clamp_(min=low_p, max=high_p)
        if step == steps - 1:  # reading a value waits for the device: once per batch, not per step
            losses = {name: float(value.detach()) for name, value in terms.items()}
            losses["total"] = float(total.detach())
    images = expand(param.detach())
    with torch.no_grad(), _statistics_off(teacher):
        final_logits = teacher(images)
    return BatchResult(images=images, logits=final_logits, losses=losses)


@contextmanager
def _statistics_off(model: nn.Module) -> Iterator[None]:
    """Plain GroupNorms for a forward pass that needs only logits (the stat layers' output is the same)."""
    layers = list(stat_layers(model).values())
    modes = [layer.mode for layer in layers]
    for layer in layers:
        layer.set_mode("off")
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.set_mode(mode)


def cyclic_targets(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Targets 0..C-1 repeated, by global sample index (so any shard is computed alone)."""
    return torch.arange(start, stop) % num_classes
