"""The front-end cache beyond in-memory sets: folder sets (in memory or in an unlinked owner-only file), the
head's fixed layers and identity pools, the line that says which path a stage takes, and a release's
features kept for every student trained on it."""
from __future__ import annotations

import copy
import os
import stat

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import registry
import stages.student
import stages.teacher
import train_dp
import train_student
import training.frontend as frontend
from common.batches import random_transform
from common.errors import DPImgSynError
from common.files import CACHE_ENV, cache_root
from per_example import per_example_gradients
from test_export import make_release
from test_folder_sets import write_tree
from test_stage_options import QUIET, Built, teacher_flags
from training.dp_sgd import DPSGDConfig, DPSGDTrainer
from training.frontend import CHECKED_EXAMPLES, cache_front_end, cache_refusal, training_inputs, whole_model

pytestmark = pytest.mark.usefixtures("single_thread", "own_cache")

NUM_CLASSES = 3


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of this test alone: what it finds there, this test put there."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def folder_set(tmp_path):
    """A ``folder:`` training split: 12 colour PNGs read one by one, as the stages read a user's files."""
    root = write_tree(tmp_path / "tree", (32, 32), gray=False, per_class=4, test_per_class=1)
    _, train_set, _ = registry.get_dataset(f"folder:{root}", image_size=32, channels=3)
    assert getattr(train_set, "tensors", None) is None  # per item: what the cache used to refuse
    return train_set


