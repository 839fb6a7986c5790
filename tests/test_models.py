"""Architectures: shapes, the BatchNorm->GroupNorm conversion, and Opacus per-sample gradients."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.utils import wrap_model
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn

import models
from common.errors import DPImgSynError
from per_example import per_example_gradients

NUM_CLASSES = 7  # not 10, so a hard-coded CIFAR head would show



@functools.cache
def built(name: str) -> nn.Module:
    """One instance per architecture for the read-only checks (ResNet-34 takes a while to build)."""
    torch.manual_seed(0)
    return models.MODELS[name](NUM_CLASSES)


def fresh(name: str) -> nn.Module:
    """A private copy for checks that attach hooks or change the dtype."""
    return copy.deepcopy(built(name))


def assert_per_sample_gradients_exact(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                      mode: str, rtol: float, atol: float) -> None:
    """Every parameter gets a (B, *shape) ``grad_sample`` equal to that example's own gradient."""
    reference = per_example_gradients(model, images, labels)
    wrapped = wrap_model(model, mode, batch_first=True, loss_reduction="mean")
    F.cross_entropy(wrapped(images), labels).backward()
    for index, (name, param) in enumerate(model.named_parameters()):
        assert param.grad_sample is not None, f"{name} got no per-sample gradient in mode {mode}"
        assert param.grad_sample.shape == (len(images), *param.shape), name
        for example in range(len(images)):
            torch.testing.assert_close(param.grad_sample[example], reference[example][index],
                                       rtol=rtol, atol=atol, msg=f"{name}, example {example}, {mode}")


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(module for module in model.modules() if isinstance(module, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("scale", [1, 2])
def test_output_is_one_logit_row_per_image_from_the_smallest_side_up(name: str, scale: int) -> None:
    side = scale * models.MODELS[name].min_size
    with torch.no_grad():
        logits = built(name)(torch.randn(2, 3, side, side))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_take_the_channel_count_and_their_smallest_image(name: str) -> None:
    """``name(num_classes, in_channels)``: a gray set's model sees one channel; the smallest side it declares works."""
    torch.manual_seed(0)
    model = models.MODELS[name](NUM_CLASSES, 1).eval()
    assert 3 * first_conv(model).in_channels == first_conv(built(name)).in_channels
    side = models.MODELS[name].min_size
    with torch.no_grad():
        assert model(torch.randn(2, 1, side, side)).shape == (2, NUM_CLASSES)
    assert [p.shape[1:] for p in model.parameters()][1:] == [p.shape[1:] for p in built(name).parameters()][1:]


def test_a_taken_model_name_is_refused() -> None:
    before = dict(models.MODELS)
    with pytest.raises(ValueError, match="model 'small_cnn' is registered twice"):
        @models.register_model(norm_layers=0)
        def small_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
            return nn.Linear(in_channels, num_classes)
    assert models.MODELS == before


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_is_groupnorm_and_opacus_valid(name: str) -> None:
    model = built(name)
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    norms = [module for module in model.modules() if isinstance(module, nn.GroupNorm)]
    assert len(norms) == models.MODELS[name].norm_layers
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(getattr(module, "inplace", False) for module in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet18_imagenet"])
def test_resnet_norms_are_the_ones_opacus_fix_makes(name: str) -> None:
    """BN(C) -> GroupNorm(gcd(32, C), C, affine): the paper's teacher, not a variant of it."""
    for module in built(name).modules():
        if isinstance(module, nn.GroupNorm):
            assert module.num_groups == math.gcd(32, module.num_channels)
            assert module.affine


def test_imagenet_resnet_computes_what_torchvision_resnet18_computes() -> None:
    """Same layers in the same order: loading torchvision's (fixed) weights gives its outputs."""
    ours = fresh("resnet18_imagenet")
    torch.manual_seed(1)
    theirs = ModuleValidator.fix(torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES))
    their_params = list(theirs.parameters())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in their_params]
    with torch.no_grad():
        for mine, reference in zip(ours.parameters(), their_params):
            mine.copy_(reference)
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(ours(images), theirs(images))


def test_cifar_stem_keeps_resolution_and_imagenet_stem_divides_by_four() -> None:
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert built("resnet18").stem(images).shape[-2:] == (32, 32)
        assert built("resnet18_imagenet").stem(torch.randn(1, 3, 224, 224)).shape[-2:] == (56, 56)


def test_small_cnn_has_few_parameters() -> None:
    # DP-SGD adds noise of norm sigma*C*sqrt(d) to a clipped signal of norm at most C per
    # example, so every extra weight dilutes the signal; 50k keeps a 4,000-image MNIST teacher
    # above 90% at epsilon 10 and Opacus's per-sample gradients fast on a CPU.
    assert sum(p.numel() for p in built("small_cnn").parameters()) < 50_000


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_small_cnn_per_sample_gradients_match_one_at_a_time(mode: str) -> None:
    torch.manual_seed(2)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 6])
    assert_per_sample_gradients_exact(fresh("small_cnn"), images, labels, mode, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, side", [("resnet18", 32), ("resnet18_imagenet", 64)])
def test_resnet_per_sample_gradients_match_one_at_a_time(name: str, side: int) -> None:
    # float64: in float32 the batched and single-example forwards differ by rounding, which can
    # flip a ReLU sitting at zero and move one weight's gradient by ~1% for reasons unrelated
    # to the per-sample gradient computation.
    torch.manual_seed(3)
    model = fresh(name).double()
    images, labels = torch.randn(2, 3, side, side, dtype=torch.float64), torch.tensor([1, 5])
    assert_per_sample_gradients_exact(model, images, labels, "hooks", rtol=1e-7, atol=1e-10)


def test_small_cnn_ghost_clipping_norms_are_per_example_gradient_norms() -> None:
    torch.manual_seed(4)
    model = fresh("small_cnn")
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([2, 4, 6])
    expected = torch.stack([torch.cat([g.flatten() for g in grads]).norm()
                            for grads in per_example_gradients(model, images, labels)])
    wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=1.0)
    F.cross_entropy(wrapped(images), labels).backward()
    torch.testing.assert_close(wrapped.get_norm_sample(), expected, rtol=1e-4, atol=1e-6)


def _toy_batchnorm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 2))


def test_make_private_ready_converts_a_copy_like_opacus_and_disables_inplace() -> None:
    original = _toy_batchnorm_net()
    ready = models.make_private_ready(original)
    assert isinstance(original[1], nn.BatchNorm2d) and original[2].inplace, "input must stay untouched"
    norm = ready[1]
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.affine) == (16, 48, True)
    assert ready[2].inplace is False
    assert ModuleValidator.validate(ready, strict=True) == []


def test_make_private_ready_keeps_eval_mode() -> None:
    ready = models.make_private_ready(_toy_batchnorm_net().eval())
    assert not ready.training
    assert not any(module.training for module in ready.modules())


class _Unsupported(nn.Linear):
    """A trainable layer type that a validator rejects and no fixer repairs."""


def test_make_private_ready_refuses_a_layer_opacus_cannot_handle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ModuleValidator.VALIDATORS, _Unsupported,
                        lambda module: [UnsupportedModuleError("no per-sample gradient")])
    with pytest.raises(DPImgSynError, match="cannot be trained with DP-SGD.*no per-sample gradient"):
        models.make_private_ready(nn.Sequential(_Unsupported(4, 2)))
