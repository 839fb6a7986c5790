"""evaluate_release.py on another method's .npz release: both layouts, the card's honesty, one-line refusals."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate_release
import registry
from common.errors import DPImgSynError
from evaluation import PUBLISHABLE_FIELDS
from evaluation.foreign import fit_view, read_foreign
from evaluation.release import (FOREIGN_PREVIEW_FILE, GALLERY_FILE, PRIVACY_UNKNOWN, PUBLIC_INIT_REFERENCE,
                                reviewed_private_set)

PRIVATE = "mnist5k"
TINY = ["--dataset", PRIVATE, "--device", "cpu", "--max_private", "500", "--max_synthetic", "200", "--seeds", "7",
        "--epochs", "1", "--model", "small_cnn", "--batch_size", "100", "--lr", "0.05"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gen_npz(images: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """DPImageBench's layout: x float32 N x C x H x W in [0, 1]."""
    np.savez(path, x=images.astype(np.float32), y=labels)
    return path


def _uint8_npz(images: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """The export layout: x uint8 N x H x W x C, here with one gray channel."""
    np.savez(path, x=np.rint(images[:, :1] * 255).astype(np.uint8).transpose(0, 2, 3, 1), y=labels)
    return path


@pytest.fixture(scope="module")
def foreign_files(tiny_pipeline, tmp_path_factory) -> tuple[Path, dict, dict[str, Path]]:
    """The tiny pipeline's k = 3 images and targets, saved as another method would: both layouts."""
    out, report = tiny_pipeline
    images = np.load(out / "release_k3" / "images.npy")
    labels = np.load(out / "release_k3" / "targets.npy").astype(np.int64)
    folder = tmp_path_factory.mktemp("foreign")
    return out, report, {"gen_npz": _gen_npz(images, labels, folder / "gen.npz"),
                         "npz": _uint8_npz(images, labels, folder / "export.npz")}


@pytest.mark.parametrize("layout", ["gen_npz", "npz"])
def test_a_foreign_release_gets_the_same_figures_and_says_privacy_unknown(foreign_files, tmp_path, layout):
    out, report, files = foreign_files
    release = files[layout]
    before = _digest(release)
    teacher = ["--teacher", str(out / "statistics.dppt")] if layout == "gen_npz" else []
    result = evaluate_release.run(["--release", str(release), "--output", str(tmp_path / "eval"), *TINY, *teacher])
    assert _digest(release) == before and sorted(p.name for p in release.parent.iterdir()) == \
        ["export.npz", "gen.npz"], "the release is only read and nothing is written beside it"

    card = json.loads((tmp_path / "eval" / "release_card.json").read_text())
    assert card == result["card"] and set(card["publishable"]) == set(PUBLISHABLE_FIELDS)
    public, internal = card["publishable"], card["internal"]
    assert public["epsilon"] == PRIVACY_UNKNOWN and public["ledger"] is None, "no ledger: no claimed epsilon"
    assert public["num_images"] == 400 and public["counts_per_class"] == {str(label): 40 for label in range(10)}
    assert (tmp_path / "eval" / public["preview_path"]) == tmp_path / "eval" / FOREIGN_PREVIEW_FILE
    assert (tmp_path / "eval" / FOREIGN_PREVIEW_FILE).is_file() and (tmp_path / "eval" / GALLERY_FILE).is_file()
    markdown = (tmp_path / "eval" / "release_card.md").read_text()
    assert PRIVACY_UNKNOWN in markdown[:markdown.index("## Internal")]

    runs = internal["student_test_acc"]
    assert [row["seed"] for row in runs] == [7] and 0 <= runs[0]["student_test_acc"] <= 1
    assert internal["student_test_acc_summary"] == {"mean": runs[0]["student_test_acc"], "n": 1, "seeds": "7"}
    assert internal["student_recipe"]["labels"].startswith("hard")
    distances = internal["obfuscation"]["l2_to_nearest_private_train"]
    assert set(distances) == {"synthetic", "private test (reference)"}, "no public initialization to compare with"
    assert distances["synthetic"]["n"] == 200 and distances["private test (reference)"]["n"] == 500
    assert internal["obfuscation"]["verdict"]["obfuscated"] is True and result["obfuscated"] is True
    assert set(internal["fidelity"]) == {"synthetic", "private train (reference)"}
    assert PRIVACY_UNKNOWN in internal["not_computed"]["privacy"]
    assert PUBLIC_INIT_REFERENCE in internal["not_computed"]
    if teacher:
        assert internal["teacher_test_acc"] == pytest.approx(report["teacher_test_acc"])
        assert "statistics.dppt" in internal["fidelity_features"] and "teacher_test_acc" not in internal["not_computed"]
        assert internal["foreign_release"]["read_as"].startswith("x float32 400 x 3 x 32 x 32 read as N x C x H x W")
    else:
        assert internal["teacher_test_acc"] == "not measured"
        assert "student trained on this release" in internal["fidelity_features"]
        assert "no --teacher" in internal["not_computed"]["fidelity in a teacher's features"]
        assert internal["foreign_release"]["read_as"].startswith("x uint8 400 x 32 x 32 x 1 read as N x H x W x C")


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """One broken .npz per mistake, with the words its error must say."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20)
    cases = {
        "28 x 28 images": ({"x": rng.random((20, 1, 28, 28), dtype=np.float32), "y": labels}, "28 x 28"),
        "two channels": ({"x": rng.random((20, 2, 32, 32), dtype=np.float32), "y": labels}, "C = 1 or 3"),
        "0-255 floats": ({"x": 255 * rng.random((20, 3, 32, 32)), "y": labels}, "expected [0, 1]"),
        "labels of another task": ({"x": rng.random((20, 3, 32, 32)), "y": labels + 5}, "10 classes"),
        "a label per image": ({"x": rng.random((20, 3, 32, 32)), "y": labels[:10]}, "one class index per image"),
        "no labels": ({"x": rng.random((20, 3, 32, 32))}, "has no y"),
    }
    files = {}
    for name, (arrays, words) in cases.items():
        path = folder / f"{name.replace(' ', '_')}.npz"
        np.savez(path, **arrays)
        files[name] = (path, words)
    files["not an npz"] = (folder / "text.npz", "cannot be read as an .npz")
    files["not an npz"][0].write_text("x,y\n")
    return files


def test_a_wrong_file_is_one_line_before_anything_is_read_or_written(tmp_path, capsys):
    for name, (path, words) in _bad_files(tmp_path).items():
        before = _digest(path)
        registry.OPENED_SPLITS.clear()
        with pytest.raises(SystemExit) as exit_info:
            evaluate_release.main(["--release", str(path), "--output", str(tmp_path / "eval"), *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert words in err[0], (name, err[0])
        assert not (tmp_path / "eval").exists() and registry.OPENED_SPLITS == [], name
        assert _digest(path) == before


@pytest.mark.parametrize("argv, words", [
    (["--output", "{beside}"], "folder holding the release"),
    (["--output", "{eval}", "--dataset", ""], "pass --dataset"),
    (["--output", "{eval}", "--metrics", "m.json"], "trained here (--seeds)"),
    (["--output", "{eval}", "--public_set", "photos"], "drop --public_set"),
    (["--output", "{eval}", "--teacher", "{missing}"], "not found"),
])
def test_flags_that_do_not_fit_a_foreign_release_are_refused(tmp_path, capsys, argv, words):
    release = tmp_path / "gen.npz"
    rng = np.random.default_rng(1)
    _gen_npz(rng.random((20, 3, 32, 32)), rng.integers(0, 10, 20), release)
    paths = {"beside": str(tmp_path), "eval": str(tmp_path / "eval"), "missing": str(tmp_path / "none.dppt")}
    argv = [arg.format(**paths) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_release.main(["--release", str(release), *TINY, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gen.npz"]


def test_both_layouts_read_the_same_pixels_and_gray_fills_the_private_channels(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (6, 1, 32, 32)).astype(np.uint8)
    labels = np.arange(6)
    gray_float = read_foreign(_gen_npz(pixels / 255.0, labels, tmp_path / "a.npz"))
    gray_uint8 = read_foreign(_uint8_npz(pixels / 255.0, labels, tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=pixels[:, 0], y=labels.astype(np.float64))  # N x H x W, integral float labels
    gray_plain = read_foreign(tmp_path / "c.npz")
    spec = registry.dataset_info(PRIVATE)
    views = [fit_view(release, spec, PRIVATE) for release in (gray_float, gray_uint8, gray_plain)]
    for view in views:
        assert view.shape == (6, 3, 32, 32) and view.dtype == torch.float32
        torch.testing.assert_close(view, views[0], atol=1e-6, rtol=0)
        assert torch.equal(view[:, 0], view[:, 2])
    np.testing.assert_array_equal(gray_plain.labels, labels)
    with pytest.raises(DPImgSynError, match="1 channel"):
        fit_view(gray_float, registry.dataset_info("cifar10"), "cifar10")


def test_a_folder_set_re_viewed_at_the_releases_size_is_said_on_the_card(tmp_path):
    """A folder: set has no fixed view: it is seen at the foreign release's size and channels, and the card says so."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, count in (("train", 4), ("test", 2)):
        for name in ("ant", "bee"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / name / f"{index}.png")
    dataset = f"folder:{tmp_path / 'pets'}"
    release = _gen_npz(rng.random((8, 1, 28, 28)), np.arange(8) % 2, tmp_path / "gen.npz")
    result = evaluate_release.run(["--release", str(release), "--output", str(tmp_path / "eval"), "--dataset", dataset,
                                   "--device", "cpu", "--seeds", "7", "--epochs", "1", "--model", "small_cnn",
                                   "--batch_size", "8", "--max_private", "8", "--k_ssim", "2", "--gallery_pairs", "2"])
    note = "private set re-viewed at 28 x 28 x 1 to match the release (its own view: 32 x 32 x 3)"
    assert result["card"]["internal"]["private_view"] == note
    assert note in (tmp_path / "eval" / "release_card.md").read_text()
    assert result["card"]["publishable"]["class_names"] == ["ant", "bee"]  # the private set's labels, by name
    assert reviewed_private_set(dataset, {"image_size": 32, "channels": 3}) is None  # seen as it is: nothing to say
    assert reviewed_private_set(PRIVATE, {}) is None  # a registry set has one view
