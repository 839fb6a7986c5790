"""Stage 3's optimizer: k = 0 is the identity, k > 0 moves images toward the DP statistics."""
from __future__ import annotations

from dataclasses import asdict, fields

import pytest
import torch

import registry
import stages.synthesis
from common.batches import stack_items
from stages.synthesis import load_teacher_for_synthesis
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.stat_norm import matching_loss
from synthesizer.terms import TERMS, loss_term


def _setup(tiny_pipeline):
    out, _ = tiny_pipeline
    teacher, checkpoint, _ = load_teacher_for_synthesis(out / "statistics.dppt", False, torch.device("cpu"))
    spec = registry.dataset_info(checkpoint["dataset"])
    public = registry.aligned("photos", checkpoint["dataset"])
    images = stack_items(public, list(range(60)))
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    return teacher, images, (0 - mean) / std, (1 - mean) / std


def test_zero_steps_release_the_public_images_unchanged(tiny_pipeline):
    teacher, images, low, high = _setup(tiny_pipeline)
    result = optimize_batch(teacher, images, cyclic_targets(0, 60, 10), 0, AlignmentConfig(), low, high,
                            torch.Generator().manual_seed(0), grayscale=True)
    assert torch.equal(result.images, images)


def test_steps_lower_the_statistics_loss_and_keep_valid_gray_pixels(tiny_pipeline):
    teacher, images, low, high = _setup(tiny_pipeline)
    with torch.no_grad():
        teacher(images)
        before = float(matching_loss(teacher))
    result = optimize_batch(teacher, images, cyclic_targets(0, 60, 10), 15, AlignmentConfig(), low, high,
                            torch.Generator().manual_seed(0), grayscale=True)
    with torch.no_grad():
        teacher(result.images)
        after = float(matching_loss(teacher))
    assert after < 0.8 * before
    assert not torch.equal(result.images, images)
    assert bool((result.images >= low.view(1, -1, 1, 1) - 1e-5).all() and
                (result.images <= high.view(1, -1, 1, 1) + 1e-5).all())
    assert torch.equal(result.images[:, 0], result.images[:, 1])  # gray stays gray


def _tiny_synthesis_teacher() -> torch.nn.Module:
    """Two GroupNorm layers holding (made-up) DP statistics far from the images' own: both loss terms are large."""
    from torch import nn

    from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, set_mode

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                            nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    layers = attach_stat_layers(teacher)
    load_dp_statistics(teacher, {name: {"mean": torch.randn(layer.num_channels),
                                        "var": torch.rand(layer.num_channels) + 0.5} for name, layer in layers.items()})
    set_mode(teacher, "synthesis")
    return teacher


@pytest.mark.parametrize("grayscale", [False, True], ids=["color", "gray"])
def test_bn_and_oh_weights_scale_their_own_parts_of_the_image_gradient(grayscale, single_thread):
    """The gradient reaching the images is bn * grad(statistics loss) + oh * grad(CE) for every (bn, oh).

    Guards against a weight that silently stops acting: ``oh`` ignored (CE weighted 1 whatever it says, so oh = 0
    still pulls towards the targets), or ``bn`` rescaled inside the loss (e.g. divided by 10). The gradient is read
    at the teacher's input during the first step (no jitter or flip, so that input is the start batch) and compared
    with the two parts computed directly from the documented loss.
    """
    import torch.nn.functional as F

    teacher = _tiny_synthesis_teacher()
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(10, 1 if grayscale else 3, 8, 8, generator=generator).expand(-1, 3, -1, -1).contiguous()
    targets = cyclic_targets(0, 10, 5)
    bound = torch.full((3,), 50.0)

    x = start.clone().requires_grad_(True)
    logits = teacher(x)
    statistics_loss, class_loss = matching_loss(teacher), F.cross_entropy(logits, targets)
    grad_bn, = torch.autograd.grad(statistics_loss, x, retain_graph=True)
    grad_oh, = torch.autograd.grad(class_loss, x)
    statistics_loss, class_loss = float(statistics_loss.detach()), float(class_loss.detach())
    ratio = float(grad_oh.norm() / grad_bn.norm())
    assert 0.05 < ratio < 20, ratio  # both parts matter, so neither hides the other's weight

    seen = []

    def watch_input_gradient(module, args):
        if args[0].requires_grad:  # the optimization steps, not the final no-grad pass for the logits
            args[0].register_hook(lambda grad: seen.append(grad.clone()))

    teacher.register_forward_pre_hook(watch_input_gradient)
    for bn, oh in [(1.0, 0.0), (0.0, 1.0), (10.0, 1.0), (10.0, 0.0), (2.5, 4.0)]:
        seen.clear()
        weights = AlignmentConfig(statistics_weight=bn, class_weight=oh, smoothness_weight=0.0, image_norm_weight=0.0,
                                  lr=1e-3, jitter=False, flip=False)
        result = optimize_batch(teacher, start, targets, 1, weights, -bound, bound, torch.Generator().manual_seed(0),
                                grayscale=grayscale)
        assert len(seen) == 1, "the teacher's input gradient was not observed exactly once"
        expected = bn * grad_bn + oh * grad_oh
        torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert result.losses["statistics"] == pytest.approx(statistics_loss, rel=1e-5)
        assert result.losses["class"] == pytest.approx(class_loss, rel=1e-5)
        assert result.losses["total"] == pytest.approx(bn * statistics_loss + oh * class_loss, rel=1e-5)


def test_synthesize_cli_hands_its_loss_weights_to_the_optimizer(tiny_pipeline, tmp_path, monkeypatch):
    """``--bn``/``--oh``/``--tv``/``--l2``/``--lr_g`` reach the optimizer: a flag dropped on the way (e.g. the
    weights built with ``oh=1.0``) would leave the release's recorded settings right and its images wrong."""
    import synthesize

    out, _ = tiny_pipeline
    used = []
    real = stages.synthesis.optimize_batch

    def spy(teacher, start, targets, steps, weights, *args, **kwargs):
        used.append((steps, weights))
        return real(teacher, start, targets, steps, weights, *args, **kwargs)

    monkeypatch.setattr(stages.synthesis, "optimize_batch", spy)
    synthesize.run(["--teacher", str(out / "statistics.dppt"), "--public_set", "photos", "--num_samples", "10",
                    "--g_steps", "1", "--batch_size", "10", "--bn", "3", "--oh", "0.25", "--tv", "1e-4",
                    "--l2", "2e-8", "--lr_g", "0.05", "--output", str(tmp_path / "rel"), "--no_progress",
                    "--device", "cpu"])
    assert len(used) == 1, "synthesis did not call optimize_batch as imported by stages.synthesis"
    steps, weights = used[0]
    assert steps == 1
    expected = AlignmentConfig(statistics_weight=3.0, class_weight=0.25, smoothness_weight=1e-4,
                               image_norm_weight=2e-8, lr=0.05)
    assert {field.name: getattr(weights, field.name) for field in fields(AlignmentConfig)} == asdict(expected)


def test_every_loss_term_has_its_weight_field_and_every_weight_field_its_term():
    assert sorted(AlignmentConfig().term_weights()) == sorted(TERMS)


def test_a_taken_loss_term_name_is_refused():
    before = dict(TERMS)
    with pytest.raises(ValueError, match="loss term 'class' is registered twice"):
        loss_term("class")(lambda inputs: inputs.logits.sum())
    assert TERMS == before
