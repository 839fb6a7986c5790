"""tune_dp.py on a tiny in-memory set: the best teacher of K runs, every candidate counted in its ledger."""
import json
import os
import stat

import pytest
import torch

import privacy
import registry
import save_dp_db_stats
import tune_dp
from common.errors import DPImgSynError
from sources.convert import RawTensors
from stages import tuning as tuning_stage
from stages.tuning import TuningConfig, tune_teacher


def bright_squares(root, split, download):
    """Gray 16 x 16 noise, brighter per class: 40 a class to train on, 10 to test on."""
    per_class = 40 if split == "train" else 10
    generator = torch.Generator().manual_seed(len(split))
    labels = torch.arange(3).repeat_interleave(per_class)
    noise = torch.randint(0, 60, (len(labels), 1, 16, 16), generator=generator)
    return RawTensors((noise + 90 * labels.view(-1, 1, 1, 1)).to(torch.uint8), labels)


SQUARES = registry._spec("tune_squares", 3, 16, True, registry.MNIST_NORM, "private", bright_squares)
QUIET = ["--device", "cpu", "--no_progress"]


@pytest.fixture
def squares(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.DATASETS, "tune_squares", SQUARES)
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text("candidates:\n  - {lr: 0.5}\n  - {lr: 2, epochs: 2, max_norm: 0.5}\n")
    return candidates


def flags(candidates, output, *extra: str) -> list[str]:
    return ["--dataset", "tune_squares", "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "32",
            "--lr", "1", "--noise_multiplier", "1.5", "--stats_epochs", "1", "--stats_batch_size", "32",
            "--val_split", "0.2", "--candidates", str(candidates), "--mean_runs", "3", "--seed", "12",
            "--output", str(output), *extra, *QUIET]


def test_the_tuned_teacher_counts_every_candidate_run(squares, tmp_path, capsys):
    tuned = tune_dp.run(flags(squares, tmp_path / "tuned"))
    said = capsys.readouterr().out
    payload = torch.load(tuned, weights_only=True)
    block = privacy.require_privacy_block(payload, "tuned teacher")
    (entry,) = block["ledger"]
    assert entry["paid_tuning"] is True and entry["mean_runs"] == 3.0 and len(entry["candidates"]) == 2
    assert [run[0]["max_norm"] for run in entry["candidates"]] == [1.0, 0.5]
    assert "2 runs drawn" in said and payload["settings"]["lr"] in (0.5, 2.0)  # seed 12 draws both candidates
    assert block["accountant"] == "rdp" and f"epsilon {block['epsilon']:.3f}" in said
    # dearer than one run of the dearer candidate (its DP-SGD and its noisy score)
    dearer = [privacy.mechanism_entry(**{key: value for key, value in item.items() if key != "stage"})
              for item in entry["candidates"][1]]
    assert block["epsilon"] > privacy.privacy_block(dearer, 1e-5, "rdp")["epsilon"]
    # K, the runs and their scores stay local: the runs' folder is gone, nothing names them in the teacher
    assert sorted(path.name for path in tmp_path.iterdir()) == ["candidates.yaml", "tuned.dppt"]
    assert "runs drawn" in said and not {"runs", "scores", "draws"} & (set(payload) | set(payload["tuning_settings"]))
    assert str(tmp_path) not in json.dumps({key: payload[key] for key in ("privacy", "tuning_settings", "settings")})
    assert payload["plan"]["total_epsilon"] > block["epsilon"]  # the planned statistics compose on top
    # stage 2 takes the tuned teacher like any other, in the same accountant
    statistics = save_dp_db_stats.run(["--teacher", str(tuned), "--dataset", "tune_squares", "--seed", "0",
                                       "--output", str(tmp_path / "statistics"), *QUIET])
    composed = privacy.require_privacy_block(torch.load(statistics, weights_only=True), "statistics")
    assert composed["accountant"] == "rdp" and composed["epsilon"] > block["epsilon"]
    assert tune_dp.run(flags(squares, tmp_path / "tuned")) == tuned  # finished: a rerun does nothing
    assert "already complete" in capsys.readouterr().out


def test_the_draws_are_kept_owner_only_until_the_selection_ends(squares, tmp_path, monkeypatch):
    """A killed selection resumes the same draws (a rerun must not redraw K); they are the owner's alone."""
    def killed(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning_stage, "train_teacher", killed)
    with pytest.raises(KeyboardInterrupt):
        tune_dp.run(flags(squares, tmp_path / "tuned"))
    draws = tmp_path / "tuned.dppt.runs" / "draws.json"
    assert stat.S_IMODE(draws.stat().st_mode) == 0o600 and stat.S_IMODE(draws.parent.stat().st_mode) == 0o700
    first = json.loads(draws.read_text())["runs"]
    with pytest.raises(KeyboardInterrupt):
        tune_dp.run(flags(squares, tmp_path / "tuned", "--seed", "5"))  # the seed is run-only: same selection
    assert json.loads(draws.read_text())["runs"] == first and len(first) >= 1


@pytest.mark.parametrize("change, message", [
    (dict(val_split=0.0), "val_split"), (dict(target_epsilon=1.0), "noise_multiplier"),
    (dict(recipe="auto"), "noise_multiplier"), (dict(mean_runs=1.0), "mean number of runs"),
    (dict(shape=-1.0), "shape"),
])
def test_bad_selections_are_user_errors(squares, tmp_path, change, message):
    config = TuningConfig(dataset="tune_squares", candidates=str(squares), output=str(tmp_path / "t"), **change)
    with pytest.raises(DPImgSynError, match=message):
        tune_teacher(config)


@pytest.mark.parametrize("text, message", [
    ("candidates: []\n", "non-empty list"), ("lr: 1\n", "non-empty list"),
    ("candidates:\n  - {dataset: mnist5k}\n", "the selection's"), ("candidates:\n  - {lr: -1}\n", "lr"),
    ("candidates:\n  - {learning_rate: 1}\n", "unknown key"), ("candidates:\n  - 3\n", "mapping"),
    (None, "candidates file .* not found"),
])
def test_bad_candidate_lists_are_user_errors(squares, tmp_path, text, message):
    if text is None:
        squares.unlink()
    else:
        squares.write_text(text)
    with pytest.raises(DPImgSynError, match=message):
        tune_teacher(TuningConfig(dataset="tune_squares", candidates=str(squares), output=str(tmp_path / "t")))
    assert set(os.listdir(tmp_path)) <= {"candidates.yaml"}


def test_no_run_drawn_releases_nothing_and_stays_so(squares, tmp_path, monkeypatch):
    """Poisson's K = 0 trains nothing; the kept draw makes a rerun say the same instead of drawing again."""
    monkeypatch.setattr(tuning_stage, "draw_run_count", lambda distribution, source: 0)
    argv = flags(squares, tmp_path / "tuned", "--distribution", "poisson")
    with pytest.raises(DPImgSynError, match="K = 0"):
        tune_dp.run(argv)
    monkeypatch.setattr(tuning_stage, "draw_run_count", lambda distribution, source: 2)
    with pytest.raises(DPImgSynError, match="K = 0"):
        tune_dp.run(argv)
    assert not (tmp_path / "tuned.dppt").exists()
