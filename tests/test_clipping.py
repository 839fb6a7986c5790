"""privacy.clipping: the one-backward per-example clipping engine against its definition.

The definition is one backward pass per example: g_i, its norm over every trainable parameter,
and sum_i min(1, C / ||g_i||) g_i. Every layer rule, each of its two methods (materialized
per-example gradients and ghost norms) and the block sizes are held to it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn

import registry
from common.errors import DPImgSynError
from per_example import clipped_sum
from privacy import clipping
from privacy.clipping import PerExampleClipper


def fused(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_norm: float, views: int = 1,
          **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The engine as DP-SGD runs it; with ``views``, each example's loss is the mean over its views."""
    clipper = PerExampleClipper(model, max_norm, **options)
    for param in model.parameters():
        param.grad = None
    with clipper.recording(views):
        logits = model(inputs)
    norms = clipper.clipped_backward(F.cross_entropy(logits, labels, reduction="sum") / views)
    clipper.remove()
    return norms, [param.grad for param in model.parameters() if param.requires_grad]


def assert_matches_reference(model, inputs, labels, max_norm, rtol, atol, views=1, **options) -> torch.Tensor:
    expected_norms, expected = clipped_sum(model, inputs, labels, max_norm, views)
    norms, sums = fused(model, inputs, labels, max_norm, views, **options)
    torch.testing.assert_close(norms, expected_norms, rtol=rtol, atol=atol)
    assert len(sums) == len(expected)
    for index, (got, want) in enumerate(zip(sums, expected)):
        assert got is not None, f"parameter {index} got no clipped sum"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"parameter {index}")
    return expected_norms


@pytest.mark.parametrize("block_bytes", [None, 1])  # default blocks; one example per block
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # every example clipped; none
def test_small_cnn_matches_one_backward_per_example(max_norm, block_bytes):
    torch.manual_seed(0)
    model = registry.get_model("small_cnn", 10)
    inputs, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    norms = assert_matches_reference(model, inputs, labels, max_norm, rtol=1e-4, atol=1e-6,
                                     block_bytes=block_bytes)
    assert ((norms > max_norm).all() if max_norm < 1 else (norms < max_norm).all())


@pytest.mark.parametrize("name, side", [("resnet18", 32), ("resnet18_imagenet", 64)])
def test_resnets_match_one_backward_per_example(name, side):
    """Both methods run here: ghost norms in the deep stages, materialized gradients in the early ones."""
    torch.manual_seed(1)
    model = registry.get_model(name, 10).double()  # float64: see test_models on ReLUs at zero
    inputs, labels = torch.randn(3, 3, side, side, dtype=torch.float64), torch.tensor([1, 5, 5])
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert any(conv.out_channels >= 256 for conv in convs)  # the layers where ghost norms are chosen
    assert_matches_reference(model, inputs, labels, 0.5, rtol=1e-9, atol=1e-12)


class Net(nn.Module):
    """Every rule and option in one small net: strided, dilated, padded and 1x1 convolutions,
    with and without bias, GroupNorm, and a Linear on a (B, T, features) input."""

    def __init__(self, conv_bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(1, 2), bias=conv_bias)
        self.norm = nn.GroupNorm(3, 6)
        self.conv2 = nn.Conv2d(6, 8, 3, dilation=2, padding=0)
        self.conv3 = nn.Conv2d(8, 4, 1, bias=False)
        self.tokens = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(torch.tanh(self.conv2(torch.tanh(self.norm(self.conv1(x))))))
        x = torch.tanh(self.tokens(F.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)))  # (B, 16, 4) -> (B, 16, 5)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("ghost_ratio", [0, 10**9])  # materialize every convolution; ghost norms for all
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("views", [1, 3])  # augmentation multiplicity: an example is its views' mean gradient
def test_every_layer_option_matches_one_backward_per_example(monkeypatch, ghost_ratio, conv_bias, views):
    monkeypatch.setattr(clipping, "GHOST_RATIO", ghost_ratio)
    torch.manual_seed(2)
    model = Net(conv_bias).double()
    labels = torch.tensor([0, 1, 2, 2, 0]).repeat_interleave(views)
    inputs = torch.randn(len(labels), 3, 15, 13, dtype=torch.float64)
    assert_matches_reference(model, inputs, labels, 0.3, rtol=1e-9, atol=1e-12, views=views, block_bytes=1000)


def test_frozen_parameters_are_left_out_of_norms_and_sums():
    torch.manual_seed(3)
    model = Net().double()
    for param in (model.conv1.bias, model.norm.weight, model.tokens.weight, *model.conv3.parameters()):
        param.requires_grad_(False)
    inputs, labels = torch.randn(4, 3, 15, 13, dtype=torch.float64), torch.tensor([0, 1, 2, 2])
    assert_matches_reference(model, inputs, labels, 0.3, rtol=1e-9, atol=1e-12)
    assert model.conv1.bias.grad is None and model.conv3.weight.grad is None


