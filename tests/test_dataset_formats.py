"""Each paper dataset is read from a tiny fixture written in that dataset's real on-disk format.

Only the md5 comparisons torchvision makes against the real files are bypassed; the files are
parsed by the same code that parses the real datasets. Solid-colour images make the expected
normalized values exact (up to JPEG rounding).
"""
from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision.datasets as tv
import torchvision.datasets.cifar
from PIL import Image

import registry
from common.errors import DPImgSynError
from sources.convert import LUMA_WEIGHTS

COLOUR = (200, 120, 40)
JPEG_TOLERANCE = 0.05  # normalized units; about 2 grey levels / 255 / the smallest std
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186")
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
# (black, blond, brown, male, partition) per CelebA image; partition 0 train, 1 valid, 2 test.
CELEBA_ROWS = (
    (1, 0, 0, 1, 0), (0, 1, 0, 0, 0), (0, 0, 1, 1, 0), (0, 1, 1, 0, 0), (0, 0, 0, 1, 1), (0, 0, 1, 0, 2),
    (1, 0, 0, 1, 2),
)
CELEBA_TRAIN_HAIR = [0, 1, 2, 1]  # argmax; the tie (blond and brown) goes to the first, blond
CELEBA_TRAIN_MALE = [1, 0, 1, 0]


def solid_image(path: Path, size: tuple[int, int], colour=COLOUR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def digit_value(index: int) -> int:
    """Pixel value of IDX fixture image ``index`` (every pixel the same)."""
    return (index * 23 + 5) % 256


def write_idx(raw: Path, prefix: str, count: int) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    images = np.stack([np.full((28, 28), digit_value(i), np.uint8) for i in range(count)])
    labels = (np.arange(count) % 10).astype(np.uint8)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, count) + labels.tobytes())


def write_digits(folder: str) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        write_idx(root / folder / "raw", "train", 20)
        write_idx(root / folder / "raw", "t10k", 10)

    return write


def cifar_image(index: int) -> tuple[int, int, int]:
    return (index * 11) % 256, 100, 255 - index


def write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(first: int, count: int) -> dict:
        data = np.stack([np.repeat(np.array(cifar_image(first + i), np.uint8), 32 * 32) for i in range(count)])
        return {"batch_label": "fixture", "data": data, "labels": [(first + i) % 10 for i in range(count)],
                "filenames": [f"img_{first + i}.png" for i in range(count)]}

    for number in range(1, 6):
        (folder / f"data_batch_{number}").write_bytes(pickle.dumps(batch((number - 1) * 4, 4), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(100, 5), protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))


