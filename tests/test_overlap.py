"""No public image may be a private one: compared by content, before anything is written.

The keys find exact copies and near copies (what resizing or re-encoding leaves) and nothing else; the
candidate search finds every pair that a comparison of all pairs finds. Every stage that makes or ships
a release refuses the private folder, a renamed copy of it and a public folder holding a few private
images, in one line naming how many matched and one example file, with nothing written.
"""
from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate_release
import registry
import export_release
import save_dp_db_stats
import synthesize
import train_dp
from stages.config import validate_config
from synthesizer import overlap
from tests.conftest import TINY_CONFIG
from tests.test_folder_sets import write_tree

QUIET = ["--device", "cpu", "--no_progress"]


def smooth_images(count: int, seed: int, side: int = 32, channels: int = 1) -> torch.Tensor:
    """Distinct images with structure at every scale (upsampled noise), in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, 6, 6, generator=generator)
    fine = torch.rand(count, channels, side, side, generator=generator)
    return (0.8 * F.interpolate(coarse, size=side, mode="bilinear") + 0.2 * fine).clamp(0, 1)


def test_exact_and_near_copies_are_found_and_distinct_images_are_not():
    private = smooth_images(200, seed=0)
    resized = F.interpolate(F.interpolate(private[11:12], size=64, mode="bicubic"), size=32, mode="bilinear",
                            antialias=True)
    reencoded = ((private[7:8] * 255).round() + torch.randint(-3, 4, (1, 1, 32, 32))) / 255
    checked = torch.cat([private[3:4], reencoded.clamp(0, 1), resized.clamp(0, 1), smooth_images(300, seed=1)])
    matches = overlap.find_matches(overlap.content_keys([checked]), overlap.content_keys([private]))
    assert matches.exact.tolist() == [0] and matches.near.tolist() == [1, 2] and matches.first() == 0
    # A one-pixel shift is another image: not a copy.
    shifted = torch.roll(private[:20], 1, dims=-1)
    assert not overlap.find_matches(overlap.content_keys([shifted]), overlap.content_keys([private]))


def test_the_candidate_search_finds_every_pair_that_all_pairs_find():
    """Copies perturbed by up to 1.5 times the tolerance straddle every kind of cell border: the search over
    neighbouring cells must agree with the comparison of all pairs, in colour and in gray."""
    for channels in (1, 3):
        private = smooth_images(200, seed=2, side=16, channels=channels)
        generator = torch.Generator().manual_seed(3)
        strength = torch.linspace(0, 1.5 * overlap.NEAR_TOLERANCE, 200).view(-1, 1, 1, 1)
        shift = (2 * torch.rand(200, channels, 1, 1, generator=generator) - 1) * strength
        checked = torch.cat([(private + shift).clamp(0, 1), smooth_images(50, seed=4, side=16, channels=channels)])
        checked_keys, private_keys = overlap.content_keys([checked]), overlap.content_keys([private])
        matches = overlap.find_matches(checked_keys, private_keys)
        distance = np.abs(checked_keys.thumbnails[:, None] - private_keys.thumbnails[None]).mean(axis=2)
        expected = np.flatnonzero(distance.min(axis=1) <= overlap.NEAR_TOLERANCE)
        found = np.sort(np.concatenate([matches.exact, matches.near]))
        assert found.tolist() == expected.tolist()
        assert 100 < len(found) < 200  # both sides of the tolerance are exercised


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> dict[str, Path]:
    """A private folder set with its teacher and DP statistics (tiny), and a public folder of other images."""
    root = tmp_path_factory.mktemp("overlap")
    private = write_tree(root / "data" / "scans", (16, 16), gray=True, per_class=6, test_per_class=2)
    public = root / "data" / "street" / "train" / "any"
    public.mkdir(parents=True)
    for index, image in enumerate(smooth_images(12, seed=5, side=20)):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(public / f"{index}.png")
    teacher = train_dp.run(["--dataset", f"folder:{private}", "--model", "small_cnn", "--epochs", "1",
                            "--train_batch_size", "8", "--lr", "0.5", "--noise_multiplier", "1", "--stats_epochs",
                            "1", "--stats_batch_size", "8", "--seed", "0", "--output", str(root / "teacher.dppt"),
                            *QUIET])
    stats = save_dp_db_stats.run(["--teacher", str(teacher), "--dataset", f"folder:{private}", "--seed", "0",
                                  "--output", str(root / "statistics"), *QUIET])
    return {"root": root, "private": private, "public": public.parents[1], "statistics": Path(stats)}


def synthesis_flags(run: dict, public: Path, output: Path, dataset: Path | None) -> list[str]:
    given = ["--dataset", f"folder:{dataset}"] if dataset is not None else []
    return ["--teacher", str(run["statistics"]), "--public_set", f"folder:{public}", "--num_samples", "6", "--k",
            "0", "--sampling_dir", str(run["root"] / "lists"), "--output", str(output), *given, *QUIET]


def one_error(capsys, script, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    return error


def test_synthesis_refuses_the_private_folder_a_renamed_copy_and_a_folder_holding_private_images(folder_run,
                                                                                                  capsys):
    private, root = folder_run["private"], folder_run["root"]
    renamed = root / "data" / "holiday_photos"
    shutil.copytree(private, renamed)
    mixed = root / "data" / "scraped"
    shutil.copytree(folder_run["public"], mixed)
    for source, name in ((private / "train" / "bee" / "2.png", "x.png"), (private / "test" / "cow" / "0.png", "y.png")):
        shutil.copy(source, mixed / "train" / "any" / name)
    cases = ((private, "of 6 images are private images of folder:scans"),
             (renamed, "6 of 6 images are private images of folder:scans (6 equal, 0 nearly equal"))
    for index, (public, said) in enumerate(cases):
        output = root / f"release_{index}"
        error = one_error(capsys, synthesize, synthesis_flags(folder_run, public, output, private))
        assert said in error and "public file " + str(public) in error and "no artifact was written" in error, error
        assert not output.exists()
    # The folder holding two private images among twelve others: all 14 are released, so both are found.
    flags = synthesis_flags(folder_run, mixed, root / "r", private)
    error = one_error(capsys, synthesize, [*flags[:5], "14", *flags[6:]])
    assert "2 of 14 images" in error and ("x.png" in error or "y.png" in error), error
    # Public images also shape the DP statistics' clipping (pre-scaling): a renamed copy is refused there too.
    error = one_error(capsys, save_dp_db_stats, [
        "--teacher", str(root / "teacher.dppt"), "--dataset", f"folder:{private}", "--public_set",
        f"folder:{renamed}", "--sampling_dir", str(root / "lists"), "--output", str(root / "scaled.dppt"), *QUIET])
    assert "are private images of folder:scans" in error and not (root / "scaled.dppt").exists()
    # Without the private folder the check cannot run: refused, saying what to pass.
    error = one_error(capsys, synthesize, synthesis_flags(folder_run, renamed, root / "r", None))
    assert "pass --dataset folder:PATH" in error and not (root / "r").exists()


def test_export_and_evaluation_refuse_a_release_whose_images_became_private(folder_run, capsys):
    """A release made from independent public images, whose images the private folder then holds too."""
    root = folder_run["root"]
    release = root / "clean_release"
    assert synthesize.main(synthesis_flags(folder_run, folder_run["public"], release, folder_run["private"])) == 0
    grown = root / "elsewhere" / "scans"  # the same set on another path, now holding the public images
    shutil.copytree(folder_run["private"], grown)
    for index, path in enumerate(sorted(folder_run["public"].rglob("*.png"))[:3]):
        shutil.copy(path, grown / "train" / "ant" / f"public_{index}.png")
    export = root / "export"
    error = one_error(capsys, export_release, ["--release", str(release), "--format", "npz", "--output", str(export),
                                               "--dataset", f"folder:{grown}", "--no_progress"])
    assert "of 6 images are private images of folder:scans" in error and "release image" in error
    assert not export.exists()
    error = one_error(capsys, export_release, ["--release", str(release), "--format", "npz", "--output",
                                               str(export), "--no_progress"])
    assert "pass --dataset folder:PATH" in error and not export.exists()
    card = root / "card"
    error = one_error(capsys, evaluate_release, [
        "--release", str(release), "--output", str(card), "--dataset", f"folder:{grown}", "--public_set",
        f"folder:{folder_run['public']}", "--teacher", str(folder_run["statistics"]), "--sampling_dir",
        str(root / "lists"), "--device", "cpu"])
    assert "are private images of folder:scans" in error and not card.exists()
    # The original private folder shares nothing with the release: the export goes through.
    assert export_release.main(["--release", str(release), "--format", "npz", "--output", str(export), "--dataset",
                                f"folder:{folder_run['private']}", "--no_progress"]) == 0


def test_the_pipeline_gives_synthesis_its_private_set():
    pipeline = validate_config({**TINY_CONFIG, "dataset": "folder:/data/scans"})
    assert pipeline.synthesis.dataset == "folder:/data/scans"


def test_only_pairs_with_a_folder_set_are_read():
    for private, public in itertools.product(("mnist5k", "folder:/a"), ("photos", "folder:/b")):
        assert overlap.needs_check(private, public) == ("folder:" in private + public)


def test_private_keys_are_kept_owner_only_and_made_again_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(overlap.CACHE_ENV, str(tmp_path / "cache"))
    private = f"folder:{write_tree(tmp_path / 'scans', (16, 16), gray=True, per_class=2, test_per_class=1)}"
    view = {"image_size": 16, "channels": 1}
    previous = os.umask(0o022)
    try:
        keys = overlap.private_keys(private, None, view)
    finally:
        os.umask(previous)
    folder = tmp_path / "cache" / "overlap"
    (kept,) = folder.iterdir()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    overlap._private_keys.cache_clear()
    with monkeypatch.context() as patch:  # a later process reads the kept keys, not the images
        patch.setattr(registry, "get_split", lambda *args, **kwargs: pytest.fail("private images read again"))
        assert overlap.private_keys(private, None, view).digests == keys.digests
    Image.new("L", (16, 16), 255).save(Path(private[len("folder:"):]) / "train" / "ant" / "new.png")
    assert len(overlap.private_keys(private, None, view)) == len(keys) + 1
