"""The definition the per-example tests hold every engine to: one backward pass per example."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# As Opacus's flat clipping and privacy.clipping: an all-zero gradient gets factor 1.
NORM_EPSILON = 1e-6


def per_example_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          views: int = 1) -> list[list[torch.Tensor]]:
    """Each example's own loss gradient over the trainable parameters (zeros where a layer is unused).

    With ``views`` > 1, each run of that many consecutive rows is one example (augmentation
    multiplicity): its loss is the mean of its views' losses."""
    params = [param for param in model.parameters() if param.requires_grad]
    gradients = []
    for image, label in zip(images.split(views), labels.split(views)):
        grads = torch.autograd.grad(F.cross_entropy(model(image), label), params, allow_unused=True)
        gradients.append([torch.zeros_like(param) if grad is None else grad for param, grad in zip(params, grads)])
    return gradients


def clipped_sum(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                max_norm: float, views: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B,) gradient norms, and sum_i min(1, C / ||g_i||) g_i per trainable parameter."""
    gradients = per_example_gradients(model, images, labels, views)
    norms = torch.stack([torch.sqrt(sum(grad.square().sum() for grad in grads)) for grads in gradients])
    total = [torch.zeros_like(grad) for grad in gradients[0]]
    for grads, norm in zip(gradients, norms):
        for accumulated, grad in zip(total, grads):
            accumulated += grad * min(1.0, max_norm / (float(norm) + NORM_EPSILON))
    return norms, total