def write_celeba(root: Path) -> None:
    folder = root / "celeba"
    names = [f"{i + 1:06d}.jpg" for i in range(len(CELEBA_ROWS))]
    for name in names:
        solid_image(folder / "img_align_celeba" / name, (178, 218))
    column = {name: CELEBA_ATTRIBUTES.index(name) for name in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male")}
    attr_lines, split_lines, identity_lines, bbox_lines, landmark_lines = [], [], [], [], []
    for name, (black, blond, brown, male, partition) in zip(names, CELEBA_ROWS):
        values = [-1] * len(CELEBA_ATTRIBUTES)
        for attribute, flag in zip(("Black_Hair", "Blond_Hair", "Brown_Hair", "Male"), (black, blond, brown, male)):
            values[column[attribute]] = 1 if flag else -1
        attr_lines.append(name + "".join(f" {value:2d}" for value in values))
        split_lines.append(f"{name} {partition}")
        identity_lines.append(f"{name} {100 + len(identity_lines)}")
        bbox_lines.append(f"{name}    95  71 226 313")
        landmark_lines.append(f"{name} 69  109  106  113   77  142   73  152  108  154")
    count = str(len(names))
    (folder / "list_attr_celeba.txt").write_text("\n".join([count, " ".join(CELEBA_ATTRIBUTES) + " "] + attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(split_lines) + "\n")
    (folder / "identity_CelebA.txt").write_text("\n".join(identity_lines) + "\n")
    (folder / "list_bbox_celeba.txt").write_text("\n".join([count, "image_id x_1 y_1 width height"] + bbox_lines) + "\n")
    landmark_header = ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                       "rightmouth_x rightmouth_y")
    (folder / "list_landmarks_align_celeba.txt").write_text("\n".join([count, landmark_header] + landmark_lines) + "\n")


def write_imagenette(root: Path) -> None:
    folder = root / "imagenette2-160"
    for wnid in IMAGENETTE_WNIDS:
        for number in range(2):
            solid_image(folder / "train" / wnid / f"{wnid}_{number}.JPEG", (213, 160))
    for wnid in (IMAGENETTE_WNIDS[0], IMAGENETTE_WNIDS[2]):  # a class missing from val
        solid_image(folder / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", (160, 240))


def write_tinyimagenet(root: Path) -> None:
    folder = root / "tiny-imagenet-200"
    wnids = ("n01443537", "n01629819")
    for wnid in wnids:
        for number in range(3):
            solid_image(folder / "train" / wnid / "images" / f"{wnid}_{number}.JPEG", (64, 64))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    solid_image(folder / "val" / "images" / "val_0.JPEG", (64, 64))
    (folder / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[0]}\t0\t0\t63\t63\n")
    solid_image(folder / "test" / "images" / "test_0.JPEG", (64, 64))
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")


def write_places365(root: Path) -> None:
    folder = root / "places365"
    folder.mkdir(parents=True)
    (folder / "categories_places365.txt").write_text("/a/airfield 0\n/b/bar 1\n")
    listed = ("/a/airfield/00000001.jpg 0", "/a/airfield/00000002.jpg 0", "/b/bar/00000001.jpg 1")
    (folder / "places365_train_standard.txt").write_text("\n".join(listed) + "\n")
    for line in listed:
        solid_image(folder / "data_256_standard" / line.split()[0].lstrip("/"), (256, 256))
    solid_image(folder / "data_256_standard" / "b" / "bar" / "unlisted.jpg", (256, 256))


def write_lsun(root: Path) -> None:
    folder = root / "lsun"
    solid_image(folder / "bedroom" / "0" / "1" / "a1b2.webp", (341, 256))
    solid_image(folder / "bedroom" / "0" / "2" / "c3d4.webp", (256, 300))
    solid_image(folder / "church_outdoor" / "e5f6.jpg", (256, 256))
    (folder / "README.txt").write_text("not an image\n")


def write_textures(root: Path) -> None:
    folder = root / "dtd" / "dtd"
    files = ("banded/banded_0001.jpg", "banded/banded_0002.jpg", "zigzagged/zigzagged_0001.jpg")
    for name in files:
        solid_image(folder / "images" / name, (300, 400))
    (folder / "labels").mkdir(parents=True)
    for split, name in zip(("train", "val", "test"), files):
        (folder / "labels" / f"{split}1.txt").write_text(name + "\n")


@dataclass(frozen=True)
class Fixture:
    write: Callable[[Path], None] | None  # None: embedded in an installed package
    train: int
    test: int | None


# The shipped sets, each in its real format; any registry row is also checked by test_registry's properties.
FIXTURES = {
    "mnist": Fixture(write_digits("MNIST"), 20, 10),
    "fmnist": Fixture(write_digits("FashionMNIST"), 20, 10),
    "cifar10": Fixture(write_cifar10, 20, 5),
    "celeba_hair": Fixture(write_celeba, 4, 2),
    "celeba_gender": Fixture(write_celeba, 4, 2),
    "imagenette": Fixture(write_imagenette, 6, 2),
    "tinyimagenet": Fixture(write_tinyimagenet, 6, None),
    "places365": Fixture(write_places365, 3, None),
    "lsun": Fixture(write_lsun, 3, None),
    "textures": Fixture(write_textures, 3, None),
    "mnist5k": Fixture(None, 4000, 1000),
    "photos": Fixture(None, 100_000, None),
}
SOLID_COLOUR_SETS = ("celeba_hair", "celeba_gender", "imagenette", "tinyimagenet", "places365", "lsun", "textures")

# (public, private) pairs of the paper's experiments.
PAPER_PAIRS = (
    ("tinyimagenet", "mnist"), ("places365", "mnist"), ("fmnist", "mnist"),
    ("tinyimagenet", "fmnist"), ("places365", "fmnist"), ("mnist", "fmnist"),
    ("lsun", "celeba_hair"), ("places365", "celeba_hair"), ("lsun", "celeba_gender"), ("places365", "celeba_gender"),
    ("tinyimagenet", "cifar10"), ("tinyimagenet", "imagenette"), ("places365", "imagenette"),
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for writer in {fixture.write for fixture in FIXTURES.values() if fixture.write is not None}:
        writer(root)
    return root


@pytest.fixture(autouse=True)
def skip_md5_of_real_files(monkeypatch) -> None:
    """torchvision compares these files' md5 with the real datasets'; fixtures cannot match them."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(tv.CelebA, "_check_integrity",
                        lambda self: os.path.isdir(os.path.join(self.root, self.base_folder, "img_align_celeba")))
    monkeypatch.setattr(tv.Places365, "_check_integrity", lambda self, path, md5, download: os.path.isfile(path))


def expected_values(rgb: tuple[int, ...], spec) -> torch.Tensor:
    """Per-channel normalized value of a solid colour (one value: gray source) seen through ``spec``."""
    if spec.grayscale:
        luma = rgb[0] if len(rgb) == 1 else sum(weight * value for weight, value in zip(LUMA_WEIGHTS, rgb))
        gray = luma / 255
        return torch.tensor([(gray - mean) / std for mean, std in zip(spec.mean, spec.std)])
    rgb = rgb * 3 if len(rgb) == 1 else rgb
    return torch.tensor([(value / 255 - mean) / std for value, mean, std in zip(rgb, spec.mean, spec.std)])


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_dataset_loads_with_its_shape(name, data_root):
    spec = registry.dataset_info(name)
    num_classes, train, test = registry.get_dataset(name, data_root)
    assert num_classes == spec.num_classes
    assert len(train) == FIXTURES[name].train
    assert (None if test is None else len(test)) == FIXTURES[name].test
    for dataset in (train,) if test is None else (train, test):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (spec.channels, spec.image_size, spec.image_size)
        assert image.dtype == torch.float32
        assert isinstance(label, int)
        if num_classes:
            assert 0 <= label < num_classes


@pytest.mark.parametrize("name", SOLID_COLOUR_SETS)
def test_file_images_are_normalized_with_the_datasets_constants(name, data_root):
    spec = registry.dataset_info(name)
    train = registry.get_split(name, "train", data_root)
    for index in range(len(train)):
        image, _ = train[index]
        assert torch.allclose(image.mean(dim=(1, 2)), expected_values(COLOUR, spec), atol=JPEG_TOLERANCE)
        assert image.std(dim=(1, 2)).max() < JPEG_TOLERANCE


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_idx_digits_are_preprocessed_in_memory(name, data_root):
    spec = registry.dataset_info(name)
    train = registry.get_split(name, "train", data_root)
    images, labels = train.tensors
    assert images.shape == (20, 3, 32, 32)
    assert labels.tolist() == [i % 10 for i in range(20)]
    for index in (0, 7, 19):
        expected = (digit_value(index) / 255 - spec.mean[0]) / spec.std[0]
        assert torch.allclose(images[index], torch.full((3, 32, 32), expected), atol=1e-5)
    test = registry.get_split(name, "test", data_root)
    assert test.tensors[1].tolist() == [i % 10 for i in range(10)]


def test_cifar10_reads_all_pickle_batches_in_order(data_root):
    spec = registry.dataset_info("cifar10")
    train = registry.get_split("cifar10", "train", data_root)
    images, labels = train.tensors
    assert labels.tolist() == [i % 10 for i in range(20)]
    for index in (0, 5, 19):
        assert torch.allclose(images[index].mean(dim=(1, 2)), expected_values(cifar_image(index), spec), atol=1e-5)
    test = registry.get_split("cifar10", "test", data_root)
    assert torch.allclose(test[0][0].mean(dim=(1, 2)), expected_values(cifar_image(100), spec), atol=1e-5)


def test_celeba_labels_come_from_the_attribute_file(data_root):
    hair = registry.get_split("celeba_hair", "train", data_root)
    gender = registry.get_split("celeba_gender", "train", data_root)
    assert [hair[i][1] for i in range(len(hair))] == CELEBA_TRAIN_HAIR
    assert [gender[i][1] for i in range(len(gender))] == CELEBA_TRAIN_MALE
    hair_test = registry.get_split("celeba_hair", "test", data_root)
    gender_test = registry.get_split("celeba_gender", "test", data_root)
    assert [hair_test[i][1] for i in range(len(hair_test))] == [2, 0]
    assert [gender_test[i][1] for i in range(len(gender_test))] == [0, 1]


def test_imagenette_labels_follow_the_training_classes(data_root):
    train = registry.get_split("imagenette", "train", data_root)
    val = registry.get_split("imagenette", "test", data_root)
    assert [train[i][1] for i in range(len(train))] == [0, 0, 1, 1, 2, 2]
    assert [val[i][1] for i in range(len(val))] == [0, 2]


def test_public_sets_have_no_test_split(data_root):
    with pytest.raises(DPImgSynError, match="no 'test' split"):
        registry.get_split("tinyimagenet", "test", data_root)


def _private_loader_must_not_run(root, split, download):
    raise AssertionError("aligned() opened the private dataset")


@pytest.mark.parametrize("public, private", PAPER_PAIRS)
def test_aligned_pairs_take_the_private_shape_and_normalization(public, private, data_root, monkeypatch):
    private_spec = registry.dataset_info(private)
    monkeypatch.setitem(registry.DATASETS, private, replace(private_spec, loader=_private_loader_must_not_run))
    registry.OPENED_SPLITS.clear()
    dataset = registry.aligned(public, private, data_root)
    assert registry.OPENED_SPLITS == [(public, "train")]
    assert len(dataset) == FIXTURES[public].train
    image, label = dataset[len(dataset) - 1]
    assert label == registry.PUBLIC_LABEL
    assert image.shape == (private_spec.channels, private_spec.image_size, private_spec.image_size)
    if public in ("mnist", "fmnist"):  # gray IDX source: every pixel digit_value(i)
        rgb = (digit_value(len(dataset) - 1),)
        tolerance = 1e-5
    else:
        rgb, tolerance = COLOUR, JPEG_TOLERANCE
    assert torch.allclose(image.mean(dim=(1, 2)), expected_values(rgb, private_spec), atol=tolerance)
    if private_spec.grayscale:
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def write_folder_set(root: Path) -> Path:
    for split, classes in (("train", ("cat", "dog", "emu")), ("test", ("cat", "emu"))):
        for name in classes:
            for number in range(2):
                solid_image(root / split / name / f"{number}.png", (40, 30))
    return root


def test_folder_dataset_layout_options_and_labels(tmp_path):
    path = write_folder_set(tmp_path / "mine")
    name = f"folder:{path}"
    spec = registry.dataset_info(name, image_size=16, channels=1)
    assert (spec.num_classes, spec.image_size, spec.channels, spec.grayscale) == (3, 16, 1, True)
    assert spec.mean == (0.5,) and spec.std == (0.5,)
    num_classes, train, test = registry.get_dataset(name, image_size=16, channels=1)
    assert num_classes == 3
    assert [train[i][1] for i in range(len(train))] == [0, 0, 1, 1, 2, 2]
    assert [test[i][1] for i in range(len(test))] == [0, 0, 2, 2]  # "emu" keeps label 2 without "dog"
    image = train[0][0]
    assert image.shape == (1, 16, 16)
    assert torch.allclose(image.mean(dim=(1, 2)), expected_values(COLOUR, spec), atol=1e-2)
    colour = registry.get_split(name, "train")[0][0]  # unset options: inferred from the colour 40 x 30 files
    assert colour.shape == (3, 30, 30)
    assert torch.allclose(colour.mean(dim=(1, 2)), expected_values(COLOUR, registry.dataset_info(name)), atol=1e-2)


def test_folder_dataset_rejects_unknown_test_classes_and_missing_folders(tmp_path):
    path = write_folder_set(tmp_path / "mine")
    solid_image(path / "test" / "yak" / "0.png", (8, 8))
    with pytest.raises(DPImgSynError, match="yak"):
        registry.get_split(f"folder:{path}", "test")
    with pytest.raises(DPImgSynError, match=str(tmp_path / "absent" / "train")):
        registry.get_split(f"folder:{tmp_path / 'absent'}", "train")
