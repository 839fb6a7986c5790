"""DP-SGD on a fixed front end's precomputed outputs: the same mechanism, run once per example.

A model such as ``scatter_cnn`` is ``head(frontend(x))``, where ``frontend`` (a scattering transform)
is a fixed function of each example alone: no trainable parameter, no statistics of the batch, no
randomness. DP-SGD's gradient of example i over the trainable parameters, all in ``head``, is then
the gradient of ``loss(head(f_i), y_i)`` with ``f_i = frontend(x_i)``: training ``head`` on the
features gives every example the same gradient, hence the same clipped sum and the same noise. The
Poisson sampling still runs over the same N records, so the privacy analysis (and the ledger) is
unchanged. Only the cost changes: the front end runs once per example instead of once per example
and epoch. The leading parameter-free, per-example layers of ``head`` (scatter_cnn's affine-free
GroupNorm) are fixed too: they run with the front end, and the trained part is the rest of ``head``,
where an adaptive pool that is the identity on the cached maps is skipped.

The features of private examples are a private, local intermediate, like the images: held in memory,
or beyond :data:`MAX_FEATURE_BYTES` in an owner-only file of the cache folder that is unlinked as soon
as it is opened (it disappears with the run, even a killed one). A release's images are DP outputs:
with ``public=True`` their features are kept in the cache folder (0600 files), keyed by the images'
content and the front end, so that every student trained on the same release reads them.

It does not apply to augmented data: each augmented view of an example must go through the front
end when it is drawn, and caching one view would train on the unaugmented images instead; nor to a
per-item dataset that applies a random transform when an item is read.
:func:`cache_refusal` says why it does not apply; the caller then trains the whole model on images.

Usage (stages 1 and 4)::

    trained, data = training_inputs(model, train_set, augmented=augmenting, device=device)  # says which path
    trainer = DPSGDTrainer(trained, data, config, device, seed)  # trains model.head in place
    test_features = scoring_features(model, trained, test_set, device)  # None: score the images
    ...
    save whole_model(model, trainer.released_model).state_dict()  # the head's weights under ``head.``
"""
from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import secrets
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm import tqdm

from common.batches import default_workers, in_memory_tensors, random_transform, sequential_batches, stack_items
from common.errors import DPImgSynError
from common.files import CACHE_ENV, atomic_torch_save, cache_root
from common.runtime import in_mode, open_private
from privacy.clipping import refuse_batch_statistics

# Larger feature sets go to an owner-only file of the cache folder, read through a memory map: the features
# of 50,000 CIFAR-10 images under scatter_cnn take 3.1 GB, those of a 224-pixel set ten times more.
MAX_FEATURE_BYTES = 4 << 30
# Releases' features kept in the cache folder for later students; beyond it the least recently used go.
MAX_SHARED_BYTES = 16 << 30
CACHE_FOLDER = "frontend"
BATCH_SIZE = 256
# Examples whose features are recomputed alone and compared with their batched values.
CHECKED_EXAMPLES = 2
# Batched and single-example FFTs and matrix products round differently.
RTOL, ATOL = 1e-4, 1e-5
# Layers that, without parameters or buffers, are a function of each example alone (never BatchNorm).
PER_EXAMPLE_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                      nn.Identity, nn.Flatten, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid)
IDENTITY_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # on maps of their output size


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    frontend, head = getattr(model, "frontend", None), getattr(model, "head", None)
    if isinstance(frontend, nn.Module) and isinstance(head, nn.Module):
        return frontend, head
    return None


def _fixed_layers(head: nn.Module) -> int:
    """How many leading layers of ``head`` are fixed per-example functions, cached with the front end."""
    if type(head) is not nn.Sequential:  # a subclass may not run its layers in order
        return 0
    count = 0
    for layer in list(head)[:-1]:  # the last layer trains
        if (not isinstance(layer, PER_EXAMPLE_LAYERS) or any(True for _ in layer.parameters())
                or any(True for _ in layer.buffers())):
            break
        count += 1
    return count


def _cached_part(frontend: nn.Module, head: nn.Module, fixed: int) -> nn.Module:
    """The front end followed by the head's ``fixed`` leading layers: what the features hold."""
    if fixed == 0:
        return frontend
    return nn.Sequential(OrderedDict([("frontend", frontend), *list(head.named_children())[:fixed]]))


