"""Tests of the release evaluation library: metrics checked against independent references, the
obfuscation verdict's power to catch copies, and the release card's publishable/internal split."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import structural_similarity
from torch import nn
from torch.utils.data import TensorDataset

import evaluation
from common.errors import DPImgSynError
from evaluation import (INTERNAL_FIELDS, NOT_FOR_PUBLICATION, NOT_MEASURED, PUBLISHABLE_FIELDS, build_card,
                        distribution_summary, frechet_distance, gallery_rows, nearest_neighbours, nn_report,
                        obfuscation_verdict, penultimate_features, precision_recall, render_card_markdown, ssim,
                        write_card)


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Independent reference: scikit-image's SSIM with the Wang et al. Gaussian settings."""
    return np.array(
        [
            structural_similarity(
                a.double().numpy(),
                b.double().numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
                channel_axis=0,
            )
            for a, b in zip(x, y)
        ]
    )


def _smooth_images(generator: torch.Generator, n: int, channels: int, size: int) -> torch.Tensor:
    """Structured images: low-resolution noise upsampled, so neighbouring pixels correlate."""
    low = torch.rand(n, channels, size // 4, size // 4, generator=generator)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- SSIM


def test_ssim_of_identical_images_is_one() -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(images, images.clone()), torch.ones(4, dtype=images.dtype), atol=1e-6)


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28), (3, 13)])
def test_ssim_matches_independent_reference_on_random_and_structured_images(channels: int, size: int) -> None:
    generator = torch.Generator().manual_seed(channels * 100 + size)
    random_pair = tuple(torch.rand(3, channels, size, size, generator=generator) for _ in range(2))
    structured = _smooth_images(generator, 3, channels, size)
    ramp = torch.linspace(0, 1, size).expand(3, channels, size, size)
    noise = 0.05 * torch.randn(structured.shape, generator=generator)
    structured_pair = (structured, (0.7 * structured + 0.3 * ramp + noise).clamp(0, 1))
    for x, y in (random_pair, structured_pair):
        expected = _skimage_ssim(x, y)
        np.testing.assert_allclose(ssim(x, y).numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(ssim(x.double(), y.double()).numpy(), expected, atol=1e-10)


def test_ssim_decreases_monotonically_with_shift_and_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    base = _smooth_images(generator, 2, 3, 24) * 0.5 + 0.25
    noise = torch.randn(base.shape, generator=generator)
    shifted = torch.stack([ssim(base, base + shift) for shift in (0.0, 0.05, 0.1, 0.2, 0.4)])
    noisy = torch.stack([ssim(base, base + std * noise) for std in (0.0, 0.02, 0.05, 0.1, 0.3)])
    for curve in (shifted, noisy):
        assert torch.all(curve[1:] < curve[:-1]), curve


def test_ssim_rejects_mismatched_or_too_small_images() -> None:
    with pytest.raises(DPImgSynError, match="same shape"):
        ssim(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 15))
    with pytest.raises(DPImgSynError, match="smaller than"):
        ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


# --------------------------------------------------------------------------- nearest neighbours


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_nearest_neighbours_match_brute_force_for_any_chunk(chunk: int) -> None:
    generator = torch.Generator().manual_seed(2)
    queries = torch.rand(37, 3, 4, 4, generator=generator)
    references = torch.rand(53, 3, 4, 4, generator=generator)
    brute = torch.cdist(queries.flatten(1).double(), references.flatten(1).double())
    expected_dist, expected_idx = brute.topk(3, dim=1, largest=False)
    distances, indices = nearest_neighbours(queries, references, k=3, chunk=chunk)
    assert distances.shape == indices.shape == (37, 3)
    assert torch.equal(indices, expected_idx)
    torch.testing.assert_close(distances.double(), expected_dist, atol=1e-5, rtol=1e-5)


def test_nearest_neighbours_accept_numpy_memmap(tmp_path) -> None:
    rng = np.random.default_rng(3)
    references = rng.random((20, 1, 6, 6), dtype=np.float32)
    np.save(tmp_path / "refs.npy", references)
    mapped = np.load(tmp_path / "refs.npy", mmap_mode="r")
    queries = torch.from_numpy(references[[4, 11]] + 1e-3)
    distances, indices = nearest_neighbours(queries, mapped, k=1, chunk=6)
    assert indices[:, 0].tolist() == [4, 11]
    torch.testing.assert_close(distances[:, 0], torch.full((2,), 1e-3 * 6), atol=1e-5, rtol=0)


