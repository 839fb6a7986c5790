"""DeepInversion with public initialization: align public images to the DP statistics (stage 3).

The teacher's stat layers are in synthesis mode, holding the *released* DP statistics; the
images are optimized so that the teacher's per-layer feature statistics on the batch match
them and the teacher assigns the target labels. Nothing here touches private data.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch
from torch import nn

from common.cli import nonnegative_float, option, positive_float
from common.precision import autocast
from synthesizer.stat_norm import stat_layers
from synthesizer.terms import TERMS, TermInputs


@dataclass(frozen=True, kw_only=True)
class AlignmentConfig:
    """The optimization of a batch: one weight per loss term (:mod:`synthesizer.terms`), Adam's learning
    rate, the augmentations; the defaults are the paper's (bn 10, oh 1, tv 2.5e-5, l2 3e-8, lr 0.1)."""

    statistics_weight: float = option(10.0, "weight of the DP-statistics matching loss", parse=nonnegative_float,
                                      aliases=("bn",))
    class_weight: float = option(1.0, "weight of the cross-entropy to the targets", parse=nonnegative_float,
                                 aliases=("oh",))
    smoothness_weight: float = option(2.5e-5, "weight of the total-variation prior", parse=nonnegative_float,
                                      aliases=("tv",))
    image_norm_weight: float = option(3e-8, "weight of the image L2 norm", parse=nonnegative_float, aliases=("l2",))
    lr: float = option(0.1, "Adam learning rate on the pixels", parse=positive_float, aliases=("lr_g",))
    jitter: bool = option(True, "random shifts of up to 1/8 of the side during optimization")
    flip: bool = option(True, "random horizontal flips during optimization")

    def term_weights(self) -> dict[str, float]:
        """``{term: weight}`` in the order of the weight fields (the order of the sum)."""
        return {field.name.removesuffix("_weight"): getattr(self, field.name) for field in fields(self)
                if field.name.endswith("_weight")}


def _jitter_and_flip(x: torch.Tensor, config: AlignmentConfig, generator: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    limit = max(side // 8, 1)
    if config.jitter:
        dx, dy = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if config.flip and torch.rand(1, generator=generator).item() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


@dataclass
class BatchResult:
    images: torch.Tensor          # normalized, the teacher's input space
    logits: torch.Tensor          # teacher logits on the final (un-jittered) images
    losses: dict[str, float]      # last step's loss terms and their weighted total


def optimize_batch(teacher: nn.Module, start: torch.Tensor, targets: torch.Tensor, steps: int,
                   config: AlignmentConfig, low: torch.Tensor, high: torch.Tensor,
                   generator: torch.Generator, grayscale: bool = False, bf16: bool = False) -> BatchResult:
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
    # On CUDA the whole update is one kernel (fused Adam); elsewhere torch's default, kept bit for bit.
    optimizer = torch.optim.Adam([param], lr=config.lr, betas=(0.5, 0.99), fused=param.device.type == "cuda")
    weights = config.term_weights()
    last: dict[str, torch.Tensor] = {}

    def expand(p: torch.Tensor) -> torch.Tensor:
        return p.expand(-1, channels, -1, -1) if grayscale else p

    for step in range(steps):
        moved = _jitter_and_flip(param, config, generator)
        jittered = expand(moved)
        with autocast(param.device, bf16):
            logits = teacher(jittered).float()
        inputs = TermInputs(teacher, logits, targets, moved, repeat_scale)
        terms = {name: TERMS[name](inputs) for name in weights}
        total = None
        for name, weight in weights.items():  # in the fields' order: the paper's sum, bit for bit
            total = weight * terms[name] if total is None else total + weight * terms[name]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        with torch.no_grad():
            param.clamp_(min=low_p, max=high_p)
        if step == steps - 1:
            last = {**{name: value.detach() for name, value in terms.items()}, "total": total.detach()}
    images = expand(param.detach())
    with torch.no_grad(), _statistics_off(teacher):
        final_logits = teacher(images)
    # Reading values waits for the device: one read per batch, after the last forward pass is queued.
    losses = dict(zip(last, torch.stack(list(last.values())).tolist())) if last else {}
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
            layer.mode = mode  # checked when it was set; checking the statistics again would wait for the device


def cyclic_targets(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Targets 0..C-1 repeated, by global sample index (so any shard is computed alone)."""
    return torch.arange(start, stop) % num_classes
