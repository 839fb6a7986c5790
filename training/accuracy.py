"""Accuracy of a classifier on a dataset (reporting only: never used to pick epochs or seeds)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from common.batches import sequential_batches
from common.runtime import in_mode


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
             num_workers: int = 0) -> float:
    """Top-1 accuracy in [0, 1]; restores the model's train/eval mode afterwards."""
    correct = total = 0
    with in_mode(model, training=False):
        for images, labels in sequential_batches(dataset, batch_size, num_workers):
            logits = model(images.to(device, non_blocking=True))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            total += len(labels)
    return correct / max(total, 1)
