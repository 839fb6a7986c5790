"""Batched image augmentation on tensors, shared by DP-SGD (augmentation multiplicity) and the student."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random crop after reflect padding (and a horizontal flip with ``flip``), one draw per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(images.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(images.device)
    out = padded[torch.arange(n, device=images.device).view(n, 1, 1, 1),
                 torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if not flip:
        return out
    flipped = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    return torch.where(flipped.view(n, 1, 1, 1), out.flip(3), out)
