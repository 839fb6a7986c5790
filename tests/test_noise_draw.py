"""DP-SGD's noise: one draw of N(0, (sigma C)^2) per coordinate for all parameters, once per logical step.

The model has zero gradients everywhere (bias-free layers fed zero images), so one full-batch step at
lr 1 moves every weight by exactly -noise / B. Each parameter tensor must get its own slice of the
one draw, with the documented scale, from the run's source: the seeded generator (the same noise for
the same seed) or, in secure mode, the operating system.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import privacy.noise
from privacy.noise import OS_RANDOM
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA, CLIP, BATCH = 1.0, 2.0, 10
# Four weight tensors of 960 to 3072 coordinates; 1240 is no multiple of 16, the block of torch's CPU sampler.
SHAPES = [(64, 48), (31, 64), (40, 31), (24, 40)]


def zero_gradient_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), *(nn.Linear(inputs, outputs, bias=False) for outputs, inputs in SHAPES))


def noise_of_one_step(mode: str = "fused", seed: int | None = 0, secure: bool = False) -> list[torch.Tensor]:
    """Per parameter tensor, the noise one step added (weights moved times -B)."""
    model = zero_gradient_model()
    before = [param.detach().clone() for param in model.parameters()]
    config = DPSGDConfig(epochs=1, train_batch_size=BATCH, lr=1.0, max_norm=CLIP, noise_multiplier=SIGMA,
                         momentum=0.0, weight_decay=0.0, grad_sample_mode=mode, secure_mode=secure,
                         max_physical_batch_size=3)  # four chunks, one noisy step
    data = TensorDataset(torch.zeros(BATCH, 3, 4, 4), torch.zeros(BATCH, dtype=torch.long))
    DPSGDTrainer(model, data, config, torch.device("cpu"), seed=seed).train_epoch(progress=False)
    return [(start - param.detach()) * BATCH for param, start in zip(model.parameters(), before)]


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_every_parameter_tensor_gets_its_own_noise_of_std_sigma_c(mode, secure):
    noises = noise_of_one_step(mode, seed=None if secure else 0, secure=secure)
    assert [tuple(noise.shape) for noise in noises] == SHAPES
    for noise in noises:
        assert float(noise.std()) == pytest.approx(SIGMA * CLIP, rel=0.1)
        assert abs(float(noise.mean())) < 4 * SIGMA * CLIP / noise.numel() ** 0.5
    # Independent slices: no tensor repeats the start of another's noise.
    for first, second in zip(noises, noises[1:]):
        size = min(first.numel(), second.numel())
        correlation = torch.corrcoef(torch.stack([first.flatten()[:size], second.flatten()[:size]]))[0, 1]
        assert abs(float(correlation)) < 0.15


def test_the_noise_is_one_seeded_draw_in_parameter_order():
    """Seed s draws the noise from a generator seeded s + 1: one draw for all parameters, split in order. (Before,
    each tensor had its own draw, so a seed gives other noise than it did then; the distribution is the same.)"""
    drawn = torch.normal(0.0, SIGMA * CLIP, size=(sum(rows * cols for rows, cols in SHAPES),),
                         generator=torch.Generator().manual_seed(8))
    noises = noise_of_one_step(seed=7)
    torch.testing.assert_close(torch.cat([noise.flatten() for noise in noises]), drawn, rtol=1e-5, atol=1e-5)
    again = noise_of_one_step(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(noises, again))


@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_secure_noise_is_one_draw_of_the_os_bytes_in_parameter_order(mode, monkeypatch):
    """Each request reads the same fixed bytes, so the step's noise is the one draw of all its coordinates."""
    monkeypatch.setattr(privacy.noise, "os_random_bytes", lambda count: random.Random(5).randbytes(count))
    noises = noise_of_one_step(mode, seed=None, secure=True)
    drawn = OS_RANDOM.gaussian((sum(rows * cols for rows, cols in SHAPES),), SIGMA * CLIP, dtype=torch.float32)
    torch.testing.assert_close(torch.cat([noise.flatten() for noise in noises]), drawn, rtol=1e-5, atol=1e-5)
