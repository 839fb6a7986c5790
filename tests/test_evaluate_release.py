"""evaluate_release.py on the tiny pipeline: card contract, references, power of the check, safety."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_release
import registry
from evaluation import INTERNAL_FIELDS, NOT_FOR_PUBLICATION, NOT_MEASURED, PUBLISHABLE_FIELDS
from evaluation.release import GALLERY_FILE, NEIGHBOURS_FILE, PUBLIC_INIT_REFERENCE, EvaluationConfig, to_pixels
from synthesizer.release import METADATA_FILE, RESERVED_METADATA_KEYS, ReleaseWriter

PRIVATE = "mnist5k"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _private_pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = registry.get_split(PRIVATE, split)
    images, labels = dataset.tensors[:2]
    spec = registry.dataset_info(PRIVATE)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    return to_pixels(images, mean, std), labels


@pytest.fixture(scope="module")
def evaluated_k3(tiny_pipeline, tmp_path_factory):
    """release_k3 evaluated once through the CLI, with a student's metrics and capped subsets."""
    out, report = tiny_pipeline
    release = out / "release_k3"
    before = _snapshot(release)
    eval_dir = tmp_path_factory.mktemp("eval_k3")
    result = evaluate_release.run(["--release", str(release), "--output", str(eval_dir), "--device", "cpu",
                                   "--metrics", str(out / "student_k3_seed1" / "metrics.json"),
                                   "--max_synthetic", "300", "--max_private", "3000"])
    return out, report, eval_dir, result, before, _snapshot(release)


def test_card_has_every_field_and_the_release_is_untouched(evaluated_k3):
    out, report, eval_dir, result, before, after = evaluated_k3
    assert after == before, "evaluation must never write into the release"
    card = json.loads((eval_dir / "release_card.json").read_text())
    assert set(card["publishable"]) == set(PUBLISHABLE_FIELDS)
    assert set(INTERNAL_FIELDS) <= set(card["internal"])
    assert all(card["internal"][key] != NOT_MEASURED for key in INTERNAL_FIELDS), "everything was measured"

    public = card["publishable"]
    assert public["epsilon"] == pytest.approx(report["epsilon"]) and public["delta"] == report["delta"]
    assert [entry["name"] for entry in public["ledger"]] == ["dp_sgd", "dp_statistics"]
    recorded = json.loads((out / "release_k3" / METADATA_FILE).read_text())["counts"]["per_class"]
    assert public["counts_per_class"] == {str(label): count for label, count in enumerate(recorded)}
    assert sum(public["counts_per_class"].values()) == 400 and public["k"] == 3
    assert (eval_dir / public["preview_path"]).resolve() == (out / "release_k3" / "preview.png").resolve()
    assert public["release"] == os.path.relpath(out / "release_k3", eval_dir)  # no absolute local path

    internal = card["internal"]
    metrics = json.loads((out / "student_k3_seed1" / "metrics.json").read_text())
    assert [row["student_test_acc"] for row in internal["student_test_acc"]] == [metrics["student_test_acc"]]
    assert internal["teacher_test_acc"] == pytest.approx(report["teacher_test_acc"])
    assert internal["sampling"]["synthetic"] == {"used": 300, "total": 400}
    assert internal["sampling"]["private_train"] == {"used": 3000, "total": 4000}
    assert internal["sampling"]["private_test"] == {"used": 1000, "total": 1000}
    assert "private_train" in internal["sampling_note"] and "upper bound" in internal["sampling_note"]
    for name in ("synthetic", "private test (reference)", PUBLIC_INIT_REFERENCE):
        assert internal["obfuscation"]["l2_to_nearest_private_train"][name]["n"] == (1000 if "test" in name else 300)
    assert set(internal["fidelity"]["synthetic"]) >= {"frechet_distance", "precision", "recall"}
    assert internal["fidelity"]["private train (reference)"]["frechet_distance"] < \
        internal["fidelity"]["synthetic"]["frechet_distance"], "private train is the closest to private test"
    # Public photos aligned for 3 steps are nothing like digits: obfuscated, and said so.
    assert internal["obfuscation"]["verdict"]["obfuscated"] is True and result["obfuscated"] is True

    markdown = (eval_dir / "release_card.md").read_text()
    assert markdown.splitlines()[0] == NOT_FOR_PUBLICATION
    internal_start = markdown.index("## Internal")
    accuracy_text = f"{metrics['student_test_acc']:.4g}"
    assert accuracy_text in markdown[internal_start:] and accuracy_text not in markdown[:internal_start]
    assert internal["gallery_path"] == GALLERY_FILE and result["gallery"] == eval_dir / GALLERY_FILE
    with Image.open(eval_dir / internal["gallery_path"]) as gallery:
        assert gallery.size[0] > gallery.size[1] > 0  # 4 rows of 4 (synthetic, private) pairs
    neighbours = np.load(eval_dir / NEIGHBOURS_FILE)
    assert neighbours["l2"].shape == (300,) and neighbours["private_train_index"].max() < 4000
    # Both show private images or indices: owner-only whatever the umask, unlike the card.
    assert [(eval_dir / name).stat().st_mode & 0o777 for name in (GALLERY_FILE, NEIGHBOURS_FILE)] == [0o600, 0o600]