def scatter(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return registry.get_model("scatter_cnn", NUM_CLASSES)


def images_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[index] for index in range(len(dataset))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def cache_files() -> list[str]:
    folder = cache_root() / frontend.CACHE_FOLDER
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_a_folder_set_is_cached_and_each_example_keeps_its_own_gradient(folder_set, capsys):
    model = scatter()
    trained, features = training_inputs(model, folder_set)
    assert trained is not model and len(features) == len(folder_set) == 12  # the same N records
    said = capsys.readouterr().out
    assert "trains its head on cached features (frontend, head.norm) of 12 examples, in memory" in said
    images, labels = images_of(folder_set)
    assert torch.equal(features.tensors[1], labels)
    on_images = per_example_gradients(model, images[:4], labels[:4])
    on_features = per_example_gradients(trained, features.tensors[0][:4], labels[:4])
    for whole, cached in zip(on_images, on_features):
        assert len(whole) == len(cached) == 8
        for grad_whole, grad_cached in zip(whole, cached):
            torch.testing.assert_close(grad_cached, grad_whole, rtol=1e-4, atol=1e-6)


def test_dp_sgd_on_a_cached_folder_set_trains_the_weights_it_trains_on_the_files(folder_set):
    """Same seeds: the same Poisson batches over the same 12 records, clipped sums and noise (float32)."""
    config = DPSGDConfig(epochs=2, train_batch_size=4, lr=0.5, max_norm=0.1, noise_multiplier=1.0)
    whole = scatter(seed=1)
    cached = copy.deepcopy(whole)
    trainer = DPSGDTrainer(whole, folder_set, config, torch.device("cpu"), seed=5)
    trained, features = training_inputs(cached, folder_set)
    assert trained is not cached
    head_trainer = DPSGDTrainer(trained, features, config, torch.device("cpu"), seed=5)
    assert head_trainer.sample_rate == trainer.sample_rate
    for _ in range(config.epochs):
        trainer.train_epoch(progress=False)
        head_trainer.train_epoch(progress=False)
    state, expected = whole_model(cached, trained).state_dict(), whole.state_dict()
    assert list(state) == list(expected)
    assert not torch.equal(expected["head.fc2.weight"], scatter(seed=1).state_dict()["head.fc2.weight"])
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_features_beyond_the_memory_bound_go_to_an_unlinked_owner_only_file(folder_set, monkeypatch, capsys):
    modes = []
    original = frontend.open_private

    def spy(path, flags):
        descriptor = original(path, flags)
        modes.append((stat.S_IMODE(os.fstat(descriptor).st_mode), stat.S_IMODE(os.stat(path.parent).st_mode)))
        return descriptor

    monkeypatch.setattr(frontend, "open_private", spy)
    in_memory = training_inputs(scatter(), folder_set)[1].tensors[0]
    assert modes == []
    trained, features = training_inputs(scatter(), folder_set, max_bytes=1000)
    assert modes == [(0o600, 0o700)]
    assert "in an owner-only file of the cache folder, removed with the run" in capsys.readouterr().out
    assert cache_files() == []  # unlinked as soon as opened: nothing outlives the run, nothing is shared
    assert torch.equal(features.tensors[0], in_memory)
    assert features.tensors[0].untyped_storage().data_ptr() != in_memory.untyped_storage().data_ptr()


def test_a_random_transform_or_a_full_disk_is_refused_and_said(folder_set, monkeypatch, capsys):
    assert random_transform(folder_set) is None

    class Transformed(Dataset):
        def __init__(self, transform) -> None:
            self.transform = transform

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return folder_set[index]

    crop = type("RandomCrop", (), {})()  # torchvision's name: a crop drawn per read
    composed = type("Compose", (), {"transforms": [object(), crop]})()
    assert random_transform(Subset(Transformed(composed), [0, 1])) == "RandomCrop"
    assert random_transform(Transformed(type("ColorJitter", (), {})())) == "ColorJitter"
    assert random_transform(Transformed(type("Normalize", (), {})())) is None
    model = scatter()
    assert "random transform (RandomCrop)" in cache_refusal(model, Transformed(composed))
    trained, data = training_inputs(model, Transformed(composed))
    assert trained is model and isinstance(data, Transformed)
    assert "ScatterCNN trains whole, on the images: its front end is not cached (the dataset applies a random " \
           "transform (RandomCrop)" in capsys.readouterr().out
    monkeypatch.setattr(frontend, "cache_free_bytes", lambda: 0)
    assert "GiB: more than" in cache_refusal(model, folder_set, max_bytes=1000)
    assert cache_refusal(model, folder_set) is None  # within the memory bound, the disk does not matter


def test_the_heads_fixed_norm_is_cached_and_an_identity_pool_skipped():
    model = scatter().double()
    keys = list(model.state_dict())
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    trained, features = cache_front_end(model, TensorDataset(images, torch.zeros(5, dtype=torch.long)))
    assert "norm" not in trained._modules and isinstance(trained.pool, nn.Identity)
    assert isinstance(model.head.norm, nn.GroupNorm) and isinstance(model.head.pool, nn.AdaptiveAvgPool2d)
    assert list(model.state_dict()) == keys and trained.conv1 is model.head.conv1
    with torch.no_grad():
        assert torch.equal(features.tensors[0], model.head.norm(model.frontend(images)))
        assert torch.equal(trained(features.tensors[0]), model(images))
        maps = torch.randn(5, 32, 4, 4, dtype=torch.float64)
        assert torch.equal(model.head.pool(maps), maps)  # what makes skipping it exact
    average = copy.deepcopy(trained)  # a moving average of the trained part: saved and scored whole
    nn.init.zeros_(average.fc2.bias)
    saved = whole_model(model, average)
    assert list(saved.state_dict()) == keys and torch.equal(saved.state_dict()["head.fc2.bias"], average.fc2.bias)
    assert isinstance(saved.head.pool, nn.AdaptiveAvgPool2d) and saved.head.norm is model.head.norm
    assert whole_model(model, trained) is model
    larger = torch.randn(2, 3, 48, 48, dtype=torch.float64)  # 6 x 6 maps: the pool averages, so it stays
    trained, features = cache_front_end(model, TensorDataset(larger, torch.zeros(2, dtype=torch.long)))
    assert isinstance(trained.pool, nn.AdaptiveAvgPool2d)
    with torch.no_grad():
        assert torch.equal(trained(features.tensors[0]), model(larger))


def test_a_batch_norm_is_never_cached_as_a_fixed_layer():
    model = nn.Module()
    model.frontend = nn.AvgPool2d(8)
    model.head = nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.Flatten(), nn.Linear(3 * 16, 2))
    model.forward = lambda x: model.head(model.frontend(x))
    trained, features = cache_front_end(model, TensorDataset(torch.randn(4, 3, 32, 32),
                                                                          torch.zeros(4, dtype=torch.long)))
    assert trained is model.head and features.tensors[0].shape == (4, 3, 4, 4)


class Counting(nn.Module):
    """A front end, counting the images it transforms."""

    seen = 0

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counting.seen += len(x)
        return self.inner(x)


def counted_model(seed: int, front_end: nn.Module) -> nn.Module:
    """A scatter_cnn of its own weights; one front end for all (its filters take a while to build)."""
    model = scatter(seed)
    model.frontend = Counting(front_end)
    Counting.seen = 0
    return model