def test_near_duplicate_distances_are_exact_not_matmul_rounded() -> None:
    """Copies are what the obfuscation check hunts; their tiny distances must not drown in rounding."""
    generator = torch.Generator().manual_seed(4)
    references = torch.rand(10, 3, 32, 32, generator=generator)
    offsets = 1e-4 * torch.randn(10, 3, 32, 32, generator=generator)
    queries = references + offsets
    distances, indices = nearest_neighbours(queries, references, k=1)
    assert torch.equal(indices[:, 0], torch.arange(10))
    torch.testing.assert_close(distances[:, 0], offsets.flatten(1).norm(dim=1), rtol=1e-3, atol=0)


def test_nearest_neighbours_reject_bad_arguments() -> None:
    with pytest.raises(DPImgSynError, match="different sizes"):
        nearest_neighbours(torch.rand(2, 3), torch.rand(4, 5))
    with pytest.raises(DPImgSynError, match="at least 3"):
        nearest_neighbours(torch.rand(2, 3), torch.rand(2, 3), k=3)


# --------------------------------------------------------------------------- summaries


def test_distribution_summary_has_every_key_and_correct_values() -> None:
    summary = distribution_summary(np.arange(101))
    assert tuple(summary) == evaluation.SUMMARY_KEYS
    expected = {"min": 0.0, "p05": 5.0, "p25": 25.0, "median": 50.0, "mean": 50.0, "p75": 75.0, "max": 100.0}
    assert summary == {**expected, "n": 101}
    assert distribution_summary(torch.tensor([2.0, 4.0]))["mean"] == 3.0
    with pytest.raises(DPImgSynError):
        distribution_summary([])


# --------------------------------------------------------------------------- Fréchet distance


def _exact_moments(n: int, dim: int, seed: int) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    z = np.random.default_rng(seed).standard_normal((n, dim))
    z -= z.mean(0)
    return z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    assert frechet_distance(features, features.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    mean_a, mean_b = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    feats_a = _exact_moments(300, 4, 6) * np.sqrt(var_a) + mean_a
    feats_b = _exact_moments(250, 4, 7) * np.sqrt(var_b) + mean_b
    closed_form = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(torch.from_numpy(feats_a), feats_b) == pytest.approx(closed_form, rel=1e-9)


def test_frechet_distance_matches_sqrtm_formula_for_full_covariances() -> None:
    rng = np.random.default_rng(8)
    feats_a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    feats_b = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6)) + 0.5
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(feats_a, feats_b) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_stays_finite_with_singular_covariances() -> None:
    """Fewer images than feature dimensions (singular covariances) is the usual case for small releases."""
    generator = torch.Generator().manual_seed(9)
    feats_a, feats_b = torch.randn(10, 64, generator=generator), torch.randn(12, 64, generator=generator) + 1.0
    distance = frechet_distance(feats_a, feats_b)
    assert math.isfinite(distance) and distance > 64 * 0.5
    assert frechet_distance(feats_a, feats_a) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- precision / recall


def test_precision_recall_of_identical_sets_is_one() -> None:
    features = torch.randn(60, 8, generator=torch.Generator().manual_seed(10))
    result = precision_recall(features, features.clone(), k=3, chunk=16)
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_precision_recall_of_far_apart_sets_is_zero() -> None:
    generator = torch.Generator().manual_seed(11)
    real, fake = torch.randn(50, 8, generator=generator), torch.randn(40, 8, generator=generator) + 100.0
    result = precision_recall(real, fake, k=3)
    assert result["precision"] == 0.0 and result["recall"] == 0.0


def test_precision_recall_separates_realism_from_coverage() -> None:
    """Fakes from one of the two real modes are realistic (high precision) but cover half (recall ~ 0.5)."""
    generator = torch.Generator().manual_seed(12)
    real = torch.cat([torch.randn(100, 4, generator=generator), torch.randn(100, 4, generator=generator) + 50.0])
    fake = torch.randn(100, 4, generator=generator)
    result = precision_recall(real.numpy(), fake, k=5, chunk=32)
    assert result["precision"] >= 0.9
    assert 0.4 <= result["recall"] <= 0.6


# --------------------------------------------------------------------------- penultimate features


