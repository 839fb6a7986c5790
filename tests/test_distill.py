"""Knowledge distillation: the loss is the documented KL at temperature T, teacher first."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from training.distill import DistillationConfig, kd_loss, random_crop_flip


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
    assert DistillationConfig(epochs=200).milestones() == [120, 150, 180]
    assert DistillationConfig(epochs=20).milestones() == [12, 15, 18]


def test_random_crop_flip_keeps_shape_and_content():
    images = torch.rand(8, 3, 16, 16)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert not torch.equal(out, images)
    assert math.isclose(float(out.min()), float(images.min()), abs_tol=0.2)


def _kd_by_hand(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (standard distillation), written out."""
    p_t = torch.softmax(teacher_logits / temperature, 1)
    log_p_s = torch.log_softmax(student_logits / temperature, 1)
    return (p_t * (torch.log_softmax(teacher_logits / temperature, 1) - log_p_s)).sum(1).mean() * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 4.0, 100.0])
def test_student_step_follows_the_kd_gradient_at_the_configured_temperature(temperature):
    """One StudentTrainer step (one batch, plain SGD) moves the weights by -lr * grad of the KD loss at T.

    Guards against a trainer that ignores ``DistillationConfig.temperature`` (e.g. always T = 1): the loss it reports
    and the step it takes would then follow another formula. The three temperatures give clearly different steps.
    """
    from torch import nn

    from training.distill import StudentTrainer

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 2, 2, generator=generator)
    soft_labels = 5 * torch.randn(16, 5, generator=generator)
    targets = torch.randint(0, 5, (16,), generator=generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    reference = copy.deepcopy(model)
    lr = 0.5

    expected_loss = _kd_by_hand(reference(images), soft_labels, temperature)
    grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
    expected = [param.detach() - lr * grad for param, grad in zip(reference.parameters(), grads)]

    config = DistillationConfig(epochs=1, batch_size=16, lr=lr, momentum=0.0, weight_decay=0.0, temperature=temperature)
    stats = StudentTrainer(model, images, soft_labels, targets, config, torch.device("cpu"), seed=0).train_epoch(
        progress=False)
    assert stats["loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    moved = [param.detach() for param in model.parameters()]
    for after, want, before in zip(moved, expected, [param.detach() for param in reference.parameters()]):
        assert float((want - before).abs().max()) > 1e-3  # the step is not negligible
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-6)


def test_student_cli_and_pipeline_hand_T_to_the_trainer(tiny_pipeline, tiny_config, tmp_path, monkeypatch):
    """``train_student.py --T`` and the pipeline's ``student.T`` reach ``DistillationConfig.temperature``.

    Guards against the temperature being dropped between the command line (or config) and the trainer, where
    the paper's T = 100 would silently become another value. The CLI run stops once the trainer is built.
    """
    import json

    import stages.student
    import train_student

    out, _ = tiny_pipeline
    recorded = json.loads((out / "student_k3_seed1" / "metrics.json").read_text())
    assert recorded["settings"]["temperature"] == tiny_config["student"]["T"]

    class Built(Exception):
        pass

    configs = []

    def stop_when_built(model, images, soft_labels, targets, config, *args, **kwargs):
        configs.append(config)
        raise Built

    monkeypatch.setattr(stages.student, "StudentTrainer", stop_when_built)
    with pytest.raises(Built):
        train_student.run(["--release", str(out / "release_k3"), "--model", "small_cnn", "--epochs", "1",
                           "--T", "7.5", "--output", str(tmp_path / "student"), "--no_progress", "--device", "cpu"])
    assert len(configs) == 1 and configs[0].temperature == 7.5
