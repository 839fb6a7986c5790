"""scatter_cnn (ScatterNet + GroupNorm + CNN) and the cache of its fixed front end for DP-SGD."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from opacus.grad_sample.utils import wrap_model
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import privacy
import registry
from common.errors import DPImgSynError
from models.scatter import GROUP_SIZE, MIN_SIDE, ScatterCNN
from per_example import clipped_sum, per_example_gradients
from privacy.clipping import PerExampleClipper
from synthesizer.deepinversion import AlignmentConfig, optimize_batch
from synthesizer.dp_stats import per_sample_statistics
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, matching_loss, per_sample_moments, set_mode
from training.distill import DistillationConfig, StudentTrainer
from training.dp_sgd import DPSGDConfig, DPSGDTrainer
from training.accuracy import evaluate
from training.frontend import cache_front_end, cache_refusal, scoring_features, training_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 10


def model64(in_channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return registry.get_model("scatter_cnn", NUM_CLASSES, in_channels).double()


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("side", [32, 48, 64])
def test_shapes_for_gray_and_colour_images_of_every_registry_size(in_channels, side):
    model = registry.get_model("scatter_cnn", NUM_CLASSES, in_channels, image_size=side)
    images = torch.randn(2, in_channels, side, side)
    with torch.no_grad():
        features = model.frontend(images)
        logits = model(images)
    assert features.shape == (2, in_channels * 81, side // 4, side // 4)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()


def test_the_architecture_is_the_papers_mnist_scatternet_cnn():
    model = registry.get_model("scatter_cnn", NUM_CLASSES, 1)
    head = model.head
    assert (head.norm.num_groups, head.norm.num_channels, head.norm.affine) == (81 // GROUP_SIZE, 81, False)
    assert (head.conv1.out_channels, head.conv1.stride, head.conv1.padding) == (16, (2, 2), (1, 1))
    assert (head.conv2.out_channels, head.conv2.stride, head.conv2.padding) == (32, (1, 1), (1, 1))
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (32 * 4 * 4, 32, NUM_CLASSES)
    assert sum(param.numel() for param in model.parameters()) == 33_066  # gray; 56,394 for 3 channels
    assert sum(param.numel() for param in registry.get_model("scatter_cnn", NUM_CLASSES).parameters()) == 56_394
    assert MIN_SIDE == 28  # the paper's MNIST side: 7 x 7 scattering maps, 4 x 4 after the strided conv
    registry.check_model_input("scatter_cnn", 28)
    with pytest.raises(DPImgSynError, match="at least 28 x 28"):
        registry.check_model_input("scatter_cnn", 27)


def test_the_front_end_is_kymatios_transform_and_stays_out_of_the_state_dict():
    model = registry.get_model("scatter_cnn", NUM_CLASSES)
    images = torch.randn(2, 3, 32, 32)
    reference = ScatteringTorch2D(J=2, shape=(32, 32), L=8)(images).flatten(1, 2)
    with torch.no_grad():
        assert (model.frontend(images) - reference).abs().max() <= 1e-5 * reference.abs().max()
        model.frontend(torch.randn(1, 3, 48, 48))
        model.frontend(images.double())
    keys = list(model.state_dict())
    assert keys and all(key.startswith("head.") for key in keys)  # no filter bank, for any size or dtype seen
    assert list(model.buffers()) == []
    # A strided (expanded gray) batch, as synthesis feeds it, gives the same coefficients as a contiguous one.
    gray = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.frontend(gray.expand(-1, 3, -1, -1)), model.frontend(gray.repeat(1, 3, 1, 1)))


def test_the_model_is_differentiable_end_to_end_in_the_images():
    """Directional derivative of the loss in the pixels, autograd against central differences (float64)."""
    model = model64()
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    direction = torch.randn_like(images)
    pixels = images.clone().requires_grad_()
    F.cross_entropy(model(pixels), labels).backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    step = 1e-6  # the modulus has kinks: larger steps cross them
    with torch.no_grad():
        numeric = (F.cross_entropy(model(images + step * direction), labels)
                   - F.cross_entropy(model(images - step * direction), labels)) / (2 * step)
    torch.testing.assert_close((pixels.grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("max_norm", [0.01, 1e3])  # every example clipped; none
def test_fused_clipping_matches_one_backward_per_example(max_norm):
    model = model64(seed=1)
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 3, 9])
    expected_norms, expected = clipped_sum(model, images, labels, max_norm)
    clipper = PerExampleClipper(model, max_norm)
    with clipper.recording():
        logits = model(images)
    norms = clipper.clipped_backward(F.cross_entropy(logits, labels, reduction="sum"))
    clipper.remove()
    torch.testing.assert_close(norms, expected_norms, rtol=1e-9, atol=1e-12)
    got = [param.grad for param in model.parameters()]
    assert len(got) == len(expected) == 8
    for index, (grad, want) in enumerate(zip(got, expected)):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12, msg=f"parameter {index}")
    assert (expected_norms > max_norm).all() if max_norm < 1 else (expected_norms < max_norm).all()


def test_opacus_per_sample_gradients_match_one_backward_per_example():
    """The other engine (--grad_sample_mode hooks): the affine-free GroupNorm needs no per-sample rule."""
    model = model64(seed=1)
    images, labels = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([2, 4, 6])
    reference = per_example_gradients(model, images, labels)
    wrapped = wrap_model(model, "hooks", batch_first=True, loss_reduction="sum")
    F.cross_entropy(wrapped(images), labels, reduction="sum").backward()
    for index, param in enumerate(model.parameters()):
        for example in range(len(images)):
            torch.testing.assert_close(param.grad_sample[example], reference[example][index], rtol=1e-9, atol=1e-12)


def test_stat_layers_capture_the_scattering_features_and_synthesis_moves_the_images():
    torch.manual_seed(2)
    model = registry.get_model("scatter_cnn", NUM_CLASSES).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        features = model.frontend(images)  # the GroupNorm's input
    layers = attach_stat_layers(model)
    assert list(layers) == ["head.norm"] and layers["head.norm"].num_channels == 243
    statistics = per_sample_statistics(model, images)
    torch.testing.assert_close(statistics, per_sample_moments(features), rtol=1e-6, atol=1e-6)
    assert statistics.shape == (3, 2 * 243)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain)  # capture and off leave the output alone

    dp_mean, dp_var = features.mean((0, 2, 3)) + 0.1, features.var((0, 2, 3), unbiased=False) + 0.2
    load_dp_statistics(model, {"head.norm": {"mean": dp_mean, "var": dp_var}})
    set_mode(model, "synthesis")
    pixels = images.clone().requires_grad_()
    logits = model(pixels)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)
    loss = matching_loss(model)
    expected = (torch.linalg.vector_norm(features.mean((0, 2, 3)) - dp_mean)
                + torch.linalg.vector_norm(features.var((0, 2, 3), unbiased=False) - dp_var))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    (loss + F.cross_entropy(logits, torch.tensor([0, 1, 2]))).backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0

    for param in model.parameters():
        param.requires_grad_(False)
    start = torch.rand(2, 1, 32, 32).expand(-1, 3, -1, -1)  # gray: one channel optimized, repeated
    result = optimize_batch(model, start, torch.tensor([4, 5]), 2, AlignmentConfig(), torch.full((3,), -1.0),
                            torch.full((3,), 2.0), torch.Generator().manual_seed(0), grayscale=True)
    assert not torch.equal(result.images, start) and torch.isfinite(result.images).all()
    assert torch.equal(result.images[:, 0], result.images[:, 2])
    assert result.losses["statistics"] > 0


def images_and_labels(count: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, 3, 32, 32, generator=generator, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES, (count,), generator=generator))


def test_the_head_on_cached_features_gets_each_examples_own_gradient():
    model = model64(seed=4)
    images, labels = images_and_labels(4)
    head, features = cache_front_end(model, TensorDataset(images, labels))
    assert list(head._modules) == list(model.head._modules)[1:] and head.conv1 is model.head.conv1  # after the norm
    assert features.tensors[0].shape == (4, 243, 8, 8) and torch.equal(features.tensors[1], labels)
    on_images = per_example_gradients(model, images, labels)
    on_features = per_example_gradients(head, *features.tensors)
    for whole, cached in zip(on_images, on_features):
        assert len(whole) == len(cached) == 8
        for grad_whole, grad_cached in zip(whole, cached):
            torch.testing.assert_close(grad_cached, grad_whole, rtol=1e-10, atol=1e-13)


def test_dp_sgd_on_cached_features_trains_the_model_the_teacher_saves(tmp_path):
    """Same seeds: the same Poisson batches, clipped sums and noise, so the same weights (float64)."""
    images, labels = images_and_labels(8, seed=5)
    config = DPSGDConfig(epochs=2, train_batch_size=4, lr=0.5, max_norm=0.1, noise_multiplier=1.0)
    whole = model64(seed=6)
    cached = copy.deepcopy(whole)
    trainer = DPSGDTrainer(whole, TensorDataset(images, labels), config, torch.device("cpu"), seed=11)
    head, features = cache_front_end(cached, TensorDataset(images, labels))
    head_trainer = DPSGDTrainer(head, features, config, torch.device("cpu"), seed=11)
    for _ in range(config.epochs):
        trainer.train_epoch(progress=False)
        head_trainer.train_epoch(progress=False)
    state, expected = cached.state_dict(), whole.state_dict()
    assert list(state) == list(expected) == list(registry.get_model("scatter_cnn", NUM_CLASSES).state_dict())
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-9, atol=1e-12, msg=key)
    assert not torch.equal(state["head.fc2.weight"], model64(seed=6).state_dict()["head.fc2.weight"])

    block = privacy.privacy_block([privacy.mechanism_entry("dp_sgd", 1.0, 0.5, 4, 0.1)], 1e-5, accountant="rdp")
    path = privacy.save_dppt(tmp_path / "teacher", privacy.dppt_payload(
        "teacher", cached.float().state_dict(), "scatter_cnn", NUM_CLASSES, "mnist5k", block))
    checkpoint = privacy.load_dppt(path)  # weights_only=True
    loaded = registry.model_from_checkpoint(checkpoint, path)
    for side in (32, 64):  # no size-dependent filters were saved: the weights serve any image size
        batch = torch.randn(2, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch), cached(batch))


def test_a_student_on_cached_features_trains_the_same_weights_as_on_images():
    """The student stage trains scatter_cnn's head on the scattering of the release, computed once."""
    images, labels = images_and_labels(8, seed=7)
    soft_labels = torch.randn(8, NUM_CLASSES, dtype=torch.float64)
    config = DistillationConfig(epochs=2, batch_size=4, lr=0.05, temperature=4.0)
    whole = model64(seed=8)
    cached = copy.deepcopy(whole)
    head, features = cache_front_end(cached, TensorDataset(images, labels))
    for model, inputs in ((whole, images), (head, features.tensors[0])):
        StudentTrainer(model, inputs, soft_labels, labels, config, torch.device("cpu"), seed=3).fit(progress=False)
    state, expected = cached.state_dict(), whole.state_dict()
    assert not torch.equal(expected["head.fc2.weight"], model64(seed=8).state_dict()["head.fc2.weight"])
    for key in expected:  # the distillation loss runs in float32
        torch.testing.assert_close(state[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_head_scores_cached_features_as_the_model_scores_the_images():
    """Stage 1 scores every epoch on the evaluation sets' features, computed once (float64: exact)."""
    model = model64(seed=9)
    images, labels = images_and_labels(6, seed=10)
    head, features = training_inputs(model, TensorDataset(images, labels))
    assert head.conv1 is model.head.conv1 and features.tensors[0].shape == (6, 243, 8, 8)
    test_images, test_labels = images_and_labels(5, seed=11)
    test_set = PerItemView(test_images, test_labels)  # any dataset, not only in-memory ones
    scored = scoring_features(model, head, test_set, "cpu", batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(head(scored.tensors[0]), model(test_images), rtol=1e-12, atol=1e-12)
    assert torch.equal(scored.tensors[1], test_labels)
    assert evaluate(head, scored, torch.device("cpu")) == evaluate(model, test_set, torch.device("cpu"))
    assert model.training  # the front end is back in its mode
    assert scoring_features(model, model, test_set, "cpu") is None  # the model trains on images
    assert scoring_features(model, head, test_set, "cpu", max_bytes=1000) is None  # too large: score images
    small = registry.get_model("small_cnn", NUM_CLASSES)
    trained, data = training_inputs(small, TensorDataset(images.float(), labels))
    assert trained is small and torch.equal(data.tensors[0], images.float())  # no front end: unchanged
    assert scoring_features(small, small, test_set, "cpu") is None


class PerItemView(Dataset):
    """Examples read one at a time (a dataset that is not held in memory)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class Noisy(nn.Module):
    """A front end that is not a fixed function of the example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


class PerItem(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 32, 32), 0


def with_front_end(frontend: nn.Module) -> nn.Module:
    model = nn.Module()
    model.frontend, model.head = frontend, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4, 2))
    model.forward = lambda x: model.head(model.frontend(x))
    return model


def test_the_cache_is_refused_where_it_would_change_what_dp_sgd_computes():
    images, labels = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    data = TensorDataset(images, labels)
    scatter = ScatterCNN(NUM_CLASSES)
    assert cache_refusal(scatter, data) is None
    assert "augmented" in cache_refusal(scatter, data, augmented=True)
    with pytest.raises(DPImgSynError, match="augmented view"):
        cache_front_end(scatter, data, augmented=True)
    assert "no fixed front end" in cache_refusal(registry.get_model("small_cnn", 2), data)
    with pytest.raises(DPImgSynError, match="randomness in the front end or in reading the dataset"):
        cache_front_end(scatter, PerItem())  # each read draws anew
    pooled = nn.AdaptiveAvgPool2d(2)
    assert cache_refusal(with_front_end(nn.Sequential(pooled, nn.Conv2d(3, 3, 1))), data).startswith(
        "the front end has trainable parameters")
    with pytest.raises(DPImgSynError, match="batch statistics"):
        cache_front_end(with_front_end(nn.Sequential(pooled, nn.BatchNorm2d(3, affine=False))), data)
    with pytest.raises(DPImgSynError, match="alone gets other features"):
        cache_front_end(with_front_end(nn.Sequential(pooled, Noisy())), data)
