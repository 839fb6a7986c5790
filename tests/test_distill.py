"""Knowledge distillation: the loss is the documented KL at temperature T, teacher first."""
from __future__ import annotations

import math

import torch

from engine.distill import StudentConfig, kd_loss, random_crop_flip


def test_kd_loss_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    temperature = 4.0
    p_t = torch.softmax(t / temperature, 1)
    log_p_s = torch.log_softmax(s / temperature, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * temperature ** 2
    assert torch.allclose(kd_loss(s, t, y, temperature), expected, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, temperature, alpha=0.0, beta=1.0), ce)
    assert kd_loss(t, t, y, temperature).abs() < 1e-6  # same distribution: zero


def test_milestones_scale_with_epochs():
    assert StudentConfig(epochs=200).milestones() == [120, 150, 180]
    assert StudentConfig(epochs=20).milestones() == [12, 15, 18]


def test_random_crop_flip_keeps_shape_and_content():
    images = torch.rand(8, 3, 16, 16)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert not torch.equal(out, images)
    assert math.isclose(float(out.min()), float(images.min()), abs_tol=0.2)
