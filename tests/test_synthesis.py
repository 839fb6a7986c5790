"""Stage 3's optimizer: k = 0 is the identity, k > 0 moves images toward the DP statistics."""
from __future__ import annotations

import torch

import registry
from engine.data import stack_items
from engine.synthesis import load_teacher_for_synthesis
from synthesizer.deepinversion import SynthesisWeights, cyclic_targets, optimize_batch
from synthesizer.stat_norm import matching_loss


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
    result = optimize_batch(teacher, images, cyclic_targets(0, 60, 10), 0, SynthesisWeights(), low, high,
                            torch.Generator().manual_seed(0), grayscale=True)
    assert torch.equal(result.images, images)


def test_steps_lower_the_statistics_loss_and_keep_valid_gray_pixels(tiny_pipeline):
    teacher, images, low, high = _setup(tiny_pipeline)
    with torch.no_grad():
        teacher(images)
        before = float(matching_loss(teacher))
    result = optimize_batch(teacher, images, cyclic_targets(0, 60, 10), 15, SynthesisWeights(), low, high,
                            torch.Generator().manual_seed(0), grayscale=True)
    with torch.no_grad():
        teacher(result.images)
        after = float(matching_loss(teacher))
    assert after < 0.8 * before
    assert not torch.equal(result.images, images)
    assert bool((result.images >= low.view(1, -1, 1, 1) - 1e-5).all() and
                (result.images <= high.view(1, -1, 1, 1) + 1e-5).all())
    assert torch.equal(result.images[:, 0], result.images[:, 1])  # gray stays gray