def _trained_part(head: nn.Module, fixed: int, sample: torch.Tensor) -> nn.Module:
    """``head`` after its ``fixed`` layers, with adaptive pools that are the identity on ``sample``'s maps
    skipped; the layers (and the names in the state dict) are ``head``'s own. ``head`` itself if nothing goes."""
    if type(head) is not nn.Sequential:
        return head
    layers, skipped = OrderedDict(), False
    with in_mode(head, training=False), torch.no_grad():  # shapes only: no running statistics may move
        for name, layer in list(head.named_children())[fixed:]:
            if isinstance(layer, IDENTITY_POOLS) and _is_identity(layer, sample.shape):
                layer, skipped = nn.Identity(), True
            else:
                sample = layer(sample)
            layers[name] = layer
    return head if fixed == 0 and not skipped else nn.Sequential(layers)


def _is_identity(pool: nn.Module, shape: torch.Size) -> bool:
    size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
    return (len(shape) >= 3 and not getattr(pool, "return_indices", False)
            and all(wanted in (None, side) for wanted, side in zip(size, shape[-2:])))


def _fixed_count(head: nn.Module, trained: nn.Module) -> int | None:
    """How many leading layers of ``head`` the features hold when ``trained`` (or a copy of it) trains on them;
    None when ``trained`` is not ``head`` or its rest."""
    if trained is head:
        return 0
    names, rest = list(head._modules), list(trained._modules)
    if type(head) is not nn.Sequential or not isinstance(trained, nn.Sequential) or not rest:
        return None
    fixed = len(names) - len(rest)
    return fixed if fixed >= 0 and names[fixed:] == rest else None


def cache_free_bytes() -> int:
    """Free bytes on the disk of the cache folder (of its nearest existing parent before it is made)."""
    folder = cache_root() / CACHE_FOLDER
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def cache_refusal(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                  max_bytes: int = MAX_FEATURE_BYTES) -> str | None:
    """Why ``model``'s front end cannot (or should not) be cached for ``train_set``; None when it can.

    ``augmented``: the DP-SGD steps draw augmented views of the examples (any augmentation,
    multiplicity included); caching is then refused. Features above ``max_bytes`` go to a file,
    refused only when the cache folder's disk lacks the room.
    """
    parts = _parts(model)
    if parts is None:
        return f"{type(model).__name__} has no fixed front end (submodules 'frontend' and 'head')"
    frontend, head = parts
    if augmented:
        return "the training images are augmented: each augmented view must go through the front end when drawn"
    trainable = [name for name, param in frontend.named_parameters() if param.requires_grad]
    if trainable:
        return f"the front end has trainable parameters ({', '.join(trainable)}); DP-SGD must train them"
    head_params = {id(param) for param in head.parameters()}
    outside = [name for name, param in model.named_parameters()
               if param.requires_grad and id(param) not in head_params]
    if outside:
        return f"trainable parameters outside the head ({', '.join(outside)}) would not be trained"
    if in_memory_tensors(train_set) is None:
        transform = random_transform(train_set)
        if transform:
            return f"the dataset applies a random transform ({transform}) when read: one view would be frozen"
    if len(train_set) == 0:
        return "the training set is empty"
    cached = _cached_part(frontend, head, _fixed_layers(head))
    with in_mode(cached, training=False), torch.no_grad():  # a size estimate must not update running statistics
        one = cached(stack_items(train_set, [0]).to(_device(model)))
    size = one.element_size() * one.numel() * len(train_set)
    folder = cache_root() / CACHE_FOLDER
    if size > max_bytes and size > cache_free_bytes():
        return (f"its features would take {size / 2**30:.1f} GiB: more than {max_bytes / 2**30:.1f} GiB in memory, "
                f"and more than the disk of the cache folder {folder} has free")
    return None


