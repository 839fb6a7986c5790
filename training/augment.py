"""Batched image augmentation on tensors, shared by DP-SGD (augmentation multiplicity) and the student.

Every draw is keyed by (key, record, view) alone: a counter-based hash (SplitMix64's finalizer,
vectorized over the batch), not a generator stream read in row order. A record's crops therefore do
not depend on which other records the Poisson batch or the dataset holds: adding or removing one
record changes no other record's views, whatever the key's secrecy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Whether the teacher's and the student's augmentation also flip horizontally unless told to: off, because a
# flipped digit or letter is another one (flips cost a digits student 33 points, docs/utility.md); natural images
# turn it on.
AUGMENT_FLIP = False
_OFFSET_BITS = 24  # bits per crop offset: the modulo bias stays under 4e-6 for any padding up to 32


def _as_int64(value: int) -> int:
    """A 64-bit pattern as torch's int64 holds it (two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA, _MIX_1, _MIX_2 = map(_as_int64, (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (wrapping arithmetic): 64 well-mixed bits per input."""
    x = x + _GAMMA
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def _keyed_bits(key: int, records: torch.Tensor, views: int = 1) -> torch.Tensor:
    """64 random bits (int64) for each view of each record: ``views`` consecutive rows per record, each row a
    function of (``key``, record, view) alone."""
    view = torch.arange(views, device=records.device)
    counters = (records.to(torch.int64).view(-1, 1) * views + view).flatten()
    return _mix64(_mix64(counters) ^ _as_int64(key))


def random_crop_flip(images: torch.Tensor, records: torch.Tensor, key: int, *, views: int = 1, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """``views`` random crops after reflect padding (each also flipped horizontally at random with ``flip``) of
    every image, an image's views consecutive.

    ``records`` names each image (its index in the dataset it came from) and ``key`` the draw (e.g. seed
    and step): the view ``v`` of image ``i`` depends on ``images[i]``, ``records[i]``, ``v`` and ``key`` only.
    One gather from the padded images' windows (a strided view, no copy); a flipped view is the crop at the
    mirrored offset of the mirrored image, so flips cost no pass over the views.
    """
    n, _, h, w = images.shape
    if len(records) != n:
        raise ValueError(f"{len(records)} record indices for {n} images")
    bits = _keyed_bits(key, records, views).to(images.device)
    span, low = 2 * padding + 1, (1 << _OFFSET_BITS) - 1
    dx = (bits & low) % span
    dy = (_shift_right(bits, _OFFSET_BITS) & low) % span
    source = torch.arange(n, device=images.device).repeat_interleave(views)
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    if flip:
        flipped = _shift_right(bits, 63)
        padded = torch.cat([padded, padded.flip(3)])
        source = source + n * flipped
        dx = torch.where(flipped.bool(), span - 1 - dx, dx)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (images, channels, dy, dx, h, w)
    return windows[source, :, dy, dx]
