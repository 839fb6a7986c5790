"""The DP statistics mechanism: sensitivity, noise scale, correctness, sampling, resume, pre-scaling."""
from __future__ import annotations

import copy
import io
import math
import statistics

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import RandomHorizontalFlip

import privacy.sampling
import registry
from common.distributed import Distributed
from common.errors import DPImgSynError
from common.files import cache_root
from privacy.moments import add_gaussian_noise, clip_rows, clipped_sum, noisy_global_sum
from synthesizer import dp_stats
from training import frontend
from synthesizer.dp_stats import (StatsResult, compute_dp_statistics, per_sample_statistics, public_clip_norm,
                                  public_scales, relative_errors, statistic_dimension)
from synthesizer.stat_norm import attach_stat_layers, stat_layers
from tests.test_stat_norm import ResidualBlock, group_norm_inputs, with_random_affine


pytestmark = pytest.mark.usefixtures("single_thread")


def gn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()


def residual_cnn() -> nn.Module:
    torch.manual_seed(2)
    return with_random_affine(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), ResidualBlock(4, 6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )).eval()


def registry_resnet18() -> nn.Module:
    models = pytest.importorskip("models")
    torch.manual_seed(3)
    return models.MODELS["resnet18"](10).eval()


def scatter_cnn() -> nn.Module:
    torch.manual_seed(5)
    return registry.get_model("scatter_cnn", 3, 3, 28).eval()


def zero_model(channels: int = 1024) -> nn.Module:
    """Bias-free convs: zero images give zero normalization inputs, so every v_i is exactly 0."""
    return nn.Sequential(nn.Conv2d(3, channels, 1, bias=False), nn.GroupNorm(8, channels)).eval()


def dataset(n: int, side: int = 8, seed: int = 0, offset: float = 0.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, side, side, generator=generator) + offset, torch.zeros(n, dtype=torch.long))


def run(model: nn.Module, data: Dataset, **overrides) -> StatsResult:
    settings = dict(epochs=1, batch_size=4, max_norm=10.0, noise_multiplier=1.0, seed=0, device="cpu",
                    progress=False)
    settings.update(overrides)
    return compute_dp_statistics(model, data, **settings)