@pytest.mark.parametrize("ghost_ratio", [clipping.GHOST_RATIO, 10**9])  # as shipped; ghost norms everywhere
@pytest.mark.parametrize("views", [1, 4])
def test_each_examples_contribution_is_at_most_the_clipping_norm(monkeypatch, ghost_ratio, views):
    """The sensitivity bound itself: one example (with all its views) gives back one clipped gradient, norm <= C."""
    monkeypatch.setattr(clipping, "GHOST_RATIO", ghost_ratio)
    torch.manual_seed(4)
    model = registry.get_model("small_cnn", 10)
    inputs, labels = torch.randn(8 * views, 3, 32, 32) * 50, torch.randint(0, 10, (8,)).repeat_interleave(views)
    for example in range(8):
        rows = slice(example * views, (example + 1) * views)
        norms, sums = fused(model, inputs[rows], labels[rows], 0.01, views)
        assert norms.shape == (1,)
        assert float(norms) > 1.0  # far above C: the clip is what bounds it
        assert float(torch.sqrt(sum(part.square().sum() for part in sums))) <= 0.01 * (1 + 1e-5)


def test_clipped_sums_accumulate_over_chunks():
    torch.manual_seed(5)
    model = registry.get_model("small_cnn", 10)
    inputs, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    _, whole = fused(model, inputs, labels, 0.1)
    whole = [part.clone() for part in whole]
    clipper = PerExampleClipper(model, 0.1)
    for param in model.parameters():
        param.grad = None
    for rows in (slice(0, 2), slice(2, 6)):
        with clipper.recording():
            logits = model(inputs[rows])
        clipper.clipped_backward(F.cross_entropy(logits, labels[rows], reduction="sum"))
    for param, expected in zip(model.parameters(), whole):
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)


