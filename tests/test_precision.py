"""bf16 autocast for synthesis and the student: opt-in off CUDA, never on a privacy mechanism."""
from __future__ import annotations

import pytest
import torch

import registry
from common.precision import use_bf16
from synthesizer.deepinversion import AlignmentConfig, cyclic_targets, optimize_batch
from synthesizer.stat_norm import matching_loss
from tests.test_synthesis import _setup
from training.distill import DistillationConfig, StudentTrainer

CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_and_explicit_choices_win():
    assert not use_bf16("auto", CPU)
    assert use_bf16("bf16", CPU) and not use_bf16("fp32", CPU)
    with pytest.raises(ValueError):
        use_bf16("fp16", CPU)


def test_bf16_synthesis_lowers_the_statistics_loss_and_releases_float32(tiny_pipeline):
    teacher, images, low, high = _setup(tiny_pipeline)
    with torch.no_grad():
        teacher(images)
        before = float(matching_loss(teacher))
    runs = {bf16: optimize_batch(teacher, images, cyclic_targets(0, 60, 10), 15, AlignmentConfig(), low, high,
                                 torch.Generator().manual_seed(0), grayscale=True, bf16=bf16)
            for bf16 in (False, True)}
    with torch.no_grad():
        teacher(runs[True].images)
        after = float(matching_loss(teacher))
    assert after < 0.8 * before
    assert runs[True].images.dtype == runs[True].logits.dtype == torch.float32
    assert not torch.equal(runs[True].images, runs[False].images)  # the flag really changes the arithmetic
    assert (runs[True].images - runs[False].images).abs().mean() < 0.02  # ... not the method
    assert runs[True].losses["total"] == pytest.approx(runs[False].losses["total"], rel=0.05)


def test_bf16_student_trains_like_fp32(single_thread):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 10
    images = torch.randn(10, 3, 32, 32, generator=generator)[labels] + torch.randn(256, 3, 32, 32, generator=generator)
    soft_labels = 5 * torch.eye(10)[labels]  # a learnable task: class patterns under noise
    config = DistillationConfig(epochs=4, batch_size=32, lr=0.05, temperature=4.0)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        trainer = StudentTrainer(registry.get_model("small_cnn", 10), images, soft_labels,
                                 soft_labels.argmax(1), config, CPU, seed=0, bf16=bf16)
        losses[bf16] = [trainer.train_epoch(progress=False)["loss"] for _ in range(config.epochs)]
    assert losses[True] != losses[False]
    assert losses[True][-1] < 0.85 * losses[True][0]
    assert losses[True][-1] == pytest.approx(losses[False][-1], rel=0.15)