# --------------------------------------------------------------------------- clipping = sensitivity
def test_clip_rows_bounds_every_norm_and_keeps_small_rows():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1e30, -1e30], [float("inf"), 1.0], [float("nan"), 0.0]])
    clipped = clip_rows(rows, 1.0)
    norms = torch.linalg.vector_norm(clipped, dim=1)
    assert (norms <= 1.0).all()
    assert norms[0] == pytest.approx(1.0) and norms[2] == pytest.approx(1.0)
    torch.testing.assert_close(clipped[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    torch.testing.assert_close(clipped[1], rows[1].double())
    assert torch.equal(clipped[3:], torch.zeros(2, 2, dtype=torch.float64))  # non-finite rows contribute nothing
    with pytest.raises(DPImgSynError):
        clip_rows(rows, 0.0)


def clipped_statistics_sum(model, images, max_norm, scales=None):
    """What one step of the mechanism sums: the clipped, pre-scaled per-sample statistics."""
    per_sample = per_sample_statistics(model, images)
    return clipped_sum(per_sample if scales is None else per_sample / scales, max_norm)


@pytest.mark.parametrize("make_model", [gn_cnn, residual_cnn, registry_resnet18],
                         ids=["gn_cnn", "basic_block", "resnet18"])
@pytest.mark.parametrize("prescaled", [False, True], ids=["plain", "prescaled"])
def test_adding_one_adversarial_example_moves_the_clipped_sum_by_at_most_C(make_model, prescaled):
    model = make_model()
    attach_stat_layers(model)
    side = 32 if make_model is registry_resnet18 else 8
    images = dataset(3, side).tensors[0]
    adversary = images[:1] * 1e4
    max_norm = 2.0
    scales = public_scales(model, dataset(4, side, seed=9).tensors[0]) if prescaled else None
    raw = per_sample_statistics(model, adversary)
    assert float(torch.linalg.vector_norm(raw)) > 1e3 * max_norm  # the adversary would dominate unclipped

    without = clipped_statistics_sum(model, images, max_norm, scales)
    with_adversary = clipped_statistics_sum(model, torch.cat([images, adversary]), max_norm, scales)
    with_ordinary = clipped_statistics_sum(model, torch.cat([images, images[1:2] * 0.5]), max_norm, scales)
    moved = float(torch.linalg.vector_norm(with_adversary - without))
    assert moved <= max_norm * (1 + 1e-9)
    assert moved >= 0.999 * max_norm
    assert float(torch.linalg.vector_norm(with_ordinary - without)) <= max_norm * (1 + 1e-9)


def test_per_sample_rows_depend_on_their_own_image_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(4, 4)).train()
    attach_stat_layers(model)
    images = dataset(4).tensors[0]
    images[0] *= 1e4
    together = per_sample_statistics(model, images)
    alone = torch.cat([per_sample_statistics(model, image[None]) for image in images])
    torch.testing.assert_close(together[1:], alone[1:], rtol=1e-5, atol=1e-5)
    assert model.training  # the model ran in eval mode (no dropout) and got its mode back


def noisy_clipped_sum(per_sample, max_norm, noise_multiplier, generator):
    """The Gaussian mechanism on one batch: the clipped sum, then N(0, (sigma * C)^2 I) once."""
    return noisy_global_sum(clipped_sum(per_sample, max_norm), max_norm, noise_multiplier, generator)


def test_noisy_clipped_sum_adds_noise_of_scale_sigma_times_C():
    per_sample = torch.zeros(3, 20000)
    generator = torch.Generator().manual_seed(0)
    noisy = noisy_clipped_sum(per_sample, max_norm=2.0, noise_multiplier=1.5, generator=generator)
    assert float(noisy.std()) == pytest.approx(3.0, rel=0.03)
    huge = torch.full((1, 20000), 1e6)
    assert float(torch.linalg.vector_norm(noisy_clipped_sum(huge, 2.0, 1e-9, None))) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(DPImgSynError):
        add_gaussian_noise(torch.zeros(3), 1.0, 0.0, None)


# --------------------------------------------------------------------------- the whole mechanism
@pytest.mark.parametrize("scale_value", [None, 3.0])
def test_averaged_moments_of_zero_statistics_are_noise_of_the_documented_scale(scale_value):
    model = zero_model()
    data = TensorDataset(torch.zeros(100, 3, 2, 2), torch.zeros(100))
    sigma, max_norm, batch_size, epochs = 1.3, 0.7, 10, 2
    attach_stat_layers(model)
    dimension = statistic_dimension(model)
    scales = None if scale_value is None else torch.full((dimension,), scale_value)
    result = run(model, data, epochs=epochs, batch_size=batch_size, max_norm=max_norm,
                 noise_multiplier=sigma, scales=scales)
    q, n, steps = batch_size / 100, 100, result.mechanism["steps"]
    assert steps == 20
    expected = sigma * max_norm / (q * n * math.sqrt(steps))
    moments = result.moments.double()
    assert float(moments.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(moments.mean())) < 5 * expected / math.sqrt(dimension)
    means = torch.cat([layer["mean"] for layer in result.stats.values()]).double()
    assert float(means.std()) == pytest.approx(expected * (scale_value or 1.0), rel=0.1)


def test_exact_statistics_match_a_direct_computation():
    model = residual_cnn()
    data = dataset(10, offset=0.5)
    reference = group_norm_inputs(copy.deepcopy(model), data.tensors[0])
    exact = run(model, data, non_private=True, max_physical_batch_size=3)
    assert exact.mechanism == {"name": "dp_statistics", "non_private": True, "sample_rate": 1.0, "steps": 1}
    assert list(exact.stats) == list(reference)
    for name, inputs in reference.items():
        var, mean = torch.var_mean(inputs.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(exact.stats[name]["mean"], mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exact.stats[name]["var"], var.float().clamp(min=dp_stats.VAR_FLOOR),
                                   rtol=1e-4, atol=1e-5)


def test_vanishing_noise_and_large_clip_norm_recover_the_exact_statistics():
    model = residual_cnn()
    data = dataset(12, offset=0.5)
    exact = run(model, data, non_private=True)
    full_batches = run(model, data, batch_size=12, epochs=3, max_norm=1e3, noise_multiplier=1e-9)
    for name, layer in exact.stats.items():
        for key in ("mean", "var"):
            torch.testing.assert_close(full_batches.stats[name][key], layer[key], rtol=1e-4, atol=1e-5)
    sampled = run(model, data, batch_size=6, epochs=100, max_norm=1e3, noise_multiplier=1e-9)
    moment_error = torch.linalg.vector_norm(sampled.moments - exact.moments) / torch.linalg.vector_norm(exact.moments)
    assert float(moment_error) < 0.03  # only the Poisson batch-size fluctuation remains


def test_mechanism_record_and_step_convention():
    result = run(gn_cnn(), dataset(10), epochs=2, batch_size=3, max_norm=1.5, noise_multiplier=0.8)
    assert result.mechanism == {"name": "dp_statistics", "non_private": False, "noise_multiplier": 0.8,
                                "sample_rate": 0.3, "steps": 2 * math.ceil(10 / 3), "max_norm": 1.5,
                                "prescaled": False}
    assert all(bool((layer["var"] >= dp_stats.VAR_FLOOR).all()) for layer in result.stats.values())
    fractional = run(gn_cnn(), dataset(100, side=4), epochs=0.3, batch_size=10)
    assert fractional.mechanism["steps"] == 3  # ceil(epochs * ceil(N / batch)), immune to 0.3 * 10 > 3


def test_poisson_batches_vary_around_the_expected_size_and_seeds_reproduce(monkeypatch):
    sizes = []
    original = privacy.sampling.poisson_batch

    def spy(num_examples, sample_rate, generator):
        indices = original(num_examples, sample_rate, generator)
        sizes.append(len(indices))
        return indices

    monkeypatch.setattr(privacy.sampling, "poisson_batch", spy)
    data = TensorDataset(torch.zeros(200, 3, 2, 2), torch.zeros(200))
    first = run(zero_model(8), data, epochs=10, batch_size=20)
    assert len(sizes) == 100
    assert statistics.mean(sizes) == pytest.approx(20, abs=2)
    assert 2 < statistics.pstdev(sizes) < 7  # binomial(200, 0.1): std 4.2, not a fixed batch
    again = run(zero_model(8), data, epochs=10, batch_size=20)
    other = run(zero_model(8), data, epochs=10, batch_size=20, seed=1)
    assert torch.equal(first.moments, again.moments)
    assert not torch.equal(first.moments, other.moments)

    sizes.clear()
    tiny = run(zero_model(8), TensorDataset(torch.zeros(10, 3, 2, 2), torch.zeros(10)), epochs=3, batch_size=1)
    assert 0 in sizes  # empty batches happen, and they still get noise
    assert bool(torch.isfinite(tiny.moments).all()) and bool((tiny.moments != 0).all())


class ListDataset(Dataset):
    """A dataset without ``.tensors``: served through a DataLoader."""

    def __init__(self, tensors: TensorDataset) -> None:
        self.items = list(zip(*tensors.tensors))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_physical_batching_and_data_path_do_not_change_the_result():
    model = gn_cnn()
    data = dataset(20)
    reference = run(model, data, epochs=2, batch_size=10)
    chunked = run(model, data, epochs=2, batch_size=10, max_physical_batch_size=3)
    via_loader = run(model, ListDataset(data), epochs=2, batch_size=10, max_physical_batch_size=4)
    torch.testing.assert_close(chunked.moments, reference.moments, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(via_loader.moments, reference.moments, rtol=1e-6, atol=1e-7)


def test_interrupted_run_resumes_to_the_identical_result():
    model = gn_cnn()
    data = dataset(20)
    settings = dict(epochs=5, batch_size=5, checkpoint_every=3)  # 20 steps, checkpoints after 3, 6, ...
    uninterrupted = run(model, data, **settings)

    saved = []

    class Killed(Exception):
        pass

    def checkpoint(state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)  # the state must survive a trip through a weights-only file
        saved.append(buffer.getvalue())
        if len(saved) == 3:
            raise Killed

    with pytest.raises(Killed):
        run(model, data, checkpoint_fn=checkpoint, **settings)
    state = torch.load(io.BytesIO(saved[-1]), weights_only=True)
    assert state["step"] == 9
    resumed = run(model, data, state=state, **settings)
    assert torch.equal(resumed.moments, uninterrupted.moments)
    assert resumed.mechanism == uninterrupted.mechanism
    with pytest.raises(DPImgSynError, match="other settings"):
        run(model, data, state=state, **dict(settings, max_norm=3.0))


def test_prescaling_with_public_scales_reduces_error_on_mismatched_layers():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8),
    ).eval()
    with torch.no_grad():  # layer inputs on very different scales: the big one eats the clipping norm
        model[0].weight.mul_(30.0)
        model[0].bias.fill_(3.0)
        model[3].weight.mul_(0.05)
        model[3].bias.fill_(0.02)
    private = dataset(200, side=6, offset=0.3)
    public = dataset(100, side=6, seed=7, offset=0.3).tensors[0]
    exact = run(model, private, non_private=True)
    settings = dict(epochs=5, batch_size=50, noise_multiplier=1.0)

    def median_error(scales):
        clip = public_clip_norm(model, public, scales, quantile=0.9)
        result = run(model, private, max_norm=clip, scales=scales, **settings)
        errors = relative_errors(result.stats, exact.stats)
        return statistics.median(e[key] for e in errors.values() for key in ("mean", "var"))

    plain = median_error(None)
    prescaled = median_error(public_scales(model, public))
    assert prescaled < 0.5 * plain, (plain, prescaled)


def test_public_calibration_is_the_scales_and_the_clip_norm_from_one_pass(monkeypatch):
    model, public = gn_cnn(), dataset(24, seed=11).tensors[0]
    scales = public_scales(model, public, batch_size=10)
    clip = public_clip_norm(model, public, scales, quantile=0.7, batch_size=10)
    seen = counted(model, monkeypatch)
    calibrated_scales, calibrated_clip = dp_stats.public_calibration(model, public, 0.7, batch_size=10)
    assert torch.equal(calibrated_scales, scales) and calibrated_clip == clip
    assert sum(seen) == 24  # each public image once
    assert dp_stats.public_calibration(model, public, None)[1] is None
    with pytest.raises(DPImgSynError, match="quantile"):
        dp_stats.public_calibration(model, public, 1.5)


def test_public_scales_are_positive_and_floored():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.GroupNorm(2, 4)).eval()
    with torch.no_grad():
        model[0].weight[0].zero_()  # channel 0 is identically zero on every image
    scales = public_scales(model, dataset(8), floor_fraction=0.1)
    assert scales.shape == (statistic_dimension(model),)
    assert bool((scales > 0).all())
    block_rms = float(scales[1:4].pow(2).sum().div(4).sqrt())  # the block's RMS, channel 0 contributing 0
    assert float(scales[0]) == pytest.approx(0.1 * block_rms, rel=1e-5)
    assert bool((scales[1:4] > scales[0]).all())
    with pytest.raises(DPImgSynError, match="empty"):
        public_scales(model, torch.zeros(0, 3, 8, 8))