def test_a_layer_that_did_not_run_gets_a_zero_sum():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    clipper = PerExampleClipper(model, 1.0)
    with clipper.recording():
        logits = model["used"](torch.randn(4, 3))
    clipper.clipped_backward(F.cross_entropy(logits, torch.tensor([0, 1, 1, 0]), reduction="sum"))
    assert model["used"].weight.grad.abs().sum() > 0
    assert torch.equal(model["unused"].weight.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("layer, reason", [
    (nn.Conv2d(4, 4, 3, groups=2), "grouped convolution"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding"),
    (nn.Conv2d(4, 4, 3, padding="same"), "padding"),
    (nn.LayerNorm(4), "no per-example rule for LayerNorm"),
    (nn.Embedding(5, 4), "no per-example rule for Embedding"),
    (type("MyConv", (nn.Conv2d,), {})(4, 4, 3), "no per-example rule for MyConv"),
])
def test_layers_without_a_rule_are_refused_by_name(layer, reason):
    """A trainable parameter the engine cannot clip would enter the sum unclipped: refuse the model."""
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(DPImgSynError, match=rf"1: {reason}.*--grad_sample_mode hooks"):
        PerExampleClipper(model, 1.0)
    layer.requires_grad_(False)
    PerExampleClipper(model, 1.0)  # frozen, it adds nothing to any gradient


def test_a_layer_run_twice_is_refused():
    layer = nn.Linear(3, 3)
    clipper = PerExampleClipper(layer, 1.0)
    with pytest.raises(DPImgSynError, match="ran twice"):
        with clipper.recording():
            layer(layer(torch.randn(2, 3)))


def test_an_output_changed_in_place_is_refused():
    """Autograd would return the gradient of the changed tensor, not of the layer's output."""
    layer = nn.Linear(3, 3)
    clipper = PerExampleClipper(layer, 1.0)
    with clipper.recording():
        outputs = layer(torch.randn(2, 3)).relu_()
    with pytest.raises(DPImgSynError, match="Linear was changed in place"):
        clipper.clipped_backward(outputs.sum())


def test_backward_needs_a_recorded_forward_and_a_positive_norm():
    layer = nn.Linear(3, 3)
    with pytest.raises(DPImgSynError, match="positive"):
        PerExampleClipper(layer, 0.0)
    clipper = PerExampleClipper(layer, 1.0)
    with pytest.raises(DPImgSynError, match="recording"):
        clipper.clipped_backward(layer(torch.randn(2, 3)).sum())
    with torch.no_grad(), clipper.recording():
        layer(torch.randn(2, 3))  # evaluation inside recording() records nothing
    with pytest.raises(DPImgSynError, match="recording"):
        clipper.clipped_backward(torch.zeros(()))


def test_unfold_matches_torch():
    torch.manual_seed(6)
    for conv in (nn.Conv2d(3, 2, 3, padding=1),
                 nn.Conv2d(3, 2, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(0, 1))):
        inputs = torch.randn(2, 3, 9, 8)
        expected = F.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        assert torch.equal(clipping.unfold(clipping.pad(inputs, conv), conv), expected)


def assert_clipped_or_says_hooks(model: nn.Module) -> None:
    """Per-example rules cover every trainable parameter, or the refusal is one line that names Opacus's hooks
    mode, which then accepts the model."""
    try:
        clipper = PerExampleClipper(model, 1.0)
    except DPImgSynError as error:
        assert clipping.OTHER_MODE in str(error) and "\n" not in str(error)
        assert ModuleValidator.validate(model, strict=True) == []
        return
    trainable = {param for param in model.parameters() if param.requires_grad}
    assert {param for layer in clipper.layers for param in layer.parameters(recurse=False)} == trainable


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_registry_model_has_per_example_rules_or_says_it_needs_hooks(name):
    assert_clipped_or_says_hooks(registry.get_model(name, 3))


def test_a_model_without_rules_says_it_needs_hooks():
    assert_clipped_or_says_hooks(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))


class Tied(nn.Module):
    """Two Linear layers of one weight (tied encoder and decoder): each layer's norm alone is not the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


def test_modules_sharing_a_parameter_are_refused():
    model = Tied()
    with pytest.raises(DPImgSynError, match=r"encoder\.weight is also decoder\.weight.*--grad_sample_mode hooks"):
        PerExampleClipper(model, 1.0)
    model.encoder.weight.requires_grad_(False)
    PerExampleClipper(model, 1.0)  # frozen, the shared weight gets no gradient
    layer = nn.Linear(3, 2)
    aliased = nn.ModuleDict({"layer": layer, "alias": layer})  # one module under two names shares nothing
    assert list(PerExampleClipper(aliased, 1.0).layers) == [layer]


class RunningMean(nn.Module):
    """Keeps a running mean of its inputs in a buffer, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(2, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return x - self.mean


class Counter(nn.Module):
    """Replaces its buffer by a new tensor on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return x


def conv_net(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), middle, nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


@pytest.mark.parametrize("middle, message", [
    pytest.param(nn.BatchNorm2d(2, affine=False),
                 r"1: BatchNorm2d normalizes by batch statistics and updates its running statistics.*GroupNorm",
                 id="batch_norm_running_statistics"),
    pytest.param(nn.BatchNorm2d(2, affine=False, track_running_stats=False),
                 r"1: BatchNorm2d normalizes by batch statistics in training mode", id="batch_norm_batch_statistics"),
    pytest.param(nn.InstanceNorm2d(2, track_running_stats=True), r"1: InstanceNorm2d updates its running statistics",
                 id="instance_norm_running_statistics"),
    pytest.param(RunningMean(), r"1 \(RunningMean\) changed its buffer 'mean'", id="buffer_changed_in_place"),
    pytest.param(Counter(), r"1 \(Counter\) changed its buffer 'calls'", id="buffer_replaced"),
])
def test_a_forward_pass_that_changes_buffers_or_mixes_examples_is_refused(middle, message):
    """Buffers a forward pass changes, and batch statistics, are functions of the private batch that no clip bounds."""
    torch.manual_seed(7)
    model = conv_net(middle).train()
    clipper = PerExampleClipper(model, 1.0)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with pytest.raises(DPImgSynError, match=message):
        with clipper.recording():
            model(torch.randn(4, 1, 8, 8))
    if isinstance(middle, nn.modules.batchnorm._NormBase):  # known offenders are refused before they run
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, before[name]), name
    with pytest.raises(DPImgSynError, match="recording"):
        clipper.clipped_backward(torch.zeros(()))  # nothing recorded is left to use


class FilterBank(nn.Module):
    """A fixed filter bank, as a scattering transform's: buffers, no parameters, nothing updated."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filters", torch.randn(2, 1, 3, 3))
        self.register_buffer("gain", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.filters).abs() * self.gain


def test_fixed_buffers_are_allowed_and_the_same_norm_layer_in_training_mode_is_not():
    torch.manual_seed(8)
    norm = nn.BatchNorm2d(2, affine=False)
    norm.running_mean.uniform_()
    model = nn.Sequential(FilterBank(), norm.eval(), nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    inputs, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 2, 1])
    assert_matches_reference(model, inputs, labels, 0.3, rtol=1e-4, atol=1e-6)
    norm.train()
    with pytest.raises(DPImgSynError, match="1: BatchNorm2d normalizes by batch statistics and updates"):
        fused(model, inputs, labels, 0.3)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_gradients_have_their_parameters_memory_layout(monkeypatch, memory_format):
    """An all-reduce sums raw memory: a rank with an empty share sends zeros laid out as the parameters are."""
    torch.manual_seed(9)
    model = Net().to(memory_format=memory_format)
    inputs, labels = torch.randn(4, 3, 15, 13), torch.tensor([0, 1, 2, 2])
    # Materialized convolutions or ghost norms for all; the first chunk sets param.grad, a second one adds to it.
    for ghost_ratio, chunks in ((0, 1), (0, 2), (10**9, 1), (10**9, 2)):
        monkeypatch.setattr(clipping, "GHOST_RATIO", ghost_ratio)
        clipper = PerExampleClipper(model, 0.3)
        for param in model.parameters():
            param.grad = None
        for rows in torch.arange(4).chunk(chunks):
            with clipper.recording():
                logits = model(inputs[rows])
            clipper.clipped_backward(F.cross_entropy(logits, labels[rows], reduction="sum"))
        clipper.remove()
        for name, param in model.named_parameters():
            assert param.grad.stride() == param.stride(), f"{name}, ghost ratio {ghost_ratio}, {chunks} chunk(s)"
