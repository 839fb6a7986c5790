"""A GroupNorm wrapper that records the statistics of its input.

Stage 2 needs, per private example, the per-channel spatial mean of every normalization
layer's input and of its square ("capture" mode); stage 3 needs each layer to compare the
statistics of a synthetic batch with the released DP ones ("synthesis" mode). The wrapped
GroupNorm's output is never changed, so the teacher's predictions are identical in every mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.errors import DPImgSynError

MODES = ("off", "capture", "synthesis")


class StatNorm(nn.Module):
    """Wraps one ``nn.GroupNorm`` (as ``self.group_norm``); ``forward`` always returns ``group_norm(x)``.

    - ``"off"``: plain GroupNorm.
    - ``"capture"``: stores ``self.per_sample``, a ``(B, 2C)`` float32 tensor holding, per example,
      the spatial mean of ``x`` per channel followed by the spatial mean of ``x**2`` per channel.
      It stays attached to the autograd graph only when gradients are enabled.
    - ``"synthesis"``: compares the batch's per-channel mean and (biased) variance over (N, H, W)
      with the buffers ``dp_mean``/``dp_var`` and stores
      ``self.matching_loss = ||mean - dp_mean||_2 + ||var - dp_var||_2`` (DeepInversion's feature
      loss). The buffers are only ever written by :func:`load_dp_statistics`.

    ``dp_mean``/``dp_var`` start as NaN, meaning "no statistics loaded", so that synthesis against
    placeholder values is refused instead of silently optimizing towards zeros.
    """

    def __init__(self, group_norm: nn.GroupNorm, device: torch.device | None = None) -> None:
        super().__init__()
        self.group_norm = group_norm
        channels = group_norm.num_channels
        # On the model's device: a model already moved to a GPU gets its stat layers there too (a
        # GroupNorm without affine parameters has no device of its own, so the caller may give it).
        device = next((tensor.device for tensor in group_norm.parameters()), device)
        self.register_buffer("dp_mean", torch.full((channels,), float("nan"), device=device))
        self.register_buffer("dp_var", torch.full((channels,), float("nan"), device=device))
        self.mode = "off"
        self.per_sample: Tensor | None = None
        self.matching_loss: Tensor | None = None

    @property
    def num_channels(self) -> int:
        return self.group_norm.num_channels

    def has_dp_statistics(self) -> bool:
        return bool(torch.isfinite(self.dp_mean).all() and torch.isfinite(self.dp_var).all())

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise DPImgSynError(f"unknown statistics mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "synthesis" and not self.has_dp_statistics():
            raise DPImgSynError("synthesis needs DP statistics, but none are loaded; "
                                "use a teacher checkpoint written by save_dp_db_stats.py")
        self.mode = mode
        self.per_sample = None
        self.matching_loss = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "capture":
            self.per_sample = per_sample_moments(x)
        elif self.mode == "synthesis":
            norm = self.group_norm
            output, mean, second = _NormAndMoments.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
            var = second - mean * mean
            self.matching_loss = (torch.linalg.vector_norm(mean - self.dp_mean)
                                  + torch.linalg.vector_norm(var - self.dp_var))
            return output
        return self.group_norm(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def per_sample_moments(x: Tensor) -> Tensor:
    """``(B, 2C)``: per example, per-channel spatial mean of ``x`` then of ``x**2`` (float32).

    A mean and a norm reduction, without materializing ``x**2`` (and much faster than
    ``var_mean`` on CPU): capture must stay cheap next to the forward pass it rides on.
    """
    flat = (x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)).float()  # (N, C, L): every spatial position along L
    squared_norm = torch.linalg.vector_norm(flat, dim=2).square()
    return torch.cat([flat.mean(dim=2), squared_norm / flat.shape[2]], dim=1)


class _NormAndMoments(torch.autograd.Function):
    """GroupNorm of x, and x's per-channel mean and mean square over batch and space, in one node.

    The moments' gradient is affine in x per channel (a + b * x); the backward adds it in place to
    GroupNorm's input gradient instead of forming it as a second full-size tensor for autograd to
    add. ``var_mean`` over (N, H, W) with its autograd backward took a quarter of a synthesis step
    on CPU. Computed in at least float32, as GroupNorm runs under autocast.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        batch, channels = x.shape[:2]
        flat = x.reshape(batch, channels, -1).to(torch.promote_types(x.dtype, torch.float32))
        positions = flat.shape[2]
        output, mean, rstd = torch.native_group_norm(flat.view(x.shape), weight, bias, batch, channels,
                                                     positions, groups, eps)
        ctx.save_for_backward(flat, weight, mean, rstd)
        ctx.groups, ctx.shape, ctx.dtype = groups, x.shape, x.dtype
        count = batch * positions
        return (output, flat.sum(dim=2).sum(dim=0) / count,
                torch.linalg.vector_norm(flat, dim=2).square().sum(dim=0) / count)

    @staticmethod
    def backward(ctx, grad_output: Tensor | None, grad_mean: Tensor | None, grad_second: Tensor | None):
        flat, weight, mean, rstd = ctx.saved_tensors
        batch, channels, positions = flat.shape
        grad_weight = grad_bias = None
        if grad_output is None:
            grad_input = torch.zeros_like(flat)
        else:
            mask = [True, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
                grad_output.contiguous(), flat.view(grad_output.shape), mean, rstd, weight, batch, channels,
                positions, ctx.groups, mask)
            grad_input = grad_input.view(batch, channels, positions)
        count = batch * positions
        if grad_second is not None:
            grad_input.addcmul_(flat, (2 * grad_second / count).view(1, -1, 1))
        if grad_mean is not None:
            grad_input.add_((grad_mean / count).view(1, -1, 1))
        return grad_input.view(ctx.shape).to(ctx.dtype), grad_weight, grad_bias, None, None


