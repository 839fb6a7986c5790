"""DP-SGD on a fixed front end's precomputed outputs: the same mechanism, run once per example.

A model such as ``scatter_cnn`` is ``head(frontend(x))``, where ``frontend`` (a scattering transform)
is a fixed function of each example alone: no trainable parameter, no statistics of the batch, no
randomness. DP-SGD's gradient of example i over the trainable parameters, all in ``head``, is then
the gradient of ``loss(head(f_i), y_i)`` with ``f_i = frontend(x_i)``: training ``head`` on the
features gives every example the same gradient, hence the same clipped sum and the same noise. The
Poisson sampling still runs over the same N records, so the privacy analysis (and the ledger) is
unchanged. Only the cost changes: the front end runs once per example instead of once per example
and epoch. The features are a private, local intermediate, like the images: never written anywhere.

It does not apply to augmented data: each augmented view of an example must go through the front
end when it is drawn, and caching one view would train on the unaugmented images instead. It
also needs the training set in memory (a per-item dataset may transform images as it reads them).
:func:`cache_refusal` says why it does not apply; the caller then trains the whole model on images.

Usage (stages 1 and 4)::

    trained, data = training_inputs(model, train_set, augmented=augmenting, device=device)
    trainer = DPSGDTrainer(trained, data, config, device, seed)  # trains model.head in place
    test_features = scoring_features(model, trained, test_set, device)  # None: score the images
    ...
    save model.state_dict(), the whole model's (the head's weights under ``head.``)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from common.batches import in_memory_tensors, sequential_batches
from common.errors import DPImgSynError
from privacy.clipping import refuse_batch_statistics

# Larger feature sets are not cached (the whole model trains on images instead): the features of
# 50,000 CIFAR-10 images under scatter_cnn take 3.1 GB, those of a 224-pixel set ten times more.
MAX_FEATURE_BYTES = 4 << 30
BATCH_SIZE = 256
# Examples whose features are recomputed alone and compared with their batched values.
CHECKED_EXAMPLES = 2
# Batched and single-example FFTs and matrix products round differently.
RTOL, ATOL = 1e-4, 1e-5


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    frontend, head = getattr(model, "frontend", None), getattr(model, "head", None)
    if isinstance(frontend, nn.Module) and isinstance(head, nn.Module):
        return frontend, head
    return None


def cache_refusal(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                  max_bytes: int = MAX_FEATURE_BYTES) -> str | None:
    """Why ``model``'s front end cannot (or should not) be cached for ``train_set``; None when it can.

    ``augmented``: the DP-SGD steps draw augmented views of the examples (any augmentation,
    multiplicity included); caching is then refused.
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
    tensors = in_memory_tensors(train_set)
    if tensors is None:
        return "the training set is not held in memory (a per-item dataset may transform its images when read)"
    if len(tensors[0]) == 0:
        return "the training set is empty"
    was_training = frontend.training
    frontend.eval()  # a size estimate must not update any running statistics
    try:
        with torch.no_grad():
            one = frontend(tensors[0][:1].to(_device(model)))
    finally:
        frontend.train(was_training)
    size = one.element_size() * one.numel() * len(tensors[0])
    if size > max_bytes:
        return f"its features would take {size / 2**30:.1f} GiB (more than {max_bytes / 2**30:.1f} GiB)"
    return None


