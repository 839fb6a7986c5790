"""Stage options that change what a trainer computes reach it through the stage, not only the trainer.

The trainer-level tests show that DP-SGD augments with ``augmult``, that the student augments with
``augment`` and that DP-SGD keeps a moving average with ``ema_decay``. These check the wiring above them:
a stage that hands a fixed front end's cached features to the trainer while the option asks for augmented
views of the images, or that saves and scores the last iterate while its settings record ``ema_decay``,
would write a silently different model.
"""
from __future__ import annotations

import pytest
import torch

import privacy
import registry
import stages.student
import stages.teacher
import train_dp
import train_student
from sources.convert import InMemoryImages
from test_export import make_release
from training.dp_sgd import DPSGDTrainer

QUIET = ["--device", "cpu", "--no_progress"]
IMAGE_SHAPE = (3, 32, 32)  # mnist5k's view


class Built(Exception):
    """Raised by a spy once the trainer's inputs are recorded: the test needs no training."""


@pytest.fixture
def few_digits(monkeypatch, single_thread) -> str:
    """mnist5k cut to its first 12 training and 6 test images, held in memory as the whole set is (so that
    scatter_cnn's front end can be cached): the scattering of all 4,000 is slow on a CPU."""
    whole = registry.get_dataset

    def first(*args, **kwargs):
        num_classes, train_set, test_set = whole(*args, **kwargs)
        return num_classes, *(InMemoryImages(*(tensor[:count] for tensor in split.tensors))
                              for split, count in ((train_set, 12), (test_set, 6)))

    monkeypatch.setattr(registry, "get_dataset", first)
    return "mnist5k"


def teacher_flags(dataset: str, model: str, output) -> list[str]:
    return ["--dataset", dataset, "--model", model, "--epochs", "1", "--train_batch_size", "6", "--lr", "1",
            "--stats_batch_size", "6", "--noise_multiplier", "1.0", "--seed", "0", "--output", str(output), *QUIET]


@pytest.mark.parametrize("augmult", [0, 1, 3])
def test_the_teacher_stage_trains_scatter_cnn_on_images_when_augmult_asks_for_views(few_digits, tmp_path,
                                                                                    monkeypatch, augmult):
    """A cached front end is one fixed view per example: with augmult the trainer must get the images."""
    received = []

    def spy(model, data, config, *args, **kwargs):
        received.append((model, data, config))
        raise Built

    monkeypatch.setattr(stages.teacher, "DPSGDTrainer", spy)
    with pytest.raises(Built):
        train_dp.run(teacher_flags(few_digits, "scatter_cnn", tmp_path / "teacher") + ["--augmult", str(augmult)])
    [(model, data, config)] = received
    assert config.augmult == augmult
    first_input = data[0][0]
    if augmult:
        assert hasattr(model, "frontend"), "DP-SGD was handed the head alone, on cached features"
        assert first_input.shape == IMAGE_SHAPE
    else:  # without augmentation the stage does cache, so the check above can tell the two apart
        assert not hasattr(model, "frontend") and first_input.shape != IMAGE_SHAPE


@pytest.mark.parametrize("augment", [False, True])
def test_the_student_stage_trains_scatter_cnn_on_images_when_augment_is_on(tmp_path, monkeypatch, single_thread,
                                                                          augment):
    """The student crops and flips what it is handed: with --augment that must be the images, not features."""
    make_release(tmp_path / "release", gray=True, side=32, count=12)
    received = []

    def spy(model, images, *args, **kwargs):
        received.append((model, images))
        raise Built

    monkeypatch.setattr(stages.student, "StudentTrainer", spy)
    with pytest.raises(Built):
        train_student.run(["--release", str(tmp_path / "release"), "--model", "scatter_cnn", "--epochs", "1",
                           "--output", str(tmp_path / "student"), *QUIET] + (["--augment"] if augment else []))
    [(model, images)] = received
    if augment:
        assert hasattr(model, "frontend"), "the student was handed the head alone, on cached features"
        assert images.shape == (12, *IMAGE_SHAPE)
    else:
        assert not hasattr(model, "frontend") and images.shape[1:] != IMAGE_SHAPE


def unprefixed(state: dict) -> dict[str, torch.Tensor]:
    """A state dict keyed as the trained module's: the whole scatter_cnn's keys carry ``head.``."""
    return {key.removeprefix("head."): value.detach().clone() for key, value in state.items()}


@pytest.mark.parametrize("model", ["small_cnn", "scatter_cnn"])
def test_the_teacher_stage_saves_and_scores_the_moving_average(few_digits, tmp_path, monkeypatch, model):
    """With ema_decay the `.dppt` holds, and its accuracy measures, the average; not the last noisy iterate."""
    trainers, scored = [], []
    original = stages.teacher.evaluate

    class Recorded(DPSGDTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    def evaluate(module, *args, **kwargs) -> float:
        accuracy = original(module, *args, **kwargs)
        scored.append((unprefixed(module.state_dict()), accuracy))
        return accuracy

    monkeypatch.setattr(stages.teacher, "DPSGDTrainer", Recorded)
    monkeypatch.setattr(stages.teacher, "evaluate", evaluate)
    path = train_dp.run(teacher_flags(few_digits, model, tmp_path / "teacher") + ["--ema_decay", "0.9"])
    [trainer] = trainers
    average, last = unprefixed(trainer.ema.state_dict()), unprefixed(trainer.model.state_dict())
    assert any(not torch.equal(average[key], last[key]) for key in average)  # the two can be told apart
    payload = privacy.load_dppt(path)
    assert payload["settings"]["ema_decay"] == 0.9
    saved = unprefixed(payload["model"])
    assert saved.keys() == average.keys()
    for key, value in average.items():
        assert torch.equal(saved[key], value), f"saved {key} is not the moving average"
    weights, accuracy = scored[-1]
    assert payload["test_acc"] == accuracy
    for key, value in average.items():
        assert torch.equal(weights[key], value), f"scored {key} is not the moving average"