def _device(model: nn.Module) -> torch.device:
    return next((tensor.device for tensor in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _buffer_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {name: (buffer, buffer._version) for name, buffer in module.named_buffers()}


def _cache_folder() -> Path:
    folder = cache_root() / CACHE_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def private_file_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor backed by a new owner-only file of the cache folder, unlinked at once: the kernel writes
    its pages to the file instead of holding them in memory, and the file goes with the tensor's last reference,
    or with the process however it ends; no other run can open it."""
    numel = math.prod(shape)
    try:
        path = _cache_folder() / f"private-{secrets.token_hex(8)}.features"
        descriptor = open_private(path, os.O_RDWR | os.O_EXCL)
    except OSError as exc:
        raise DPImgSynError(f"cannot write the front end's features to the cache folder ({exc.strerror}: "
                            f"{exc.filename}); point ${CACHE_ENV} to a writable local folder") from None
    try:
        path.unlink()
        os.ftruncate(descriptor, numel * dtype.itemsize)
        mapped = mmap.mmap(descriptor, numel * dtype.itemsize)
    finally:
        os.close(descriptor)
    return torch.frombuffer(mapped, dtype=dtype, count=numel).view(shape)


@torch.no_grad()
def rows_in_order(compute: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, device: torch.device,
                  batch_size: int, max_bytes: int = MAX_FEATURE_BYTES, num_workers: int | None = None,
                  progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(compute(images), labels)`` of every item, in order, batch by batch into one CPU tensor (no second copy at
    the end), in memory up to ``max_bytes``, else in an unlinked file (:func:`private_file_tensor`).
    ``num_workers``: loader workers (None: the device's default); ``progress``: a bar's label (None: no bar)."""
    features, labels, start = None, [], 0
    workers = default_workers(device) if num_workers is None else num_workers
    for images, batch_labels in tqdm(sequential_batches(dataset, batch_size, workers), desc=progress, unit="batch",
                                     total=-(-len(dataset) // batch_size), disable=progress is None):
        batch = compute(images.to(device)).cpu()  # one read of the device per batch, into the host tensor
        if features is None:
            shape = (len(dataset), *batch.shape[1:])
            small = math.prod(shape) * batch.element_size() <= max_bytes
            features = torch.empty(shape, dtype=batch.dtype) if small else private_file_tensor(shape, batch.dtype)
        features[start:start + len(batch)] = batch
        labels.append(batch_labels)
        start += len(batch)
    return features, torch.cat(labels)


def cache_front_end(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                    device: torch.device | str = "cpu", batch_size: int = BATCH_SIZE,
                    max_bytes: int = MAX_FEATURE_BYTES, public: bool = False) -> tuple[nn.Module, TensorDataset]:
    """``(trained, features)``: train the head's trained part on the features instead of the model on the images.

    ``model`` is moved to ``device``, where the front end runs. ``features`` holds
    ``(fixed(model.frontend(image)), label)`` for every example of ``train_set``, in its order, on the CPU
    (the trainer moves each batch to its device); ``fixed`` are the head's leading parameter-free per-example
    layers. ``trained`` is ``model.head``, or the rest of it after those layers (with identity pools skipped),
    made of the head's own layers: training it trains ``model``, whose ``state_dict()`` is then the one to
    save and which evaluates on images as before. The front end runs in training mode, as DP-SGD would run it.
    ``public``: ``train_set``'s images are not private (a release): see :func:`training_inputs`.
    Raises :class:`DPImgSynError` where :func:`cache_refusal` gives a reason (``augmented`` among
    them), and where the front end turns out not to be a fixed per-example function: it changed a
    buffer, an example alone got other features than in its batch, or ``model(x)`` is not
    ``head(frontend(x))``.
    """
    reason = cache_refusal(model, train_set, augmented=augmented, max_bytes=max_bytes)
    if reason:
        raise DPImgSynError(f"cannot cache the front end of {type(model).__name__}: {reason}")
    return _cached(model, train_set, torch.device(device), batch_size, max_bytes, public)[:2]


def training_inputs(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                    device: torch.device | str = "cpu", public: bool = False,
                    max_bytes: int = MAX_FEATURE_BYTES) -> tuple[nn.Module, Dataset]:
    """What to train: ``(trained, features)`` where :func:`cache_refusal` allows it (see
    :func:`cache_front_end`), else ``(model, train_set)`` unchanged. Says which path it takes, in one line,
    for a model with a front end.

    ``public``: the images are not private (a release's, DP outputs): their features are kept in the cache
    folder, keyed by the images' content and the front end, and read by every later run on the same images.
    """
    reason = cache_refusal(model, train_set, augmented=augmented, max_bytes=max_bytes)
    if reason is not None:
        if _parts(model) is not None:
            _say(f"{type(model).__name__} trains whole, on the images: its front end is not cached ({reason})")
        return model, train_set
    trained, features, where = _cached(model, train_set, torch.device(device), BATCH_SIZE, max_bytes, public)
    fixed = ", ".join(["frontend"] + [f"head.{name}" for name in list(model.head._modules)[
        :_fixed_count(model.head, trained)]])
    _say(f"{type(model).__name__} trains its head on cached features ({fixed}) of {len(features)} examples, "
         f"{where}")
    return trained, features


def _say(line: str) -> None:
    """One line on the terminal (the first process of a torchrun job) and in the stage's log."""
    logging.getLogger("dpimgsyn").info(line)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)


def _size(features: torch.Tensor) -> str:
    return f"{features.nbytes / 2**20:,.1f} MiB"


def _cached(model: nn.Module, train_set: Dataset, device: torch.device, batch_size: int, max_bytes: int,
            public: bool) -> tuple[nn.Module, TensorDataset, str]:
    """:func:`cache_front_end` once :func:`cache_refusal` has found no reason against it; also says where the
    features are."""
    frontend, head = _parts(model)
    fixed = _fixed_layers(head)
    cached = _cached_part(frontend, head, fixed)
    tensors = in_memory_tensors(train_set)
    key = _content_key(cached, tensors[0]) if public and tensors is not None else None
    checked = range(min(CHECKED_EXAMPLES, len(train_set)))
    with in_mode(model.to(device), training=True):
        refuse_batch_statistics(cached.named_modules())
        before = _buffer_versions(cached)
        with torch.no_grad():  # read again, item by item: a dataset that draws when read gets caught here too
            alone = torch.cat([cached(stack_items(train_set, [index]).to(device)).cpu() for index in checked])
        features = None if key is None else _shared_features(key, len(train_set), alone)
        if features is None:
            features, labels = rows_in_order(cached, train_set, device, batch_size, max_bytes)
            where = (f"in memory ({_size(features)})" if features.nbytes <= max_bytes else
                     f"in an owner-only file of the cache folder, removed with the run ({_size(features)})")
            if key is not None and _keep_shared(key, features):
                where += ", also kept in the cache folder for later runs on these images"
        else:
            labels = tensors[1].clone()
            where = f"read from the cache folder, where an earlier run kept them for these images ({_size(features)})"
        after = _buffer_versions(cached)
        trained = _trained_part(head, fixed, features[:1].to(device))
        model.eval()  # a head with dropout would differ between two passes in training mode
        with torch.no_grad():
            sample = stack_items(train_set, list(checked)).to(device)
            whole, composed = model(sample).cpu(), trained(features[:len(checked)].to(device)).cpu()
    changed = sorted(name for name in before.keys() | after.keys()
                     if name not in before or name not in after or before[name][0] is not after[name][0]
                     or before[name][1] != after[name][1])
    problem = None
    if changed:
        problem = f"it changed its buffer {changed[0]!r}"
    elif not torch.allclose(alone, features[:len(alone)], rtol=RTOL, atol=ATOL * float(features.abs().max())):
        problem = ("an example alone gets other features than within its batch (batch statistics, or randomness "
                   "in the front end or in reading the dataset)")
    elif not torch.allclose(whole, composed, rtol=RTOL, atol=ATOL * float(whole.abs().max())):
        problem = "the model's output is not head(frontend(x))"
    if problem:
        raise DPImgSynError(f"cannot cache the front end of {type(model).__name__}: {problem}; train the whole "
                            "model on the images")
    return trained, TensorDataset(features, labels), where


def _content_key(cached: nn.Module, images: torch.Tensor) -> str:
    """What a release's features depend on: the images' bytes, shape and dtype, and the cached layers (their
    classes and settings)."""
    digest = hashlib.sha256()
    names = [f"{type(module).__module__}.{type(module).__qualname__}" for module in cached.modules()]
    digest.update(repr((names, repr(cached), tuple(images.shape), str(images.dtype))).encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def _shared_path(key: str) -> Path:
    return cache_root() / CACHE_FOLDER / f"release-{key[:40]}.pt"


def _shared_features(key: str, count: int, alone: torch.Tensor) -> torch.Tensor | None:
    """A release's features kept by an earlier run (memory-mapped), if they are these images' and agree with
    ``alone``, the first examples' features computed now; else None."""
    path = _shared_path(key)
    try:
        kept = torch.load(path, mmap=True, weights_only=True)
        features = kept["features"]
        os.utime(path)  # recently used: the last to go
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return None
    if kept.get("key") != key or len(features) != count or features.dtype != alone.dtype:
        return None
    scale = float(alone.abs().max())
    if not torch.allclose(alone, features[:len(alone)], rtol=RTOL, atol=ATOL * scale):
        return None
    return features


def _keep_shared(key: str, features: torch.Tensor) -> bool:
    """Keep a release's features (owner-only), unless the disk is short of room; the least recently used beyond
    :data:`MAX_SHARED_BYTES` go."""
    path = _shared_path(key)
    try:
        folder = _cache_folder()
        if features.nbytes > cache_free_bytes() // 2:
            return False
        atomic_torch_save({"key": key, "features": features}, path, private=True)
    except OSError:  # a cache folder that cannot be written: this run computed them, later ones will again
        return False
    kept = []
    for other in folder.glob("release-*.pt"):
        try:
            kept.append((other.stat().st_mtime, other.stat().st_size, other))
        except FileNotFoundError:  # another run removed it
            continue
    total = 0
    for _, size, other in sorted(kept, reverse=True):
        total += size
        if total > MAX_SHARED_BYTES and other != path:
            other.unlink(missing_ok=True)
    return True


def scoring_features(model: nn.Module, trained: nn.Module, dataset: Dataset, device: torch.device | str,
                     batch_size: int = BATCH_SIZE, max_bytes: int = MAX_FEATURE_BYTES) -> TensorDataset | None:
    """``(fixed(model.frontend(image)), label)`` for every example of an evaluation set, computed once.

    Where ``trained`` is trained on cached features (:func:`training_inputs`), scoring it (or a moving
    average of it) on these features gives the accuracy of the whole network on the images, without
    running the front end at every evaluation: :func:`cache_front_end` checked that ``model(x)`` is
    ``trained(fixed(frontend(x)))``. None where ``trained`` is the whole model, or where the
    features would exceed ``max_bytes``: score the whole network on the images then.
    """
    parts = _parts(model)
    fixed = None if parts is None or trained is model else _fixed_count(parts[1], trained)
    if fixed is None or len(dataset) == 0:
        return None
    cached = _cached_part(parts[0], parts[1], fixed)
    features, labels = [], []
    with in_mode(cached, training=False), torch.no_grad():
        for images, batch_labels in sequential_batches(dataset, batch_size):
            features.append(cached(images.to(device)).cpu())
            labels.append(batch_labels)
            if features[0][0].nbytes * len(dataset) > max_bytes:
                return None
    return TensorDataset(torch.cat(features), torch.cat(labels))


class FrontEndAndHead(nn.Module):
    """``head(frontend(x))`` with the state-dict keys of the model both came from (``head.*``)."""

    def __init__(self, frontend: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.frontend, self.head = frontend, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))


def whole_model(model: nn.Module, trained: nn.Module) -> nn.Module:
    """The network to evaluate and save after training on cached features: ``model`` itself when ``trained``
    is its head or the head's trained part (:func:`training_inputs`), else ``model``'s front end followed by
    ``trained`` (e.g. the moving average of the trained part) behind the head's fixed layers and pools."""
    frontend, head = _parts(model)
    own = [*head.parameters(), *head.buffers()]
    mine = [*trained.parameters(), *trained.buffers()]
    if trained is head or (len(own) == len(mine) and all(a is b for a, b in zip(own, mine))):
        return model
    fixed = _fixed_count(head, trained)
    if fixed is None:  # a copy of a head that is not a plain sequence of layers
        return FrontEndAndHead(frontend, trained)
    # The head's own fixed layers and pools (parameter-free), the trained part's other layers.
    layers = OrderedDict((name, layer if index < fixed or isinstance(layer, IDENTITY_POOLS) else trained._modules[name])
                         for index, (name, layer) in enumerate(head.named_children()))
    return FrontEndAndHead(frontend, nn.Sequential(layers))
