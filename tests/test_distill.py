"""Knowledge distillation: the loss is the documented KL at temperature T, teacher first."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from training.augment import random_crop_flip
from training.distill import DistillationConfig, kd_loss


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


def crops_of(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the reflect-padded image, and its mirror."""
    padded = torch.nn.functional.pad(image[None], (padding,) * 4, mode="reflect")[0]
    side = image.shape[-1]
    crops = [padded[:, dy:dy + side, dx:dx + side] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    return crops + [crop.flip(2) for crop in crops]


def test_random_crop_flip_draws_crops_and_mirrors_of_each_image():
    images = torch.rand(8, 3, 16, 16)
    out = random_crop_flip(images, torch.arange(8), key=1, views=3, padding=2)
    assert out.shape == (24, 3, 16, 16)
    for row, view in enumerate(out):  # an image's views are consecutive
        assert any(torch.equal(view, crop) for crop in crops_of(images[row // 3], 2)), row
    assert len({view.sum().item() for view in out[:3]}) == 3  # three different views of image 0


def test_random_crop_flip_flips_only_when_asked():
    """Without padding the crop is the image: each output is the image, or its mirror when flips are on."""
    images = torch.rand(16, 1, 8, 8)
    records = torch.arange(16)
    assert torch.equal(random_crop_flip(images, records, key=0, padding=0, flip=False), images)
    flipped = random_crop_flip(images, records, key=0, padding=0)
    mirrored = [bool(torch.equal(out, image.flip(2))) for out, image in zip(flipped, images)]
    assert all(m or torch.equal(out, image) for m, out, image in zip(mirrored, flipped, images)) and any(mirrored)


def test_random_crop_flip_draws_per_record_and_key():
    """The views of a record depend on its index and the key, not on its row or the batch around it."""
    images = torch.rand(6, 3, 16, 16)
    records = torch.tensor([40, 3, 17, 8, 25, 1])
    views = random_crop_flip(images, records, key=9, views=2)
    order = torch.tensor([4, 0, 5])
    assert torch.equal(random_crop_flip(images[order], records[order], key=9, views=2),
                       views.view(6, 2, 3, 16, 16)[order].flatten(0, 1))
    assert not torch.equal(random_crop_flip(images, records, key=10, views=2), views)


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


def _tiny_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 3, 2, 2, generator=generator), 5 * torch.randn(16, 5, generator=generator),
            torch.randint(0, 5, (16,), generator=generator))


def test_a_release_without_soft_labels_trains_on_cross_entropy_over_its_labels():
    """Another method's release has hard labels only: one step moves the weights by -lr * grad CE(s, y).

    Guards against the hard-label recipe keeping a distillation term, or another recipe than the stage's.
    """
    from torch import nn

    from training.distill import StudentTrainer, hard_label_config

    images, _, targets = _tiny_problem()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    reference = copy.deepcopy(model)
    stage = DistillationConfig(epochs=1, batch_size=16, lr=0.5, momentum=0.0, weight_decay=0.0, temperature=4.0)
    config = hard_label_config(stage)
    assert (config.alpha, config.beta) == (0.0, 1.0) and type(config) is DistillationConfig
    assert config == DistillationConfig(**{**vars(stage), "alpha": 0.0, "beta": 1.0}), "the rest of the recipe stays"

    expected_loss = torch.nn.functional.cross_entropy(reference(images), targets)
    grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
    expected = [param.detach() - 0.5 * grad for param, grad in zip(reference.parameters(), grads)]
    stats = StudentTrainer(model, images, None, targets, config, torch.device("cpu"), seed=0).train_epoch(
        progress=False)
    assert stats["loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    for after, want in zip(model.parameters(), expected):
        torch.testing.assert_close(after.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_distillation_term_without_soft_labels_is_refused():
    from torch import nn

    from common.errors import DPImgSynError
    from training.distill import StudentTrainer

    images, _, targets = _tiny_problem()
    with pytest.raises(DPImgSynError, match="alpha must be 0"):
        StudentTrainer(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), images, None, targets,
                       DistillationConfig(epochs=1), torch.device("cpu"), seed=0)
    with pytest.raises(DPImgSynError, match="needs soft labels"):
        kd_loss(torch.randn(4, 5), None, targets[:4], 4.0)


def test_fit_trains_the_epochs_left_and_a_resumed_run_ends_where_a_whole_one_does():
    """``fit`` is the training loop the stage and the evaluation share: every epoch once, resumable."""
    from torch import nn

    from training.distill import StudentTrainer

    images, soft_labels, targets = _tiny_problem()
    config = DistillationConfig(epochs=3, batch_size=8, lr=0.1, temperature=4.0)

    def trainer() -> StudentTrainer:
        torch.manual_seed(1)
        return StudentTrainer(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), images, soft_labels, targets, config,
                              torch.device("cpu"), seed=3)

    whole, seen, after_two = trainer(), [], {}
    history = whole.fit(progress=False, after_epoch=lambda stats: (
        seen.append(stats), after_two.update(copy.deepcopy(whole.state_dict())) if stats["epoch"] == 2 else None))
    assert [stats["epoch"] for stats in history] == [1, 2, 3] and seen == history and whole.epoch == 3
    resumed = trainer()
    resumed.load_state_dict(after_two)
    assert [stats["epoch"] for stats in resumed.fit(progress=False)] == [3]
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert whole.fit(progress=False) == [], "a finished trainer trains no more"
