"""Per-example gradient clipping in one backward pass: DP-SGD's default engine (stage 1).

A DP-SGD step needs ``sum_i min(1, C / ||g_i||) g_i``, where ``g_i`` is example i's gradient over
every trainable parameter. Opacus's hook modes store every ``g_i`` (B copies of the model), and
autograd also computes the summed gradient, which they discard. Here the backward pass computes
only the gradients with respect to each layer's *output*; from those and the layer's recorded
input, a rule per layer type gives the squared per-example norms of that layer's parameter
gradients and, once the clip factors are known, the layer's clipped sum directly.

Each rule is exact (a test compares it with one backward pass per example) and picks the cheaper
of two methods per layer:

* materialize: the layer's per-example gradients, formed block by block of examples so that the
  im2col buffer of a convolution stays small; the clipped sum is then their weighted sum.
* ghost norm, for convolutions with few output positions T: with A_i the unfolded input (T x D)
  and G_i the output gradient (T x C), ``||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>``, which costs
  T^2 (C + D) instead of a C x D gradient per example; the clipped sum is then one matrix product
  of the factor-scaled output gradients with the unfolded inputs per block of examples.

Privacy: the sensitivity bound holds when each example enters the sum through the very vector
whose norm was clipped. Materialized layers use the same tensor for both; ghost layers compute the
norm and the sum by two exact formulas that agree up to floating-point rounding (Opacus's ghost
clipping makes the same trade). Both are matrix products at torch's matmul precision (full float32
by default), never cuDNN convolutions, whose TF32 default on recent GPUs would make them disagree
by ~1e-3. Only layer types with a rule are
accepted: a trainable parameter anywhere else would enter the sum unclipped, so
:class:`PerExampleClipper` refuses such a model. It also refuses what breaks the bound outside the
layers: a parameter shared by two layers (each sees only part of an example's gradient), and a
forward pass that changes a buffer or normalizes by batch statistics (a function of the whole
private batch that no clipping bounds).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from common.errors import DPImgSynError

# Added to the norm before dividing, as Opacus's flat clipping does: an all-zero gradient gets factor 1.
NORM_EPSILON = 1e-6
# Ghost norms for a convolution when T^2 (C + D) < GHOST_RATIO * C * D. The materialized gradient
# is C * D numbers per example that are written and read back twice, so it loses well before the
# multiply-adds are equal; 32 splits ResNet-18's layers as measured on a CPU.
GHOST_RATIO = 32
# Bytes of per-example buffers (im2col, per-example gradients) formed at once: small enough to stay
# in a CPU's cache, large enough on a GPU to keep the device busy.
BLOCK_BYTES = {"cpu": 4 << 20}
DEFAULT_BLOCK_BYTES = 1 << 30
# Opacus's per-sample gradients handle what this engine refuses, under the same guarantee.
OTHER_MODE = "--grad_sample_mode hooks (teacher.grad_sample_mode: hooks in a pipeline config)"
# What to do about a forward pass that computes statistics of the batch (no engine can clip those).
FIXED_STATISTICS = ("replace it by GroupNorm (models.make_private_ready does) or put it in eval mode with fixed "
                    "statistics")


class LayerRule(Protocol):
    """Per-example gradient norms and clipped sums of one layer type's trainable parameters."""

    def check(self, module: nn.Module) -> str | None:
        """Why this instance is not supported, or None."""

    def squared_norms(self, module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor,
                      block_bytes: int, views: int) -> tuple[torch.Tensor, object]:
        """(B,) squared norms of the examples' gradients, and whatever the clipped sum reuses.

        The B * views rows of ``inputs`` and ``grads`` are B examples' ``views`` consecutive rows
        each, and an example's gradient is the sum over its rows. ``block_bytes`` bounds the
        per-example buffers formed at once."""

    def clipped_sums(self, module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor, kept: object,
                     factors: torch.Tensor, views: int) -> dict[nn.Parameter, torch.Tensor]:
        """sum_i factors[i] * (example i's gradient), for each trainable parameter of ``module``."""