def test_penultimate_features_are_the_inputs_of_the_last_linear_layer() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    images = torch.rand(9, 3, 2, 2)
    expected = torch.relu(model[1](images.flatten(1))).detach()
    for source in (images, images.numpy(), TensorDataset(images, torch.zeros(9))):
        torch.testing.assert_close(penultimate_features(model, source, batch_size=4), expected)
    assert model.training, "the model's training flag must be restored"
    shifted = penultimate_features(model, images, preprocess=lambda batch: (batch - 0.5) / 0.5)
    torch.testing.assert_close(shifted, torch.relu(model[1](((images - 0.5) / 0.5).flatten(1))).detach())
    with pytest.raises(DPImgSynError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Flatten()), images)


# --------------------------------------------------------------------------- obfuscation


def _private_domain(seed: int, n_train: int = 120, n_test: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy private dataset: a few smooth class prototypes plus per-image smooth variation."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = _smooth_images(generator, 4, 3, 16)

    def draw(n: int) -> torch.Tensor:
        labels = torch.arange(n) % 4
        return (0.8 * prototypes[labels] + 0.2 * _smooth_images(generator, n, 3, 16)).clamp(0, 1)

    return draw(n_train), draw(n_test)


def test_release_of_copies_is_flagged_not_obfuscated_and_random_release_passes(tmp_path) -> None:
    train, test = _private_domain(14)
    generator = torch.Generator().manual_seed(15)
    reference = nn_report(test, train, k_ssim=3, chunk=32)

    copies = (train[:50] + 0.01 * torch.randn(50, 3, 16, 16, generator=generator)).clamp(0, 1)
    np.save(tmp_path / "images.npy", copies.numpy())
    copies_report = nn_report(np.load(tmp_path / "images.npy", mmap_mode="r"), train, k_ssim=3, chunk=16)
    assert np.array_equal(copies_report["l2_index"], np.arange(50))
    assert np.all(copies_report["ssim"] > 0.9)
    copies_verdict = obfuscation_verdict(copies_report, reference)
    assert copies_verdict["obfuscated"] is False
    assert copies_verdict["synthetic_median_l2"] <= copies_verdict["reference_median_l2"]
    assert "at or below" in copies_verdict["reason"]

    unrelated = torch.rand(50, 3, 16, 16, generator=generator)
    unrelated_verdict = obfuscation_verdict(nn_report(unrelated, train, k_ssim=3), reference)
    assert unrelated_verdict["obfuscated"] is True
    assert unrelated_verdict["close_fraction"] == 0.0


def test_a_few_copies_hidden_in_an_unrelated_release_are_flagged() -> None:
    """A far median must not hide a tail of near-copies: the close-fraction rule catches them."""
    train, test = _private_domain(16)
    generator = torch.Generator().manual_seed(17)
    release = torch.cat([torch.rand(40, 3, 16, 16, generator=generator), train[:10]])
    verdict = obfuscation_verdict(nn_report(release, train), nn_report(test, train))
    assert verdict["synthetic_median_l2"] > verdict["reference_median_l2"]
    assert verdict["close_fraction"] == pytest.approx(10 / 50)
    assert verdict["obfuscated"] is False
    assert "5th percentile" in verdict["reason"]


def test_nn_report_summaries_and_ssim_candidates() -> None:
    train, test = _private_domain(18, n_train=40, n_test=12)
    report = nn_report(test, train, k_ssim=4, chunk=5)
    brute = torch.cdist(test.flatten(1).double(), train.flatten(1).double())
    np.testing.assert_allclose(report["l2"], brute.min(1).values.numpy(), rtol=1e-5)
    candidates = brute.topk(4, dim=1, largest=False).indices
    for row in range(len(test)):
        scores = ssim(test[row : row + 1].expand(4, -1, -1, -1), train[candidates[row]])
        assert report["ssim"][row] == pytest.approx(float(scores.max()), abs=1e-6)
        assert report["ssim_index"][row] == int(candidates[row][scores.argmax()])
    assert report["summary"]["l2"]["median"] == pytest.approx(float(np.median(report["l2"])))
    with pytest.raises(DPImgSynError, match="differ in shape"):
        nn_report(test[:, :1], train)
    with pytest.raises(DPImgSynError, match="nn_report"):
        obfuscation_verdict({"distances": [1.0]}, report)


def test_gallery_rows_pair_the_closest_synthetic_images_with_their_neighbours() -> None:
    train, _ = _private_domain(19, n_train=30, n_test=1)
    generator = torch.Generator().manual_seed(20)
    release = torch.cat([torch.rand(6, 3, 16, 16, generator=generator), train[[7, 3]] + 0.01, train[[12]] + 0.05])
    report = nn_report(release, train, k_ssim=2)
    rows = gallery_rows(release.numpy(), train, report, n=3)
    assert rows["synthetic_index"].tolist() == [6, 7, 8]
    assert rows["neighbour_index"].tolist() == [7, 3, 12]
    assert rows["pairs"].shape == (6, 3, 16, 16)
    np.testing.assert_array_equal(rows["pairs"][1], train[7].numpy())
    np.testing.assert_array_equal(rows["pairs"][4], release[8].numpy())
    assert np.all(np.diff(rows["l2"]) >= 0)
    by_ssim = gallery_rows(release, train, report, n=2, by="ssim")
    assert np.all(np.diff(by_ssim["ssim"]) <= 0)
    with pytest.raises(DPImgSynError, match="unknown gallery order"):
        gallery_rows(release, train, report, by="psnr")


# --------------------------------------------------------------------------- release card

SENTINEL = 0.987654  # a private figure; rendered as 0.9877


def _card_inputs(**internal_overrides) -> tuple[dict, dict]:
    publishable = {
        "release": "checkpoints/release_mnist",
        "dataset": "mnist5k",
        "public_set": "photos",
        "k": 2,
        "num_images": 20,
        "counts_per_class": {str(label): 2 for label in range(10)},
        "label_target_agreement": 0.25,
        "epsilon": 1.25,
        "delta": 1e-5,
        "accountant": "prv",
        "ledger": [
            {"name": "dp_sgd", "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0},
            {"name": "dp_statistics", "noise_multiplier": 5.0, "sample_rate": 0.05, "steps": 20, "max_grad_norm": 2.0},
        ],
        "preview_path": "checkpoints/release_mnist/preview.png",
    }
    internal = {
        "teacher_test_acc": 0.93,
        "student_test_acc": [{"k": 2, "seed": 111, "student_test_acc": 0.9}],
        "obfuscation": {
            "verdict": {"obfuscated": True, "reason": "far", "close_fraction": 0.0},
            "distributions": {
                "synthetic -> private train L2": {"min": SENTINEL, "median": 3.0, "n": 20},
                "private test -> private train L2": {"min": 0.5, "median": 1.0, "n": 10},
            },
        },
        "fidelity": {"frechet_distance": 12.5, "precision": 0.4, "recall": 0.3},
        "gallery_path": "eval/closest_pairs.png",
    }
    internal.update(internal_overrides)
    return publishable, internal


def test_card_json_has_every_field_and_markdown_warns_first(tmp_path) -> None:
    card = build_card(*_card_inputs())
    markdown_path, json_path = write_card(tmp_path / "eval", card)
    assert (markdown_path.name, json_path.name) == ("release_card.md", "release_card.json")
    stored = json.loads(json_path.read_text())
    for part, fields in (("publishable", PUBLISHABLE_FIELDS), ("internal", INTERNAL_FIELDS)):
        assert set(fields) <= set(stored[part]), part
    assert set(stored["publishable"]) == set(PUBLISHABLE_FIELDS)
    assert stored["internal"]["warning"] == NOT_FOR_PUBLICATION
    assert "not comparable" in stored["internal"]["fidelity_note"]
    assert "penultimate" in stored["internal"]["fidelity_note"]

    markdown = markdown_path.read_text()
    assert markdown.splitlines()[0] == NOT_FOR_PUBLICATION
    assert "NOT FOR PUBLICATION" in markdown.splitlines()[0]
    internal_start = markdown.index("## Internal")
    assert markdown.index("## Publishable") < internal_start
    assert "0.9877" in markdown[internal_start:] and "0.9877" not in markdown[:internal_start]
    assert "not comparable with published FID" in markdown[internal_start:]
    assert "| dp_statistics |" in markdown[:internal_start]
    assert "![preview of synthetic images](checkpoints/release_mnist/preview.png)" in markdown
    assert "![gallery of closest pairs](eval/closest_pairs.png)" in markdown[internal_start:]
    table_rows = [line for line in markdown.splitlines() if line.startswith("|")]
    distribution_rows = [row for row in table_rows if "private train L2" in row or "median" in row]
    assert len({row.count("|") for row in distribution_rows}) == 1, "every table row fits its header"
    assert not list((tmp_path / "eval").glob(".*tmp")), "atomic writes leave no temporary files"


def test_card_says_not_measured_without_accuracies() -> None:
    card = build_card(*_card_inputs(teacher_test_acc=None, student_test_acc=None))
    assert card["internal"]["teacher_test_acc"] == NOT_MEASURED
    assert card["internal"]["student_test_acc"] == NOT_MEASURED
    markdown = render_card_markdown(card)
    assert f"- Teacher test accuracy: {NOT_MEASURED}" in markdown
    assert f"- Student test accuracy: {NOT_MEASURED}" in markdown


def test_card_refuses_private_figures_in_the_publishable_part() -> None:
    publishable, internal = _card_inputs()
    for leaked_key in ("teacher_test_acc", "nearest_private_l2"):
        with pytest.raises(DPImgSynError, match="publishable"):
            build_card({**publishable, leaked_key: SENTINEL}, internal)
    with pytest.raises(DPImgSynError, match="lacks"):
        build_card({key: value for key, value in publishable.items() if key != "ledger"}, internal)
    with pytest.raises(DPImgSynError, match="None for what was not measured"):
        build_card(publishable, {key: value for key, value in internal.items() if key != "fidelity"})


def test_card_counts_the_teachers_labels_and_shows_the_targets_agreement() -> None:
    publishable, internal = _card_inputs()
    markdown = render_card_markdown(build_card(publishable, internal))
    public_part = markdown[:markdown.index("## Internal")]
    assert "### Images per class (the teacher's labels)" in public_part
    assert "- Agreement of the teacher's labels with the synthesis targets: 25.0%" in public_part
    # A release without targets (e.g. evaluated from another tool) has no agreement rate: recorded as None.
    card = build_card({key: value for key, value in publishable.items() if key != "label_target_agreement"}, internal)
    assert card["publishable"]["label_target_agreement"] is None
    assert "synthesis targets: not recorded" in render_card_markdown(card)


def test_card_names_the_classes_and_says_when_the_private_set_was_re_viewed() -> None:
    note = "private set re-viewed at 28 x 28 x 1 to match the release (its own view: 32 x 32 x 3)"
    publishable, internal = _card_inputs(private_view=note)
    names = ["airplane", "a|b", *map(str, range(2, 10))]  # a name equal to its label adds nothing
    card = build_card({**publishable, "class_names": names}, internal)
    assert card["publishable"]["class_names"] == names
    markdown = render_card_markdown(card)
    internal_start = markdown.index("## Internal")
    assert "| 0: airplane | 1: a\\|b | 2 | 3 |" in markdown[:internal_start]
    assert f"- Note: {note}" in markdown[internal_start:] and "private_view" not in markdown
    unnamed = build_card(*_card_inputs())
    assert unnamed["publishable"]["class_names"] is None and "| 0 | 1 | 2 |" in render_card_markdown(unnamed)


def test_card_of_non_private_run_is_strict_json_and_says_so(tmp_path) -> None:
    publishable, internal = _card_inputs()
    internal["obfuscation"]["verdict"]["median_ratio"] = np.float64(math.inf)
    card = build_card({**publishable, "epsilon": math.inf, "num_images": np.int64(20)}, internal)
    _, json_path = write_card(tmp_path, card)
    stored = json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard {name}"))
    assert stored["publishable"]["epsilon"] == "inf"
    assert stored["publishable"]["num_images"] == 20
    assert "inf (non-private run" in render_card_markdown(card)


def test_card_names_paths_relative_to_its_folder(tmp_path, monkeypatch) -> None:
    from evaluation.card import card_path

    release = tmp_path / "runs" / "release_k3"
    assert card_path(release, tmp_path / "runs" / "evaluation_k3") == os.path.join("..", "release_k3")

    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", other_drive)
    assert card_path(release, tmp_path / "eval") == "release_k3"  # the name alone, never the absolute path


@pytest.mark.parametrize("scored", [{"student_validation_acc": 0.5}, {"student_test_acc": 0.5}])
def test_a_card_refuses_students_scored_on_the_validation_split(tmp_path, scored) -> None:
    """The card reports test accuracies: a validation student (either key) would be a validation figure called test."""
    from evaluation.release import student_results

    files = {"images.npy": "0" * 64}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**scored, "eval_split": "validation", "settings": {"release_sha256": files}}))
    with pytest.raises(DPImgSynError, match="on the validation split.*--eval_split test"):
        student_results([path], {"files": files})
