"""Stage 1: the teacher `.dppt` and kill-and-resume of DP-SGD."""
from __future__ import annotations

import pytest
import torch

import engine.teacher
import privacy
import train_dp



def flags(epochs: int = 2) -> list[str]:
    return ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", str(epochs), "--train_batch_size", "1000",
            "--lr", "1", "--noise_multiplier", "1.0", "--device", "cpu", "--no_progress", "--seed", "3"]



class Killed(Exception):
    pass


def test_teacher_checkpoint_and_resume(tmp_path, monkeypatch):
    clean = train_dp.run(flags() + ["--output", str(tmp_path / "clean")])
    assert clean.name == "clean.dppt"
    payload = torch.load(clean, weights_only=True)
    ledger = payload["privacy"]["ledger"]
    assert ledger[0]["steps"] == 2 * 4 and ledger[0]["sample_rate"] == pytest.approx(1000 / 4000)
    assert payload["privacy"]["epsilon"] == pytest.approx(
        privacy.compute_epsilon(privacy.ledger_mechanisms(ledger), 1e-5), rel=1e-6)
    assert not any(key.startswith("_module.") for key in payload["model"])
    assert payload["test_acc"] > 0.3  # 8 noisy steps; chance is 0.1

    # Kill during the second epoch's evaluation: epoch 1 is checkpointed, epoch 2 is not.
    calls = {"n": 0}
    original = engine.teacher.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.teacher, "evaluate", dying_evaluate)
    with pytest.raises(Killed):
        train_dp.run(flags() + ["--output", str(tmp_path / "resumed.dppt")])
    assert (tmp_path / "resumed.dppt.resume").exists() and not (tmp_path / "resumed.dppt").exists()
    monkeypatch.setattr(engine.teacher, "evaluate", original)
    resumed = torch.load(train_dp.run(flags() + ["--output", str(tmp_path / "resumed.dppt")]), weights_only=True)
    assert resumed["privacy"]["ledger"][0]["steps"] == ledger[0]["steps"]
    assert resumed["privacy"]["epsilon"] == payload["privacy"]["epsilon"]
    for name, tensor in payload["model"].items():  # same seed: bit-identical to the uninterrupted run
        assert torch.equal(tensor, resumed["model"][name]), name
    assert not (tmp_path / "resumed.dppt.resume").exists()


def test_rerun_of_finished_teacher_is_a_no_op(tmp_path):
    path = train_dp.run(flags(1) + ["--output", str(tmp_path / "t.dppt")])
    before = path.read_bytes()
    assert train_dp.run(flags(1) + ["--output", str(tmp_path / "t.dppt")]) == path
    assert path.read_bytes() == before


def test_target_epsilon_calibrates_the_whole_pipeline(tmp_path):
    path = train_dp.run(flags(1) + ["--target_epsilon", "4", "--stats_epochs", "1",
                                                        "--stats_batch_size", "250", "--output", str(tmp_path / "c")])
    payload = privacy.load_dppt(path)
    sigma = payload["settings"]["noise_multiplier"]
    planned = [(sigma, 1000 / 4000, 4), (sigma, 250 / 4000, 16)]
    assert privacy.compute_epsilon(planned, 1e-5) <= 4.0 + 1e-6
    assert privacy.compute_epsilon([(sigma * 0.99, q, s) for _, q, s in planned], 1e-5) > 4.0
