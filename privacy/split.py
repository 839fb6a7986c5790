"""The validation split of the private training set: a fixed function of each record's content.

A DP guarantee is about neighbouring datasets, one record added or removed. If the held-out
records were drawn by a random permutation of all N indices, adding one record would reshuffle
which *other* records are trained on, and the two private stages would see training sets that
differ in many records. Here a record goes to validation exactly when a keyed hash of its bytes
falls below the validation fraction, so one record's presence moves no other record: the
training parts of two neighbouring datasets are neighbours (or equal). Both private stages use
this training part, and the ledger's N is its size. The key is public and fixed: which side a
record lands on is not a secret, only the record itself is.

The validation part is private data too: figures measured on it (validation accuracy) are local,
non-private diagnostics and never enter an artifact.
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

SPLIT_KEY = b"dpimgsyn/validation-split/v1"
_HASH_SCALE = float(2 ** 64)


def record_fraction(image: torch.Tensor, label: int) -> float:
    """A number in [0, 1) fixed by the record's content (image bytes and label), uniform over records."""
    digest = hashlib.blake2b(key=SPLIT_KEY, digest_size=8)
    digest.update(np.ascontiguousarray(image.detach().cpu().numpy()).tobytes())
    digest.update(int(label).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / _HASH_SCALE


def _records(dataset: Dataset):
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        yield from zip(tensors[0], tensors[1].tolist())
        return
    for index in range(len(dataset)):
        image, label = dataset[index][:2]
        yield image, int(label)


def _subset(dataset: Dataset, indices: list[int]) -> Dataset:
    """A subset that stays an in-memory tensor set when ``dataset`` is one (fast batch indexing)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        part = copy.copy(dataset)
        part.tensors = tuple(tensor[chosen] for tensor in tensors)
        return part
    return Subset(dataset, indices)


def split_by_content(dataset: Dataset, val_split: float) -> tuple[Dataset, Dataset | None]:
    """``(training part, validation part)``: each record on the side its content hash picks.

    ``val_split`` is the expected validation fraction; 0 keeps every record for training.
    """
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    if val_split == 0:
        return dataset, None
    train, validation = [], []
    for index, (image, label) in enumerate(_records(dataset)):
        (validation if record_fraction(image, label) < val_split else train).append(index)
    return _subset(dataset, train), _subset(dataset, validation)