def _device(model: nn.Module) -> torch.device:
    return next((tensor.device for tensor in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _buffer_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {name: (buffer, buffer._version) for name, buffer in module.named_buffers()}


@torch.no_grad()
def _features(frontend: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """The front end's outputs, batch by batch, written into one CPU tensor (no second copy at the end)."""
    features = None
    for start in range(0, len(images), batch_size):
        batch = frontend(images[start:start + batch_size].to(device))
        if features is None:
            features = torch.empty((len(images), *batch.shape[1:]), dtype=batch.dtype)
        features[start:start + len(batch)] = batch
    return features


def cache_front_end(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                    device: torch.device | str = "cpu", batch_size: int = BATCH_SIZE,
                    max_bytes: int = MAX_FEATURE_BYTES) -> tuple[nn.Module, TensorDataset]:
    """``(model.head, features)``: train the head on the features instead of the model on the images.

    ``model`` is moved to ``device``, where the front end runs. ``features`` holds
    ``(model.frontend(image), label)`` for every example of ``train_set``, in its order, in memory on
    the CPU (the trainer moves each batch to its device). The head is the model's own submodule:
    training it trains ``model``, whose ``state_dict()`` is then the one to save and which evaluates
    on images as before. The front end runs in training mode, as DP-SGD would run it.
    Raises :class:`DPImgSynError` where :func:`cache_refusal` gives a reason (``augmented`` among
    them), and where the front end turns out not to be a fixed per-example function: it changed a
    buffer, an example alone got other features than in its batch, or ``model(x)`` is not
    ``head(frontend(x))``.
    """
    reason = cache_refusal(model, train_set, augmented=augmented, max_bytes=max_bytes)
    if reason:
        raise DPImgSynError(f"cannot cache the front end of {type(model).__name__}: {reason}")
    return _cached(model, train_set, torch.device(device), batch_size)


def training_inputs(model: nn.Module, train_set: Dataset, *, augmented: bool = False,
                    device: torch.device | str = "cpu") -> tuple[nn.Module, Dataset]:
    """What to train: ``(model.head, features)`` where :func:`cache_refusal` allows it (see
    :func:`cache_front_end`), else ``(model, train_set)`` unchanged."""
    if cache_refusal(model, train_set, augmented=augmented) is not None:
        return model, train_set
    return _cached(model, train_set, torch.device(device), BATCH_SIZE)


def _cached(model: nn.Module, train_set: Dataset, device: torch.device, batch_size: int
            ) -> tuple[nn.Module, TensorDataset]:
    """:func:`cache_front_end` once :func:`cache_refusal` has found no reason against it."""
    frontend, head = _parts(model)
    images, labels = in_memory_tensors(train_set)
    was_training = model.training
    model.to(device).train()
    try:
        refuse_batch_statistics(frontend.named_modules())
        before = _buffer_versions(frontend)
        features = _features(frontend, images, device, batch_size)
        alone = torch.cat([_features(frontend, images[index:index + 1], device, 1)
                           for index in range(min(CHECKED_EXAMPLES, len(images)))])
        after = _buffer_versions(frontend)
        model.eval()  # a head with dropout would differ between two passes in training mode
        with torch.no_grad():
            sample = images[:CHECKED_EXAMPLES].to(device)
            whole, composed = model(sample).cpu(), head(features[:CHECKED_EXAMPLES].to(device)).cpu()
    finally:
        model.train(was_training)
    changed = sorted(name for name in before.keys() | after.keys()
                     if name not in before or name not in after or before[name][0] is not after[name][0]
                     or before[name][1] != after[name][1])
    problem = None
    if changed:
        problem = f"it changed its buffer {changed[0]!r}"
    elif not torch.allclose(alone, features[:len(alone)], rtol=RTOL, atol=ATOL * float(features.abs().max())):
        problem = "an example alone gets other features than within its batch (batch statistics or randomness)"
    elif not torch.allclose(whole, composed, rtol=RTOL, atol=ATOL * float(whole.abs().max())):
        problem = "the model's output is not head(frontend(x))"
    if problem:
        raise DPImgSynError(f"cannot cache the front end of {type(model).__name__}: {problem}; train the whole "
                            "model on the images")
    return head, TensorDataset(features, labels.clone())


def scoring_features(model: nn.Module, trained: nn.Module, dataset: Dataset, device: torch.device | str,
                     batch_size: int = BATCH_SIZE, max_bytes: int = MAX_FEATURE_BYTES) -> TensorDataset | None:
    """``(model.frontend(image), label)`` for every example of an evaluation set, computed once.

    Where ``trained`` is ``model``'s head on cached features (:func:`training_inputs`), scoring the
    head (or a moving average of it) on these features gives the accuracy of the whole network on
    the images, without running the front end at every evaluation: :func:`cache_front_end` checked
    that ``model(x)`` is ``head(frontend(x))``. None where ``trained`` is the whole model, or where the
    features would exceed ``max_bytes``: score the whole network on the images then.
    """
    parts = _parts(model)
    if trained is model or parts is None or parts[1] is not trained or len(dataset) == 0:
        return None
    frontend = parts[0]
    was_training = frontend.training
    frontend.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for images, batch_labels in sequential_batches(dataset, batch_size):
                features.append(frontend(images.to(device)).cpu())
                labels.append(batch_labels)
                if features[0][0].nbytes * len(dataset) > max_bytes:
                    return None
    finally:
        frontend.train(was_training)
    return TensorDataset(torch.cat(features), torch.cat(labels))


class FrontEndAndHead(nn.Module):
    """``head(frontend(x))`` with the state-dict keys of the model both came from (``head.*``)."""

    def __init__(self, frontend: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.frontend, self.head = frontend, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))


def whole_model(model: nn.Module, head: nn.Module) -> nn.Module:
    """The network to evaluate and save after training ``head`` on cached features: ``model`` itself
    when ``head`` is its own head, else ``model``'s front end followed by ``head`` (e.g. the
    moving average of the trained head)."""
    frontend, own_head = _parts(model)
    return model if head is own_head else FrontEndAndHead(frontend, head)