def test_a_releases_features_are_computed_once_for_every_student(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 3, 32, 32, generator=generator), torch.arange(24) % NUM_CLASSES
    assert not [name for name in cache_files() if name.startswith("release-")]
    front_end = scatter().frontend
    training_inputs(counted_model(0, front_end), TensorDataset(images, labels))  # private images: nothing is kept
    assert not [name for name in cache_files() if name.startswith("release-")]

    first_model = counted_model(1, front_end)
    first, features = training_inputs(first_model, TensorDataset(images, labels), public=True)
    assert Counting.seen >= len(images)
    [kept] = [cache_root() / frontend.CACHE_FOLDER / name for name in cache_files() if name.startswith("release-")]
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700

    second_model = counted_model(2, front_end)  # another seed's student, as another process would load it
    second, again = training_inputs(second_model, TensorDataset(images.clone(), labels), public=True)
    assert Counting.seen <= 1 + 2 * CHECKED_EXAMPLES  # spot checks of a few images, not the release
    assert torch.equal(again.tensors[0], features.tensors[0]) and torch.equal(again.tensors[1], labels)
    assert second.conv1 is second_model.head.conv1

    changed = images.clone()
    changed[5, 0, 0, 0] += 0.5
    third, other = training_inputs(counted_model(3, front_end), TensorDataset(changed, labels), public=True)
    assert Counting.seen >= len(images)  # another release: another key
    assert not torch.equal(other.tensors[0][5], features.tensors[0][5])
    assert len([name for name in cache_files() if name.startswith("release-")]) == 2


def test_the_student_stage_reads_its_releases_features_from_the_cache(tmp_path, monkeypatch, capsys):
    make_release(tmp_path / "release", gray=True, side=32, count=12, seed=4)
    received = []

    def spy(model, images, *args, **kwargs):
        received.append(images.clone())
        raise Built

    monkeypatch.setattr(stages.student, "StudentTrainer", spy)
    monkeypatch.setattr(stages.student, "scored_set", lambda *args: None)  # no student is scored here
    built = registry.get_model

    def counted(*args, **kwargs) -> nn.Module:
        model = built(*args, **kwargs)
        model.frontend = Counting(model.frontend)
        return model

    monkeypatch.setattr(registry, "get_model", counted)
    counts = []
    for seed in (111, 2023):
        Counting.seen = 0
        with pytest.raises(Built):
            train_student.run(["--release", str(tmp_path / "release"), "--model", "scatter_cnn", "--epochs", "1",
                               "--seed", str(seed), "--output", str(tmp_path / f"student{seed}"), *QUIET])
        counts.append(Counting.seen)
    assert counts[0] >= 12 and counts[1] <= 1 + 2 * CHECKED_EXAMPLES
    assert torch.equal(received[0], received[1])
    assert "read from the cache folder, where an earlier run kept them" in capsys.readouterr().out


def test_the_teacher_stage_trains_scatter_cnn_on_a_folder_sets_cached_features(tmp_path, monkeypatch, capsys):
    root = write_tree(tmp_path / "tree", (32, 32), gray=False, per_class=4, test_per_class=1)
    received = []

    def spy(model, data, *args, **kwargs):
        received.append((model, data))
        raise Built

    monkeypatch.setattr(stages.teacher, "DPSGDTrainer", spy)
    with pytest.raises(Built):
        train_dp.run(teacher_flags(f"folder:{root}", "scatter_cnn", tmp_path / "teacher"))
    [(model, data)] = received
    assert not hasattr(model, "frontend") and data.tensors[0].shape == (12, 243, 8, 8)
    assert "of 12 examples, in memory" in capsys.readouterr().out


def test_a_cache_folder_that_cannot_be_written_is_a_user_error_or_only_skips_keeping(folder_set, tmp_path,
                                                                                       monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a_file" / "cache"))
    with pytest.raises(DPImgSynError, match=r"cannot write the front end's features to the cache folder .*; point "
                                            r"\$DPIMGSYN_CACHE to a writable local folder"):
        training_inputs(scatter(), folder_set, max_bytes=1000)
    images, labels = images_of(folder_set)
    trained, features = training_inputs(scatter(), TensorDataset(images, labels), public=True)  # a release
    assert len(features) == 12 and "kept" not in capsys.readouterr().out
