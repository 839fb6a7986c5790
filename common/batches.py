"""Batch access to datasets: direct tensor indexing for in-memory sets, a DataLoader otherwise.

In-memory datasets (they expose ``.tensors = (images, labels)``) are indexed in one
operation per batch; per-item ``__getitem__`` plus collation would dominate the step time
of a small model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import DPImgSynError

Batch = tuple[torch.Tensor, torch.Tensor]


def in_memory_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images, labels)`` when the dataset is held in memory, else ``None``."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None or len(tensors) < 2:
        return None
    return tensors[0], tensors[1]


# Transforms that draw at random when an item is read, beyond torchvision's ``Random*`` classes.
RANDOM_TRANSFORMS = frozenset({"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix",
                               "GaussianBlur", "GaussianNoise", "ElasticTransform", "JPEG"})


def _transforms(transform: object, depth: int = 0) -> Iterator[object]:
    """``transform`` and every transform it composes (``Compose``'s list, an ``nn.Sequential``'s layers)."""
    yield transform
    inner = getattr(transform, "transforms", None)
    if depth < 8 and isinstance(inner, (list, tuple, torch.nn.Module)):
        for part in inner:
            yield from _transforms(part, depth + 1)


def random_transform(dataset: Dataset) -> str | None:
    """The name of a random transform a per-item dataset applies when an item is read (torchvision style:
    ``transform``/``transforms`` attributes, also below a ``Subset``), else None. Reading such a set once would
    freeze one random view of every item."""
    for holder in (dataset, getattr(dataset, "dataset", None)):
        for attribute in ("transform", "transforms", "target_transform"):
            for part in _transforms(getattr(holder, attribute, None)):
                name = type(part).__name__
                if name.startswith("Random") or name in RANDOM_TRANSFORMS:
                    return name
    return None


def _collate_or_none(items: Sequence[tuple[torch.Tensor, int]]) -> Batch | None:
    if not items:
        return None
    images = torch.stack([item[0] for item in items])
    labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
    return images, labels


@contextmanager
def single_threaded() -> Iterator[None]:
    """Per-item decoding of small images is slower with torch's thread pool than without it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stack_items(dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    """Images of ``dataset[i]`` for each index, stacked (labels dropped): public-set batches."""
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        return tensors[0][torch.as_tensor(indices, dtype=torch.long)]
    batched = getattr(dataset, "stack_items", None)  # a per-item set that converts whole batches faster
    with single_threaded():
        if batched is not None:
            return batched(indices)
        return torch.stack([dataset[int(i)][0] for i in indices])


def batches_by_index(dataset: Dataset, index_batches: Iterable[torch.Tensor], num_workers: int = 0
                    ) -> Iterator[Batch | None]:
    """Yield ``(images, labels)`` for each index tensor; ``None`` for an empty batch."""
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        images, labels = tensors
        for indices in index_batches:
            yield (images[indices], labels[indices]) if len(indices) else None
        return
    if num_workers == 0:
        for indices in index_batches:
            with single_threaded():
                items = [dataset[int(i)] for i in indices]
            yield _collate_or_none(items)
        return
    loader = DataLoader(
        dataset,
        batch_sampler=[indices.tolist() for indices in index_batches],
        num_workers=num_workers,
        collate_fn=_collate_or_none,
    )
    batches = iter(loader)
    try:
        yield from batches
        return
    except DPImgSynError as exc:
        # A loader process hands its error on with its traceback in the message, whose last line is the user's.
        _, found, message = str(exc).rstrip().rpartition("\n")[2].partition(f"{DPImgSynError.__name__}: ")
        message = message if found else str(exc)
        exc.__traceback__ = None  # its frames hold the loader in a cycle
    del batches  # so the loader stops its processes now, not in a garbage collection that may close its queues first
    raise DPImgSynError(message)


def sequential_batches(dataset: Dataset, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """The whole dataset in order, in batches (evaluation, feature extraction)."""
    total = len(dataset)
    chunks = [torch.arange(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    for batch in batches_by_index(dataset, chunks, num_workers):
        assert batch is not None
        yield batch


def decode_all(dataset: Dataset, num_workers: int = 0, batch_size: int = 256) -> None:
    """Read every item of a file-backed dataset once, so that a file that cannot be read stops a run at its
    start rather than when Poisson sampling first draws it (epochs later, or never); in-memory sets pass."""
    if in_memory_tensors(dataset) is None:
        for _ in sequential_batches(dataset, batch_size, num_workers):
            pass


def default_workers(device: torch.device) -> int:
    """Loader processes for file-backed datasets: a few on CUDA hosts, none on small CPU machines."""
    return 4 if device.type == "cuda" else 0
