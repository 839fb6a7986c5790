"""One vocabulary: k is the alignment steps everywhere; the DP statistics' epochs and batch size have the planning
names in both scripts and the pipeline (old names kept); C of the statistics is not needed beside clip_quantile."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

import privacy
import registry
import save_dp_db_stats
import synthesize
from common.cli import content_settings
from common.errors import DPImgSynError
from stages.config import validate_config
from stages.dp_statistics import DEFAULT_MAX_NORM, apply_plan, plan_report

PIPELINE = {
    "output": "runs/x", "dataset": "mnist5k", "model": "small_cnn", "target_epsilon": 10,
    "teacher": {"epochs": 1, "train_batch_size": 64, "lr": 0.5, "max_norm": 1.0},
    "statistics": {"epochs": 1, "train_batch_size": 64},
    "synthesis": {"public_set": "photos", "num_samples": 80, "k": [0, 2]},
    "student": {"model": "small_cnn", "epochs": 1, "seeds": [1]},
}
STATS = ["--teacher", "t.dppt", "--output", "s.dppt"]


def test_synthesis_says_k_in_its_help_and_errors(tmp_path: Path):
    assert "--k 0" in synthesize.__doc__ and "--g_steps" not in synthesize.__doc__  # the alias stays a flag
    teacher = tmp_path / "teacher.dppt"
    block = privacy.privacy_block([privacy.claimed_entry("test", 1.0, 1e-5)], 1e-5)
    privacy.save_dppt(teacher, privacy.dppt_payload("teacher", registry.get_model("small_cnn", 10).state_dict(),
                                                    "small_cnn", 10, "mnist5k", block))
    with pytest.raises(DPImgSynError, match=r"^--k 2 matches statistics, .*\(or --k 0\)$"):
        synthesize.run(["--teacher", str(teacher), "--public_set", "photos", "--num_samples", "8", "--g_steps", "2",
                        "--non_private", "--device", "cpu", "--no_progress", "--output", str(tmp_path / "release")])


@pytest.mark.parametrize("names", [("--stats_epochs", "--stats_batch_size"), ("--epochs", "--train_batch_size")])
def test_statistics_epochs_and_batch_size_take_the_planning_names_and_the_old_ones(names):
    config = save_dp_db_stats.parse_config(STATS + [names[0], "3", names[1], "32"])
    assert (config.epochs, config.train_batch_size) == (3, 32)


def test_a_deviation_from_the_plan_is_named_by_the_planning_flags():
    plan = {"target_epsilon": 4.0, "statistics": {"noise_multiplier": 1.0, "epochs": 2, "train_batch_size": 64}}
    config = save_dp_db_stats.parse_config(STATS + ["--epochs", "3", "--train_batch_size", "32",
                                                    "--noise_multiplier", "1"])
    note = plan_report(plan, config, 5.0)
    assert "--stats_epochs 3 instead of the planned 2" in note and "--stats_batch_size 32 instead of" in note
    assert "--noise_multiplier" not in note


@pytest.mark.parametrize("keys", [("stats_epochs", "stats_batch_size"), ("epochs", "train_batch_size")])
def test_pipeline_statistics_take_the_planning_keys_and_the_old_ones(keys):
    raw = copy.deepcopy(PIPELINE)
    raw["statistics"] = {keys[0]: 3, keys[1]: 32}
    pipeline = validate_config(raw)
    assert (pipeline.statistics.epochs, pipeline.statistics.train_batch_size) == (3, 32)
    assert (pipeline.teacher.stats_epochs, pipeline.teacher.stats_batch_size) == (3, 32)


def test_statistics_clipping_norm_defaults_to_one_unless_a_public_quantile_replaces_it():
    plain = save_dp_db_stats.parse_config(STATS)
    assert plain.max_norm is None  # unset: the quantile, where given, is the only C
    resolved, _ = apply_plan(plain, {})
    assert resolved.max_norm == DEFAULT_MAX_NORM == 1.0
    assert content_settings(resolved)["max_norm"] == 1.0  # what earlier runs recorded
    quantile = save_dp_db_stats.parse_config(STATS + ["--public_set", "photos", "--clip_quantile", "0.5"])
    assert apply_plan(quantile, {})[0].max_norm is None
    raw = copy.deepcopy(PIPELINE)
    raw["statistics"].update(public_set="photos", clip_quantile=0.5)
    assert validate_config(raw).statistics.max_norm is None  # no statistics.max_norm needed


@pytest.mark.parametrize("extra", [["--max_norm", "2", "--clip_quantile", "0.5", "--public_set", "photos"],
                                   ["--clip_quantile", "0.5"]])
def test_clip_quantile_beside_max_norm_or_without_a_public_set_is_one_line_error(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        save_dp_db_stats.main(STATS + extra)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: clip_quantile") and "max_norm" in lines[0]
    raw = copy.deepcopy(PIPELINE)
    raw["statistics"].update(max_norm=1.0, clip_quantile=0.5, public_set="photos")
    with pytest.raises(DPImgSynError, match="without max_norm"):
        validate_config(raw)