def test_k0_distances_equal_the_public_init_reference_and_are_exact(tiny_pipeline, tmp_path, capsys):
    out, _ = tiny_pipeline
    result = evaluate_release.evaluate_release(EvaluationConfig(release=str(out / "release_k0"),
                                                                output=str(tmp_path / "eval"), device="cpu"))
    printed = capsys.readouterr().out.splitlines()
    assert "PRIVATE" in printed[0] and "only read" in printed[0], "the tool says first that it reads private data"

    obfuscation = result["card"]["internal"]["obfuscation"]
    assert obfuscation["public_init_reproduced"] is True
    for metric in ("l2_to_nearest_private_train", "ssim_to_most_similar_private_train"):
        synthetic, reference = obfuscation[metric]["synthetic"], obfuscation[metric][PUBLIC_INIT_REFERENCE]
        assert synthetic == pytest.approx(reference, rel=1e-6, abs=1e-9)
    fidelity = result["card"]["internal"]["fidelity"]
    assert fidelity["synthetic"] == pytest.approx(fidelity[PUBLIC_INIT_REFERENCE])
    assert result["card"]["internal"]["student_test_acc"] == NOT_MEASURED

    # Distances and private indices against an independent brute-force search over the whole train split.
    train, _ = _private_pixels("train")
    release_images = torch.from_numpy(np.load(out / "release_k0" / "images.npy"))
    brute = torch.cdist(release_images.flatten(1).double(), train.flatten(1).double())
    neighbours = np.load(result["neighbours"])
    np.testing.assert_allclose(neighbours["l2"], brute.min(1).values.numpy(), rtol=1e-4)
    np.testing.assert_array_equal(neighbours["private_train_index"], brute.argmin(1).numpy())


