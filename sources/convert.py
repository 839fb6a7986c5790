"""Raw images → model inputs: one conversion shared by every dataset and by alignment.

The original code had one hand-written transform pipeline per (public, private) pair; here a
:class:`View` describes the target appearance and :func:`to_view` applies it to any raw images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# ITU-R 601 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
CHUNK = 2048  # images converted at once when a whole split is preprocessed in memory


@dataclass(frozen=True)
class View:
    """How images must look to a model: square side, gray or colour content, normalization, channels."""

    image_size: int
    channels: int
    grayscale: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def content_channels(self) -> int:
        """Channels that carry distinct values (gray content is computed once, then repeated)."""
        return 1 if self.grayscale else 3


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) → (N, 1, H, W) luma; gray input passes through."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop a square."""
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top:top + size, left:left + size]


def to_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """Convert raw (N, C, H, W) images in [0, 1] to the view (normalized, view.channels channels).

    Gray content repeated over channels is returned as an expanded (memory-free) tensor.
    """
    images = images.float()
    images = to_gray(images) if view.grayscale else images.expand(-1, 3, -1, -1)
    images = normalize(resize_square(images, view.image_size), view)
    return images.expand(-1, view.channels, -1, -1)


def normalize(images: torch.Tensor, view: View) -> torch.Tensor:
    """(N, content channels, H, W) in [0, 1] → the view's normalization (the last step of :func:`to_view`)."""
    content = view.content_channels
    mean = torch.tensor(view.mean[:content]).view(1, content, 1, 1)
    std = torch.tensor(view.std[:content]).view(1, content, 1, 1)
    return (images - mean) / std


class InMemoryImages(Dataset):
    """A whole split as tensors: ``.tensors = (images, labels)`` lets loops batch by indexing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.tensors = (images, labels)

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tensors[0][index].contiguous(), int(self.tensors[1][index])


@dataclass(frozen=True)
class RawTensors:
    """A whole raw split held in memory: images (N, C, H, W), uint8 0..255 or float 0..1, and labels."""

    images: torch.Tensor
    labels: torch.Tensor


def preprocess(raw: RawTensors, view: View, label: int | None = None) -> InMemoryImages:
    """Convert a whole raw split once, vectorized, in chunks to bound peak memory."""
    scale = 1 / 255 if raw.images.dtype == torch.uint8 else 1.0
    content = view.content_channels
    out = torch.empty(len(raw.images), content, view.image_size, view.image_size)
    for start in range(0, len(raw.images), CHUNK):
        chunk = raw.images[start:start + CHUNK].float() * scale
        out[start:start + CHUNK] = to_view(chunk, view)[:, :content]
    labels = raw.labels.long() if label is None else torch.full((len(out),), label, dtype=torch.long)
    return InMemoryImages(out.expand(-1, view.channels, -1, -1), labels)


class RawSource(Dataset):
    """Per-item raw images; ``raw(index, min_side)`` may decode at reduced size when ``min_side`` allows."""

    def raw(self, index: int, min_side: int | None) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.raw(index, None)

    def viewed(self, indices: Sequence[int], view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, view.channels, S, S) and labels of ``indices``; sources that can batch override it."""
        images, labels = [], []
        for index in indices:
            image, label = self.raw(int(index), view.image_size)
            images.append(to_view(image.unsqueeze(0), view)[0])
            labels.append(int(label))
        if not images:
            return torch.empty(0, view.channels, view.image_size, view.image_size), torch.empty(0, dtype=torch.long)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class ViewedItems(Dataset):
    """A per-item source seen through a view; ``label`` replaces every label when given."""

    def __init__(self, source: RawSource, view: View, label: int | None = None) -> None:
        self.source, self.view, self.label = source, view, label

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.source.viewed([index], self.view)
        return images[0], int(labels[0]) if self.label is None else self.label

    def stack_items(self, indices: Sequence[int]) -> torch.Tensor:
        """The images of ``indices`` in one call, so that a source can convert them as a batch."""
        return self.source.viewed(indices, self.view)[0]


def view_of(source: RawTensors | RawSource, view: View, label: int | None = None) -> Dataset:
    """The dataset a model consumes: preprocessed in memory for tensor sources, lazily otherwise."""
    if isinstance(source, RawTensors):
        return preprocess(source, view, label)
    return ViewedItems(source, view, label)
