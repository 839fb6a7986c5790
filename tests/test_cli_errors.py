"""Bad input to the stage CLIs: one `error: ...` line on stderr, exit code 2, nothing overwritten."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import privacy
import save_dp_db_stats
import synthesize
import train_dp
import train_student

TEACHER_FLAGS = ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "256",
                 "--lr", "1", "--device", "cpu", "--no_progress"]


def run_main(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags, expected", [
    (["--dataset", "nosuchset"], "nosuchset"),
    (["--model", "nosuchnet"], "nosuchnet"),
    (["--noise_multiplier", "-1"], "noise_multiplier"),
    (["--noise_multiplier", "0"], "noise_multiplier"),
    (["--max_norm", "nan"], "max_norm"),
    (["--lr", "inf"], "lr"),
    (["--epochs", "0"], "epochs"),
    (["--train_batch_size", "-5"], "train_batch_size"),
    (["--target_epsilon", "1e-4"], "epsilon"),
    (["--preset", "nosuchpreset"], "nosuchpreset"),
])
def test_train_dp_bad_input(flags, expected, capsys, tmp_path):
    line = run_main(train_dp.main, TEACHER_FLAGS + ["--output", str(tmp_path / "t.dppt")] + flags, capsys)
    assert expected in line
    assert not (tmp_path / "t.dppt").exists()


def test_missing_data_root(capsys, tmp_path):
    line = run_main(train_dp.main, ["--dataset", "mnist", "--data_root", str(tmp_path / "nothing"),
                                    "--output", str(tmp_path / "t.dppt"), "--device", "cpu"], capsys)
    assert "MNIST" in line and "--download" in line


def test_stats_refuses_checkpoint_without_ledger(capsys, tmp_path):
    teacher = tmp_path / "noledger.dppt"
    torch.save({"format": privacy.CHECKPOINT_FORMAT, "version": 1, "stage": "teacher", "model": {},
                "architecture": "small_cnn", "num_classes": 10, "dataset": "mnist5k"}, teacher)
    line = run_main(save_dp_db_stats.main, ["--teacher", str(teacher), "--output", str(tmp_path / "s.dppt"),
                                            "--device", "cpu"], capsys)
    assert "privacy violation" in line


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    line = run_main(save_dp_db_stats.main, ["--teacher", str(tmp_path / "missing.dppt"),
                                            "--output", str(tmp_path / "s.dppt")], capsys)
    assert "missing.dppt" in line
    broken = tmp_path / "broken.dppt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    run_main(synthesize.main, ["--teacher", str(broken), "--public_set", "photos", "--output",
                               str(tmp_path / "rel")], capsys)


def test_stage_artifact_checks(tiny_pipeline, capsys, tmp_path):
    out, _ = tiny_pipeline
    line = run_main(synthesize.main, ["--teacher", str(out / "teacher.dppt"), "--public_set", "photos",
                                      "--output", str(tmp_path / "rel"), "--device", "cpu"], capsys)
    assert "save_dp_db_stats" in line
    line = run_main(synthesize.main, ["--teacher", str(out / "statistics.dppt"), "--public_set", "nosuchpublic",
                                      "--output", str(tmp_path / "rel"), "--device", "cpu"], capsys)
    assert "nosuchpublic" in line
    line = run_main(save_dp_db_stats.main, ["--teacher", str(out / "teacher.dppt"), "--dataset", "mnist",
                                            "--output", str(tmp_path / "s.dppt"), "--device", "cpu"], capsys)
    assert "mnist5k" in line
    line = run_main(train_student.main, ["--release", str(tmp_path / "norelease"), "--output",
                                         str(tmp_path / "st"), "--device", "cpu"], capsys)
    assert "norelease" in line


def test_existing_output_with_other_settings_is_kept(tiny_pipeline, capsys):
    out, _ = tiny_pipeline
    teacher = out / "teacher.dppt"
    before = teacher.read_bytes()
    line = run_main(train_dp.main, TEACHER_FLAGS + ["--noise_multiplier", "3", "--output", str(teacher)], capsys)
    assert "different settings" in line
    assert teacher.read_bytes() == before


def test_real_process_prints_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train_dp.py", "--dataset", "nosuchset", "--output",
                             str(tmp_path / "t.dppt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["train_dp.py", "save_dp_db_stats.py", "synthesize.py", "train_student.py",
                                    "run_pipeline.py", "evaluate_release.py"])
def test_help_documents_every_flag(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--output" in result.stdout and "usage" in result.stdout