def test_release_of_private_copies_is_flagged_not_obfuscated(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """The check has power: a 'release' of private training images must fail it."""
    out, _ = tiny_pipeline
    monkeypatch.chdir(tmp_path)  # the regenerated public sampling list goes here, not into the repository
    train, labels = _private_pixels("train")
    count = 200
    release = tmp_path / "copies"
    writer = ReleaseWriter(release, num_samples=count, shard_size=count, image_shape=(3, 32, 32), num_classes=10,
                           settings={"copies_of_private_images": True})
    writer.write_shard(0, images=train[:count], initial_images=train[:count],
                       soft_labels=torch.nn.functional.one_hot(labels[:count], 10).float(),
                       targets=labels[:count].long())
    metadata = json.loads((out / "release_k0" / METADATA_FILE).read_text())
    metadata = {key: value for key, value in metadata.items() if key not in RESERVED_METADATA_KEYS}
    metadata.update(k=1, teacher_file="moved_away.dppt")
    writer.finalize(metadata)

    # Its recorded teacher is nowhere to be found (as after a move): --teacher names it, verified by sha256.
    result = evaluate_release.run(["--release", str(release), "--output", str(tmp_path / "eval"),
                                   "--device", "cpu", "--teacher", str(out / "statistics.dppt")])
    verdict = result["card"]["internal"]["obfuscation"]["verdict"]
    assert result["obfuscated"] is False and verdict["obfuscated"] is False
    assert verdict["synthetic_median_l2"] <= 1e-4 <= verdict["reference_median_l2"]
    assert verdict["close_fraction"] == 1.0
    assert "NOT OBFUSCATED" in capsys.readouterr().out
    neighbours = np.load(result["neighbours"])
    np.testing.assert_array_equal(neighbours["private_train_index"], np.arange(count))


def test_missing_or_mismatched_teacher_is_a_one_line_error(tiny_pipeline, tmp_path, capsys):
    out, _ = tiny_pipeline
    registry.OPENED_SPLITS.clear()
    stage1_teacher = out / "teacher.dppt"  # a real checkpoint, but not the one the release was made with
    with pytest.raises(SystemExit) as exit_info:
        evaluate_release.main(["--release", str(out / "release_k0"), "--output", str(tmp_path / "eval"),
                               "--teacher", str(stage1_teacher)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher") and "sha256" in err[0]

    moved = tmp_path / "release_moved_teacher"
    shutil.copytree(out / "release_k0", moved)
    metadata = json.loads((moved / METADATA_FILE).read_text())
    metadata["teacher_file"] = "nowhere.dppt"
    (moved / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_release.main(["--release", str(moved), "--output", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a file" in err[0] and "pass --teacher" in err[0]
    assert not (tmp_path / "eval").exists() and registry.OPENED_SPLITS == [], "refused before reading private data"


@pytest.mark.parametrize("case", ["output_inside_release", "metrics_of_another_release", "metrics_and_seeds"])
def test_refusals_happen_before_any_private_data_is_read(tiny_pipeline, tmp_path, capsys, case):
    out, _ = tiny_pipeline
    release = out / "release_k3"
    argv = {
        "output_inside_release": ["--output", str(release / "eval")],
        "metrics_of_another_release": ["--output", str(tmp_path / "eval"),
                                       "--metrics", str(out / "student_k0_seed1" / "metrics.json")],
        "metrics_and_seeds": ["--output", str(tmp_path / "eval"), "--seeds", "1",
                              "--metrics", str(out / "student_k3_seed1" / "metrics.json")],
    }[case]
    expected = {"output_inside_release": "must never write into a release",
                "metrics_of_another_release": "trained on another release",
                "metrics_and_seeds": "not both"}[case]
    registry.OPENED_SPLITS.clear()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_release.main(["--release", str(release), *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert registry.OPENED_SPLITS == [] and not (release / "eval").exists()


def test_seeds_train_the_student_that_train_student_trains(tiny_pipeline, tiny_config, tmp_path):
    """``--seeds`` trains students here with the student stage's trainer and recipe: the pipeline's student settings
    and seed give exactly the accuracy its ``train_student`` run reported (same trainer, same seed, same device)."""
    out, _ = tiny_pipeline
    student = tiny_config["student"]
    recipe = ["--model", student["model"], "--epochs", str(student["epochs"]), "--batch_size",
              str(student["batch_size"]), "--lr", str(student["lr"]), "--T", str(student["T"])]
    result = evaluate_release.run(["--release", str(out / "release_k3"), "--output", str(tmp_path / "eval"),
                                   "--device", "cpu", "--max_synthetic", "100", "--max_private", "300",
                                   "--seeds", str(student["seeds"][0]), *recipe])
    metrics = json.loads((out / f"student_k3_seed{student['seeds'][0]}" / "metrics.json").read_text())
    internal = result["card"]["internal"]
    assert [(row["k"], row["seed"]) for row in internal["student_test_acc"]] == [(3, student["seeds"][0])]
    assert internal["student_test_acc"][0]["student_test_acc"] == metrics["student_test_acc"]
    assert internal["student_test_acc_summary"]["n"] == 1 and "std" not in internal["student_test_acc_summary"]


def test_a_rerun_on_the_same_inputs_reuses_the_card_and_a_changed_input_computes_it_again(tiny_pipeline, tmp_path,
                                                                                           capsys):
    """Like a stage, an evaluation whose card exists for the same release, teacher, students and settings is not
    computed again (no private split is opened); another setting, or a student's changed result, computes it."""
    out, _ = tiny_pipeline
    metrics = tmp_path / "metrics.json"
    shutil.copy(out / "student_k3_seed1" / "metrics.json", metrics)
    argv = ["--release", str(out / "release_k3"), "--output", str(tmp_path / "eval"), "--device", "cpu",
            "--metrics", str(metrics), "--max_synthetic", "100", "--max_private", "300"]
    first = evaluate_release.run(argv)
    written = _snapshot(tmp_path / "eval")
    capsys.readouterr()

    registry.OPENED_SPLITS.clear()
    again = evaluate_release.run(argv)
    assert registry.OPENED_SPLITS == [], "a reused card reads no private data"
    assert "already complete" in capsys.readouterr().out
    assert again["card"] == first["card"] and again["obfuscated"] == first["obfuscated"]
    assert {name: digest for name, digest in _snapshot(tmp_path / "eval").items() if not name.endswith(".log")} == \
        {name: digest for name, digest in written.items() if not name.endswith(".log")}

    student = json.loads(metrics.read_text())
    for change in ("student", "setting", "sampling lists"):
        if change == "student":  # the same file, another result (the student trained again)
            metrics.write_text(json.dumps({**student, "student_test_acc": student["student_test_acc"] / 2}))
        elif change == "setting":  # another cap on the private images
            argv[-1] = "200"
        else:  # the public initialization rebuilt from another folder of lists
            argv += ["--sampling_dir", str(shutil.copytree(Path(registry.__file__).parent / "Random_Sampling_List",
                                                           tmp_path / "lists"))]
        registry.OPENED_SPLITS.clear()
        result = evaluate_release.run(argv)
        assert registry.OPENED_SPLITS, change
        assert "already complete" not in capsys.readouterr().out, change
        assert result["card"]["internal"]["student_test_acc"][0]["student_test_acc"] == student["student_test_acc"] / 2


def test_a_sets_figures_are_computed_once_per_process_and_are_the_same_numbers(tiny_pipeline, tmp_path, monkeypatch):
    """A pipeline's cards share what depends only on the sets and the teacher: the private references' features and
    nearest neighbours; a k = 0 release is its own regenerated public initialization. The card is the same."""
    from evaluation import release as evaluation

    out, _ = tiny_pipeline
    calls = {"features": 0, "nearest": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(evaluation, "penultimate_features", counted("features", evaluation.penultimate_features))
    monkeypatch.setattr(evaluation, "nn_report", counted("nearest", evaluation.nn_report))
    digested = []
    original_digest = evaluation._content_digest
    monkeypatch.setattr(evaluation, "_content_digest",
                        lambda images: digested.append(images) or original_digest(images))

    def card(k: int, folder: str) -> dict:
        return evaluation.evaluate_release(EvaluationConfig(
            release=str(out / f"release_k{k}"), output=str(tmp_path / folder), device="cpu", max_synthetic=100,
            max_private=300))["card"]["internal"]

    evaluation._COMPUTED.kept.clear()
    card(0, "k0")
    assert calls == {"features": 3, "nearest": 2}, "k = 0: the public initialization is the release itself"
    assert len(digested) == 6, "each set (synthetic, public init, private train and test, mean, std) hashed once"
    shared = card(3, "k3")
    assert calls == {"features": 5, "nearest": 4}, "the private train and test references come from the k = 0 card"
    evaluation._COMPUTED.kept.clear()
    alone = card(3, "k3_alone")
    assert calls == {"features": 9, "nearest": 7}
    for section in ("fidelity", "obfuscation"):
        assert shared[section] == alone[section]