def _trainable(param: nn.Parameter | None) -> bool:
    return param is not None and param.requires_grad


def _row_squares(rows: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example's slice: one pass, no temporary (unlike ``square().sum()``)."""
    return torch.linalg.vector_norm(rows.flatten(1), dim=1).square()


def _blocks(batch: int, block: int) -> Iterator[slice]:
    return (slice(start, start + block) for start in range(0, batch, block))


def _in_layout_of(param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s strides, as autograd leaves gradients.

    An all-reduce sums raw memory: a rank with an empty share sends ``zeros_like(param)``, so a
    transposed view on another rank would be summed with the wrong elements.
    """
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def _shared_parameters(model: nn.Module) -> list[str]:
    """One problem per trainable parameter registered in more than one place (tied weights).

    Each layer's rule sees only its own use of the parameter, so neither the norm nor the sum is
    the example's gradient. A module registered under two names is one module, not a sharing.
    """
    places: dict[nn.Parameter, list[str]] = {}
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if param.requires_grad:
                places.setdefault(param, []).append(f"{name}.{param_name}" if name else param_name)
    return [f"{names[0]} is also {' and '.join(names[1:])} (a shared parameter: each layer's norm is only part of "
            "an example's)" for names in places.values() if len(names) > 1]


def _batch_statistics(module: nn.Module) -> str | None:
    """Why ``module``, as it is now, computes statistics of the batch in its forward pass, or None."""
    if not (isinstance(module, _NormBase) and module.training):
        return None
    kind = type(module).__name__
    if isinstance(module, _BatchNorm):
        running = " and updates its running statistics" if module.track_running_stats else ""
        return f"{kind} normalizes by batch statistics{running} in training mode"
    if module.track_running_stats:
        return f"{kind} updates its running statistics in training mode"
    return None


def refuse_batch_statistics(named_modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse any module that, as it is now, mixes the examples of a batch (every per-example mode)."""
    for name, module in named_modules:
        reason = _batch_statistics(module)
        if reason:
            raise DPImgSynError(f"per-example clipping does not support {name or 'the model'}: {reason}; such "
                                "statistics depend on the whole private batch and no clipping bounds them; "
                                + FIXED_STATISTICS)


BufferState = dict[tuple[str, str], tuple[torch.Tensor, int]]


class LinearRule:
    """y = x W^T + b on (B, in) or (B, *, in) inputs."""

    def check(self, module: nn.Linear) -> str | None:
        return None

    def squared_norms(self, module, inputs, grads, block_bytes, views):
        if inputs.dim() == 2 and views == 1:  # the per-example weight gradient g a^T has rank one
            grad_squares = _row_squares(grads)
            squares = torch.zeros_like(grad_squares)
            if _trainable(module.weight):
                squares = squares + grad_squares * _row_squares(inputs)
            if _trainable(module.bias):
                squares = squares + grad_squares
            return squares, None
        # An example's rows (its views, each with its positions) become one (rows, features) matrix.
        batch = len(inputs) // views
        grads, inputs = grads.reshape(batch, -1, grads.shape[-1]), inputs.reshape(batch, -1, inputs.shape[-1])
        weight = torch.bmm(grads.transpose(1, 2), inputs) if _trainable(module.weight) else None
        bias = grads.sum(1) if _trainable(module.bias) else None
        squares = sum(_row_squares(part) for part in (weight, bias) if part is not None)
        return squares, (weight, bias)

    def clipped_sums(self, module, inputs, grads, kept, factors, views):
        sums = {}
        if kept is None:
            scaled = grads * factors[:, None]
            if _trainable(module.weight):
                sums[module.weight] = scaled.t() @ inputs
            if _trainable(module.bias):
                sums[module.bias] = scaled.sum(0)
            return sums
        for param, per_example in zip((module.weight, module.bias), kept):
            if per_example is not None:
                sums[param] = torch.tensordot(factors, per_example, dims=1)
        return sums


def pad(inputs: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The zero-padded input that ``conv`` slides over (padded once, then unfolded block by block)."""
    pad_h, pad_w = conv.padding
    return F.pad(inputs, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else inputs


def unfold(padded: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col of a padded input: (B, C_in * kh * kw, T), ordered as ``F.unfold`` and the weight are.

    Built from strided views and one copy, which is several times faster on a CPU than ``F.unfold``.
    """
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = conv.kernel_size, conv.stride, conv.dilation
    windows = padded.unfold(2, dilation_h * (kernel_h - 1) + 1, stride_h)
    windows = windows.unfold(3, dilation_w * (kernel_w - 1) + 1, stride_w)[..., ::dilation_h, ::dilation_w]
    batch, channels, out_h, out_w = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kernel_h * kernel_w, out_h * out_w)


def _by_example(rows: torch.Tensor, views: int) -> torch.Tensor:
    """(B * views, X, T) -> (B, X, views * T): an example's views side by side, as extra positions."""
    if views == 1:
        return rows
    batch = len(rows) // views
    return rows.reshape(batch, views, *rows.shape[1:]).transpose(1, 2).reshape(batch, rows.shape[1], -1)


def _rows_of(examples: slice, views: int) -> slice:
    return slice(examples.start * views, examples.stop * views)


class Conv2dRule:
    """Zero-padded, ungrouped 2-D convolutions (every convolution of the registry's models).

    An example's gradient is ``sum_t G_t A_t^T`` over its output positions t; its several views
    only add positions, so they are concatenated along that axis."""

    def check(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} ({module.padding_mode})"
        return None

    def squared_norms(self, module, inputs, grads, block_bytes, views):
        batch = len(inputs) // views
        grads = _by_example(grads.flatten(2), views)  # (B, C, T)
        channels, positions = grads.shape[1:]
        depth = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        bias = grads.sum(2) if _trainable(module.bias) else None
        squares = _row_squares(bias) if bias is not None else grads.new_zeros(batch)
        if not _trainable(module.weight):
            return squares, (None, bias, None, None)
        ghost = positions * positions * (channels + depth) < GHOST_RATIO * channels * depth
        block = max(1, min(batch, block_bytes // (inputs.element_size() * depth * positions)))
        padded = pad(inputs, module)
        weights = None if ghost else grads.new_empty(batch, depth, channels)
        for rows in _blocks(batch, block):
            columns = _by_example(unfold(padded[_rows_of(rows, views)], module), views)  # (b, D, T)
            if ghost:
                squares[rows] += (torch.bmm(columns.transpose(1, 2), columns)
                                  * torch.bmm(grads[rows].transpose(1, 2), grads[rows])).sum((1, 2))
            else:
                torch.bmm(columns, grads[rows].transpose(1, 2), out=weights[rows])  # (b, D, C)
                squares[rows] += _row_squares(weights[rows])
        return squares, (weights, bias, block, padded if ghost else None)  # ghost sums unfold it again

    def clipped_sums(self, module, inputs, grads, kept, factors, views):
        weights, bias, block, padded = kept
        sums = {}
        if _trainable(module.weight):
            channels = module.out_channels
            if weights is None:  # ghost: sum_i f_i G_i^T A_i as one product per block of examples
                grads = _by_example(grads.flatten(2), views) * factors.view(-1, 1, 1)
                summed = grads.new_zeros(channels, module.weight[0].numel())
                for rows in _blocks(len(factors), block):
                    columns = _by_example(unfold(padded[_rows_of(rows, views)], module), views).transpose(1, 2)
                    summed.addmm_(grads[rows].transpose(0, 1).reshape(channels, -1),
                                  columns.reshape(-1, columns.shape[2]))
                sums[module.weight] = summed.view(module.weight.shape)
            else:
                summed = (factors @ weights.flatten(1)).view(-1, channels)
                sums[module.weight] = summed.t().reshape(module.weight.shape)
        if bias is not None:
            sums[module.bias] = factors @ bias
        return sums


class GroupNormRule:
    """GroupNorm's affine parameters: per example, sum over positions of grad * x_hat, and of grad."""

    def check(self, module: nn.GroupNorm) -> str | None:
        return None

    def squared_norms(self, module, inputs, grads, block_bytes, views):
        rows, channels = inputs.shape[:2]
        grads = grads.reshape(rows, channels, -1)
        weight = bias = None
        if _trainable(module.weight):
            normalized = torch.native_group_norm(inputs, None, None, rows, channels, grads.shape[2],
                                                 module.num_groups, module.eps)[0]
            weight = normalized.view_as(grads).mul_(grads).sum(2)  # in place: no second temporary
        if _trainable(module.bias):
            bias = grads.sum(2)
        per_example = [None if part is None else part.view(-1, views, channels).sum(1) for part in (weight, bias)]
        squares = sum(_row_squares(part) for part in per_example if part is not None)
        return squares, per_example

    def clipped_sums(self, module, inputs, grads, kept, factors, views):
        return {param: factors @ per_example
                for param, per_example in zip((module.weight, module.bias), kept) if per_example is not None}


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.GroupNorm: GroupNormRule(),
}


class PerExampleClipper:
    """Accumulates ``sum_i min(1, C / ||g_i||) g_i`` into ``param.grad`` from one backward pass.

    Usage, for a loss that is the *sum* of the examples' own losses (batch first)::

        with clipper.recording():
            logits = model(images)
        clipper.clipped_backward(F.cross_entropy(logits, labels, reduction="sum"))

    Every module with trainable parameters of its own must be of a type in :data:`RULES` (exactly,
    not a subclass) and run once per recorded forward pass, no trainable parameter may belong to two
    modules, and a recorded forward pass may not change any buffer (fixed ones, such as a filter
    bank's or a frozen norm layer's, are fine); otherwise a ``DPImgSynError`` says so.
    """

    def __init__(self, model: nn.Module, max_norm: float, block_bytes: int | None = None) -> None:
        if not max_norm > 0:
            raise DPImgSynError(f"the clipping norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)
        self.block_bytes = block_bytes
        self.layers: dict[nn.Module, LayerRule] = {}
        problems = []
        for name, module in model.named_modules():
            if not any(param.requires_grad for param in module.parameters(recurse=False)):
                continue
            rule = RULES.get(type(module))
            reason = f"no per-example rule for {type(module).__name__}" if rule is None else rule.check(module)
            if reason:
                problems.append(f"{name or 'the model'}: {reason}")
            else:
                self.layers[module] = rule
        problems += _shared_parameters(model)
        if problems:
            raise DPImgSynError("per-example clipping (grad_sample_mode 'fused') does not support "
                                + "; ".join(problems) + f"; use {OTHER_MODE}")
        self._named_modules = {name or "the model": module for name, module in model.named_modules()}
        self._records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._recording = False
        self._views = 1
        self._handles = [module.register_forward_hook(self._record) for module in self.layers]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self._recording and torch.is_grad_enabled()):
            return
        if module in self._records:
            raise DPImgSynError(f"{type(module).__name__} ran twice in one forward pass; per-example "
                                f"clipping needs each layer once; use {OTHER_MODE}")
        # The output's version tells whether something changed it in place afterwards: autograd
        # would then give the gradient of the changed tensor, not of this layer's output.
        self._records[module] = (inputs[0].detach(), output, output._version)

    def _buffers(self) -> BufferState:
        """Every buffer of the model with its version counter, which each in-place change increments.

        Read from ``_buffers`` directly: ``named_buffers`` costs ten times more, on every step."""
        return {(name, buffer_name): (buffer, -1 if buffer.is_inference() else buffer._version)
                for name, module in self._named_modules.items() for buffer_name, buffer in module._buffers.items()
                if buffer is not None}

    def _refuse_batch_statistics(self) -> None:
        refuse_batch_statistics(self._named_modules.items())

    def _refuse_changed_buffers(self, before: BufferState) -> None:
        after = self._buffers()
        changed = sorted(key for key in before.keys() | after.keys()
                         if key not in before or key not in after
                         or before[key][0] is not after[key][0] or before[key][1] != after[key][1])
        if changed:
            self._records.clear()
            name, buffer_name = changed[0]
            raise DPImgSynError(f"{name} ({type(self._named_modules[name]).__name__}) changed its buffer "
                                f"{buffer_name!r} in the forward pass: a function of the private batch that "
                                f"per-example clipping cannot bound; keep buffers fixed, or {FIXED_STATISTICS}")

    @contextmanager
    def recording(self, views: int = 1) -> Iterator[None]:
        """Record the layers' inputs and outputs of the forward passes run inside.

        With ``views`` > 1 the batch holds that many consecutive rows per example (augmentation
        multiplicity): an example's gradient is the sum over its rows, and that sum is what is
        clipped, so each example still moves the sum by at most C however many views it has.
        Refuses a forward pass that computes statistics of the batch: known offenders (batch
        normalization in training mode) before it runs, any other buffer change after it ran.
        """
        if not (isinstance(views, int) and views >= 1):
            raise DPImgSynError(f"views must be a whole number >= 1, got {views!r}")
        self._records.clear()
        self._views = views
        self._refuse_batch_statistics()
        before = self._buffers()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
        self._refuse_changed_buffers(before)

    def clipped_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the clipped per-example gradients' sum to ``param.grad``; returns the (B,) norms."""
        records, self._records = self._records, {}
        if not records:
            raise DPImgSynError("clipped_backward needs a forward pass run inside recording()")
        modules = list(records)
        views = self._views
        rows = len(records[modules[0]][0])
        if any(len(inputs) != rows for inputs, _, _ in records.values()) or rows % views:
            raise DPImgSynError("per-example clipping needs batch-first inputs of one batch size in every layer"
                                + (f", a multiple of the {views} views per example" if views > 1 else ""))
        batch = rows // views
        changed = [type(module).__name__ for module, (_, output, version) in records.items()
                   if output._version != version]
        if changed:
            raise DPImgSynError(f"the output of {changed[0]} was changed in place after the layer (an in-place "
                                "activation or addition?); per-example clipping needs it unchanged: use "
                                f"out-of-place operations, or {OTHER_MODE}")
        outputs = [output for _, output, _ in records.values()]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        block_bytes = self.block_bytes or BLOCK_BYTES.get(loss.device.type, DEFAULT_BLOCK_BYTES)
        squares = torch.zeros(batch, device=loss.device, dtype=loss.dtype)
        kept = []
        for module, grad in zip(modules, grads):
            inputs, output, _ = records[module]
            grad = torch.zeros_like(output) if grad is None else grad
            layer_squares, layer_kept = self.layers[module].squared_norms(module, inputs, grad, block_bytes, views)
            squares = squares + layer_squares
            kept.append((grad, layer_kept))
        norms = squares.sqrt()
        factors = (self.max_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
        summed: dict[nn.Parameter, torch.Tensor] = {}
        for module, (grad, layer_kept) in zip(modules, kept):
            summed.update(self.layers[module].clipped_sums(module, records[module][0], grad, layer_kept, factors,
                                                           views))
        for module in self.layers:
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    contribution = summed.get(param)
                    if contribution is None:  # the layer did not run: every example's gradient is zero there
                        contribution = torch.zeros_like(param)
                    contribution = contribution.view_as(param)
                    total = contribution if param.grad is None else param.grad + contribution
                    param.grad = _in_layout_of(param, total)
        return norms

    def remove(self) -> None:
        """Detach the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