def stat_layers(model: nn.Module) -> dict[str, StatNorm]:
    """Every :class:`StatNorm` of ``model`` by qualified name, in module registration order.

    This order is THE order of the concatenated per-sample statistic vector.
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, StatNorm)}


def attach_stat_layers(model: nn.Module) -> dict[str, StatNorm]:
    """Replace every ``nn.GroupNorm`` of ``model`` in place by a :class:`StatNorm` wrapping it.

    Idempotent (layers already wrapped are kept); a GroupNorm shared by several parents gets one
    shared wrapper. Returns :func:`stat_layers`.
    """
    if isinstance(model, (nn.GroupNorm, StatNorm)):
        raise DPImgSynError("attach_stat_layers needs a model that contains GroupNorm layers, not a single layer")
    wrappers: dict[int, StatNorm] = {}
    device = next((tensor.device for tensor in model.parameters()), None)
    for parent in list(model.modules()):
        if isinstance(parent, StatNorm):
            continue
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                wrapper = wrappers.setdefault(id(child), StatNorm(child, device))
                setattr(parent, child_name, wrapper)
    layers = stat_layers(model)
    if not layers:
        raise DPImgSynError("the model has no GroupNorm layers, so it has no normalization statistics; "
                            "use a GroupNorm teacher (BatchNorm replaced by GroupNorm, as train_dp.py does)")
    return layers


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every stat layer of ``model`` to ``mode`` (one of :data:`MODES`)."""
    layers = stat_layers(model)
    if not layers:
        raise DPImgSynError("the model has no stat layers; call attach_stat_layers(model) first")
    for layer in layers.values():
        layer.set_mode(mode)


def load_dp_statistics(model: nn.Module, stats: dict[str, dict[str, Tensor]]) -> None:
    """Copy released statistics ``{layer name: {"mean": (C,), "var": (C,)}}`` into the synthesis buffers."""
    layers = stat_layers(model)
    missing = sorted(set(layers) - set(stats))
    unexpected = sorted(set(stats) - set(layers))
    if missing or unexpected:
        raise DPImgSynError(f"DP statistics do not fit this model (missing layers: {missing or 'none'}; "
                            f"unknown layers: {unexpected or 'none'}); use statistics computed for this teacher")
    for name, layer in layers.items():
        for key, buffer in (("mean", layer.dp_mean), ("var", layer.dp_var)):
            value = torch.as_tensor(stats[name][key], dtype=torch.float32)
            if value.shape != buffer.shape:
                raise DPImgSynError(f"DP statistics for layer {name!r}: {key} has shape {tuple(value.shape)}, "
                                    f"the layer has {layer.num_channels} channels")
            if not torch.isfinite(value).all() or (key == "var" and not (value > 0).all()):
                raise DPImgSynError(f"DP statistics for layer {name!r}: {key} holds non-finite or, "
                                    "for a variance, non-positive values; the statistics file is corrupt")
            buffer.copy_(value)


def matching_loss(model: nn.Module) -> Tensor:
    """Sum over stat layers of their ``matching_loss`` from the last forward in synthesis mode."""
    layers = stat_layers(model)
    losses = [layer.matching_loss for layer in layers.values()]
    if not layers or any(loss is None for loss in losses):
        raise RuntimeError("matching_loss needs a forward pass in synthesis mode first "
                           "(set_mode(model, 'synthesis'), then model(x))")
    return torch.stack(losses).sum()