def test_relative_errors_are_per_layer_l2_ratios():
    exact = {"a": {"mean": torch.tensor([3.0, 4.0]), "var": torch.tensor([1.0, 1.0])}}
    noisy = {"a": {"mean": torch.tensor([3.0, 4.5]), "var": torch.tensor([1.0, 1.0])}}
    assert relative_errors(noisy, exact) == {"a": {"mean": pytest.approx(0.1), "var": 0.0}}


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=50), "batch size"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(max_norm=float("inf")), "max_norm"),
    (dict(epochs=-1), "epochs"),
    (dict(scales=torch.ones(3)), "pre-scaling"),
    (dict(scales=torch.zeros(20)), "positive"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(DPImgSynError, match=message):
        run(gn_cnn(), dataset(10), **overrides)


def test_teacher_keeps_its_layer_names_in_the_result():
    model = gn_cnn()
    result = run(model, dataset(8))
    assert list(result.stats) == ["1", "4"] == list(stat_layers(model))
    assert [tuple(s["mean"].shape) for s in result.stats.values()] == [(4,), (6,)]


@pytest.mark.parametrize("steps", [1, 4])
def test_a_step_whose_poisson_batch_is_empty_still_releases_its_noise(monkeypatch, steps):
    """Every sampled batch is empty: the released moments are pure noise of std sigma*C / (q*N*sqrt(S)).

    Guards against a mechanism that skips the noise (or the whole step) when the Poisson batch is empty: an empty
    step then releases exact zeros, and "no example was sampled" becomes visible. ``steps == 1`` checks the empty
    step on its own, not an average with non-empty ones. The patched sampler must be the one the mechanism calls.
    2048 coordinates estimate the std to ~1.6%, so the 10% tolerance is 6 standard errors.
    """
    import privacy.sampling

    calls = []

    def nobody(num_examples, sample_rate, *args, **kwargs):
        calls.append((num_examples, sample_rate))
        return torch.empty(0, dtype=torch.long)

    monkeypatch.setattr(privacy.sampling, "poisson_batch", nobody)
    model = zero_model()
    num_examples, batch_size, sigma, max_norm = 100, 10, 1.3, 0.7
    data = TensorDataset(torch.ones(num_examples, 3, 2, 2), torch.zeros(num_examples))
    result = run(model, data, epochs=steps / 10, batch_size=batch_size, max_norm=max_norm, noise_multiplier=sigma)
    assert result.mechanism["steps"] == steps
    assert calls == [(num_examples, batch_size / num_examples)] * steps, "the mechanism did not use the sampler"
    moments = result.moments.double()
    expected = sigma * max_norm / (batch_size * math.sqrt(steps))  # q * N = batch_size
    assert bool((moments != 0).all())
    assert float(moments.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(moments.mean())) < 5 * expected / math.sqrt(len(moments))


# --------------------------------------------------------------------------- each example's vector computed once
def counted(model: nn.Module, monkeypatch) -> list[int]:
    """Images through ``model`` per call of per_sample_statistics."""
    seen = []
    original = dp_stats.per_sample_statistics

    def spy(spied: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if spied is model:
            seen.append(len(images))
        return original(spied, images)

    monkeypatch.setattr(dp_stats, "per_sample_statistics", spy)
    return seen


@pytest.mark.parametrize("make_model", [gn_cnn, scatter_cnn])
def test_vectors_computed_once_give_the_per_step_result(monkeypatch, make_model):
    """The steps read each example's vector from a table: the same release, the teacher run once per example.
    Bit for bit for scatter_cnn (the demo's model): its rows do not depend on their batch; a convolution's rows
    may differ in the last bits between batch sizes."""
    model, data, said = make_model(), dataset(30, side=28), []
    seen = counted(model, monkeypatch)
    once = run(model, data, epochs=3, batch_size=6, max_physical_batch_size=4, say=said.append)
    assert sum(seen) == 30
    assert said[0] == ("DP statistics: the teacher runs once on each of the 30 records, whose statistics vectors the "
                       f"Poisson steps then read ({30 * statistic_dimension(model) * 4 / 2**20:,.1f} MiB, in memory)")
    seen.clear()
    monkeypatch.setattr(dp_stats, "precompute_refusal", lambda *args, **kwargs: "switched off")
    every_step = run(model, data, epochs=3, batch_size=6, max_physical_batch_size=4, say=said.append)
    assert sum(seen) > 45  # ~90 sampled examples over 15 steps
    assert said[1] == "DP statistics: the teacher runs on every sampled batch (switched off)"
    if make_model is scatter_cnn:
        assert torch.equal(once.moments, every_step.moments)
    torch.testing.assert_close(once.moments, every_step.moments, rtol=1e-6, atol=1e-7)
    assert once.mechanism == every_step.mechanism


def test_vectors_beyond_the_memory_bound_go_to_an_unlinked_owner_only_file(monkeypatch):
    model, data = gn_cnn(), dataset(12)
    attach_stat_layers(model)
    shapes = []
    original = frontend.private_file_tensor

    def spy(shape, dtype):
        shapes.append(shape)
        return original(shape, dtype)

    monkeypatch.setattr(frontend, "private_file_tensor", spy)
    in_memory = dp_stats.precomputed_vectors(model, data, torch.device("cpu"), batch_size=5, progress=False)
    assert shapes == []
    in_file = dp_stats.precomputed_vectors(model, data, torch.device("cpu"), batch_size=5, progress=False,
                                           max_bytes=0)
    assert shapes == [(12, statistic_dimension(model))]
    folder = cache_root() / frontend.CACHE_FOLDER
    assert not list(folder.glob("private-*"))  # unlinked as soon as it was opened
    assert torch.equal(in_memory.tensors[0], in_file.tensors[0])
    assert torch.equal(in_memory.tensors[0], per_sample_statistics(model, data.tensors[0]))
    assert torch.equal(in_file.tensors[1], data.tensors[1])


class RandomlyFlipped(ListDataset):
    transform = RandomHorizontalFlip()


def test_vectors_are_computed_in_every_step_where_a_table_would_not_help_or_would_be_wrong(monkeypatch):
    data = dataset(10)
    assert "1 expected passes over the set on 1 process(es)" in dp_stats.precompute_refusal(data, 8, epochs=1)
    assert "3 expected passes over the set on 4 process(es)" in dp_stats.precompute_refusal(
        data, 8, epochs=3, dist=Distributed(0, 4))
    assert dp_stats.precompute_refusal(data, 8, epochs=1.5) is None
    assert "random transform" in dp_stats.precompute_refusal(RandomlyFlipped(data), 8, epochs=2)
    monkeypatch.setattr(dp_stats, "cache_free_bytes", lambda: 0)
    assert "GiB: more than" in dp_stats.precompute_refusal(data, 8, epochs=2, max_bytes=100)
    assert dp_stats.precompute_refusal(data, 8, epochs=2) is None  # within the memory bound the disk does not matter
