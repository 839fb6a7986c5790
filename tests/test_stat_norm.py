"""The stat-recording GroupNorm wrapper: transparent output, correct capture, frozen synthesis buffers."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from common.errors import DPImgSynError
from synthesizer.stat_norm import (StatNorm, attach_stat_layers, load_dp_statistics, matching_loss,
                                   per_sample_moments, set_mode, stat_layers)


pytestmark = pytest.mark.usefixtures("single_thread")


class ResidualBlock(nn.Module):
    """A ResNet BasicBlock with GroupNorm, including one in the projection shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.GroupNorm(2, cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def detach_stat_layers(model: nn.Module) -> None:
    """Put the plain ``nn.GroupNorm`` layers back (same modules, so the same weights)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, StatNorm):
                setattr(parent, child_name, child.group_norm)


def get_dp_statistics(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics held by the synthesis buffers, in the format ``load_dp_statistics`` reads."""
    return {name: {"mean": layer.dp_mean.detach().cpu().clone(), "var": layer.dp_var.detach().cpu().clone()}
            for name, layer in stat_layers(model).items()}


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        ResidualBlock(4, 6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def with_random_affine(model: nn.Module) -> nn.Module:
    """GroupNorm weights are 1/0 at init; randomize them so that round trips are meaningful."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return model


def random_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"mean": torch.randn(layer.num_channels), "var": torch.rand(layer.num_channels) + 0.5}
            for name, layer in stat_layers(model).items()}


def group_norm_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: the inputs of every plain GroupNorm, recorded with forward hooks."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach())))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return inputs


def test_attach_wraps_every_group_norm_in_order_and_keeps_outputs():
    plain = with_random_affine(tiny_cnn()).eval()
    wrapped = copy.deepcopy(plain)
    norm_names = [name for name, module in plain.named_modules() if isinstance(module, nn.GroupNorm)]
    layers = attach_stat_layers(wrapped)
    assert list(layers) == norm_names == ["1", "3.bn1", "3.bn2", "3.shortcut.1"]
    assert all(isinstance(layer, StatNorm) for layer in layers.values())
    assert not any(type(m) is nn.GroupNorm and not isinstance(p, StatNorm)
                   for p in wrapped.modules() for m in p.children())
    load_dp_statistics(wrapped, random_stats(wrapped))
    x = torch.randn(3, 3, 8, 8)
    expected = plain(x)
    for mode in ("off", "capture", "synthesis"):
        set_mode(wrapped, mode)
        assert torch.equal(wrapped(x), expected), mode
    assert attach_stat_layers(wrapped).keys() == layers.keys()  # idempotent
    assert all(not isinstance(layer.group_norm, StatNorm) for layer in stat_layers(wrapped).values())


def test_capture_records_per_sample_channel_means_and_second_moments():
    model = with_random_affine(tiny_cnn()).eval()
    x = torch.randn(3, 3, 8, 8)
    reference = group_norm_inputs(model, x)
    layers = attach_stat_layers(model)
    set_mode(model, "capture")
    with torch.no_grad():
        model(x)
    for name, layer in layers.items():
        a = reference[name]
        expected = torch.cat([a.mean(dim=(2, 3)), (a * a).mean(dim=(2, 3))], dim=1)
        assert layer.per_sample.shape == (3, 2 * layer.num_channels)
        torch.testing.assert_close(layer.per_sample, expected, rtol=1e-5, atol=1e-6)
        assert layer.per_sample.dtype == torch.float32


def test_per_sample_moments_handles_inputs_without_spatial_dims():
    x = torch.randn(4, 6)
    torch.testing.assert_close(per_sample_moments(x), torch.cat([x, x * x], dim=1))


def test_detach_and_attach_round_trip_weights_exactly():
    model = with_random_affine(tiny_cnn())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_stat_layers(model)
    detach_stat_layers(model)
    assert not stat_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_with_stat_layers():
    model = with_random_affine(tiny_cnn())
    attach_stat_layers(model)
    stats = random_stats(model)
    load_dp_statistics(model, stats)
    state = model.state_dict()
    assert "1.group_norm.weight" in state and "3.shortcut.1.group_norm.bias" in state
    assert "1.dp_mean" in state and "3.bn2.dp_var" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    fresh = tiny_cnn()
    attach_stat_layers(fresh)
    fresh.load_state_dict(loaded)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    got = get_dp_statistics(fresh)
    for name in stats:
        assert torch.equal(got[name]["mean"], stats[name]["mean"])
        assert torch.equal(got[name]["var"], stats[name]["var"])


def test_synthesis_never_changes_the_dp_buffers():
    model = tiny_cnn()
    attach_stat_layers(model)
    load_dp_statistics(model, random_stats(model))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "dp_" in k}
    set_mode(model, "synthesis")
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([x] + list(model.parameters()), lr=0.5)
    for step, train in enumerate([True, False] * 5):
        model.train(train)
        batch = x * 10 ** (step - 3)  # tiny to huge inputs
        optimizer.zero_grad()
        model(batch)
        loss = matching_loss(model)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model(torch.randn(7, 3, 8, 8) * 1e3)
    assert x.grad is not None and x.grad.abs().sum() > 0
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert not any(b.requires_grad for k, b in model.named_buffers() if "dp_" in k)


def test_matching_loss_is_zero_on_a_batch_with_exactly_the_dp_statistics():
    layer = StatNorm(nn.GroupNorm(2, 4))
    dp_mean, dp_var = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.0, 0.25, 4.0, 9.0])
    model = nn.Sequential(layer)
    load_dp_statistics(model, {"0": {"mean": dp_mean, "var": dp_var}})
    set_mode(model, "synthesis")

    z = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0, keepdim=True)
    standardized = (z - mean) / var.sqrt()
    x = (standardized * dp_var.double().sqrt().view(1, 4, 1, 1) + dp_mean.double().view(1, 4, 1, 1)).float()
    model(x)
    assert matching_loss(model).item() < 1e-5

    shifted = x + torch.tensor([0.0, 0.0, 0.3, 0.0]).view(1, 4, 1, 1)
    model(shifted)
    assert matching_loss(model).item() == pytest.approx(0.3, rel=1e-4)


def test_modes_and_loading_refuse_bad_use():
    model = tiny_cnn()
    with pytest.raises(DPImgSynError, match="no stat layers"):
        set_mode(model, "capture")
    attach_stat_layers(model)
    with pytest.raises(DPImgSynError, match="unknown statistics mode"):
        set_mode(model, "record")
    with pytest.raises(DPImgSynError, match="none are loaded"):
        set_mode(model, "synthesis")
    stats = random_stats(model)
    with pytest.raises(DPImgSynError, match="missing layers"):
        load_dp_statistics(model, {k: v for k, v in stats.items() if k != "1"})
    bad_shape = copy.deepcopy(stats)
    bad_shape["1"]["mean"] = torch.zeros(5)
    with pytest.raises(DPImgSynError, match="shape"):
        load_dp_statistics(model, bad_shape)
    negative = copy.deepcopy(stats)
    negative["1"]["var"][0] = -1.0
    with pytest.raises(DPImgSynError, match="non-positive"):
        load_dp_statistics(model, negative)
    with pytest.raises(RuntimeError, match="synthesis mode"):
        matching_loss(model)
    with pytest.raises(DPImgSynError, match="no GroupNorm"):
        attach_stat_layers(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


def test_shared_group_norm_gets_one_shared_wrapper():
    shared = nn.GroupNorm(1, 3)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    attach_stat_layers(model)
    assert model[0][0] is model[1][0]
    assert isinstance(model[0][0], StatNorm)


def test_registry_resnet18_wraps_every_norm_and_keeps_outputs():
    models = pytest.importorskip("models")
    model = models.MODELS["resnet18"](10).eval()
    reference_model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    layers = attach_stat_layers(model)
    assert len(layers) == len(norms) == 20
    x = torch.randn(2, 3, 32, 32)
    set_mode(model, "capture")
    with torch.no_grad():
        assert torch.equal(model(x), reference_model(x))
    assert all(layer.per_sample.shape == (2, 2 * layer.num_channels) for layer in layers.values())


def test_matching_loss_gradient_matches_autograd_of_the_definition():
    """The hand-written backward of the synthesis loss equals autograd on var_mean."""
    torch.manual_seed(0)
    layer = StatNorm(torch.nn.GroupNorm(2, 4))
    layer.dp_mean.copy_(torch.randn(4))
    layer.dp_var.copy_(torch.rand(4) + 0.5)
    layer.set_mode("synthesis")
    x = (torch.randn(5, 4, 6, 6) * 2 + 0.3).requires_grad_(True)
    layer(x)
    (grad,) = torch.autograd.grad(layer.matching_loss, x)
    reference_x = x.detach().clone().requires_grad_(True)
    var, mean = torch.var_mean(reference_x.transpose(0, 1).flatten(1), dim=1, correction=0)
    reference = torch.linalg.vector_norm(mean - layer.dp_mean) + torch.linalg.vector_norm(var - layer.dp_var)
    (reference_grad,) = torch.autograd.grad(reference, reference_x)
    assert torch.allclose(layer.matching_loss, reference, atol=1e-5)
    assert torch.allclose(grad, reference_grad, atol=1e-6)


@pytest.mark.parametrize("terms", ["both", "output", "loss"])
def test_synthesis_mode_gradients_equal_group_norm_and_the_loss_definition(terms):
    """GroupNorm's output and the matching loss share one backward node: every gradient, to the input
    and to GroupNorm's weight and bias, equals autograd on F.group_norm and var_mean."""
    torch.manual_seed(1)
    norm = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4))
        norm.bias.copy_(torch.randn(4))
    layer = StatNorm(norm)
    layer.dp_mean.copy_(torch.randn(4))
    layer.dp_var.copy_(torch.rand(4) + 0.5)
    layer.set_mode("synthesis")
    x = (torch.randn(3, 4, 5, 5) * 2 + 0.3).requires_grad_(True)
    weights = torch.randn(3, 4, 5, 5)

    def total(output, loss):
        return {"both": (output * weights).sum() + loss, "output": (output * weights).sum(), "loss": loss}[terms]

    inputs = [x, norm.weight, norm.bias]
    output = layer(x)
    grads = torch.autograd.grad(total(output, layer.matching_loss), inputs, allow_unused=True)
    reference_output = torch.nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps)
    var, mean = torch.var_mean(x.transpose(0, 1).flatten(1), dim=1, correction=0)
    reference_loss = torch.linalg.vector_norm(mean - layer.dp_mean) + torch.linalg.vector_norm(var - layer.dp_var)
    reference = torch.autograd.grad(total(reference_output, reference_loss), inputs, allow_unused=True)
    assert torch.equal(output, reference_output)
    for name, got, want in zip(("input", "weight", "bias"), grads, reference):
        if want is None:
            assert got is None or not got.any(), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_synthesis_mode_output_has_group_norms_dtype(dtype):
    """float64 stays float64; a bfloat16 input (autocast) gives float32, as GroupNorm does under autocast."""
    layer = StatNorm(torch.nn.GroupNorm(2, 4).to(torch.float64 if dtype == torch.float64 else torch.float32))
    layer.dp_mean.zero_()
    layer.dp_var.fill_(1.0)
    layer.set_mode("synthesis")
    x = torch.randn(2, 4, 3, 3).to(dtype).requires_grad_(True)
    output = layer(x)
    assert output.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (grad,) = torch.autograd.grad(output.sum() + layer.matching_loss, x)
    assert grad.dtype == dtype


def test_stat_layers_attached_to_a_moved_model_live_on_its_device():
    """A teacher moved to a GPU before its stat layers were attached got CPU buffers (found on CUDA).

    The meta device stands in for the GPU: any device other than the CPU default shows the bug.
    """
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.GroupNorm(2, 4, affine=False)).to("meta")
    layers = attach_stat_layers(model)  # the affine-free one (scatter_cnn's) has no parameter to say where it lives
    assert len(layers) == 2
    assert {buffer.device.type for layer in layers.values() for buffer in (layer.dp_mean, layer.dp_var)} == {"meta"}
