"""Pipeline configs: schema errors name the key; every paper row expands to Table 1's privacy settings."""
from __future__ import annotations

import copy

import pytest
import yaml

from common.errors import DPImgSynError
from stages.config import load_config, validate_config
from stages.paper import row_names

MINIMAL = {
    "output": "runs/x", "dataset": "mnist5k", "model": "small_cnn", "target_epsilon": 10,
    "teacher": {"epochs": 1, "train_batch_size": 64, "lr": 0.5, "max_norm": 1.0},
    "statistics": {"epochs": 1, "train_batch_size": 64, "max_norm": 1.0},
    "synthesis": {"public_set": "photos", "num_samples": 80, "g_steps": [0, 2]},
    "student": {"model": "small_cnn", "epochs": 1, "seeds": [1]},
}

# The paper's results-table rows (its README), in order: (dataset, epsilon, public, k_exp).
PAPER_ROWS = [
    ("mnist", 1, "tinyimagenet", 10), ("mnist", 1, "places365", 10), ("mnist", 1, "fmnist", 10),
    ("mnist", 10, "tinyimagenet", 10), ("mnist", 10, "places365", 10), ("mnist", 10, "fmnist", 10),
    ("fmnist", 1, "tinyimagenet", 1), ("fmnist", 1, "places365", 1), ("fmnist", 1, "mnist", 10),
    ("fmnist", 10, "tinyimagenet", 1), ("fmnist", 10, "places365", 1), ("fmnist", 10, "mnist", 10),
    ("celeba_hair", 1, "lsun", 1), ("celeba_hair", 1, "places365", 1),
    ("celeba_hair", 10, "lsun", 1), ("celeba_hair", 10, "places365", 1),
    ("celeba_gender", 1, "lsun", 1), ("celeba_gender", 1, "places365", 1),
    ("celeba_gender", 10, "lsun", 1), ("celeba_gender", 10, "places365", 1),
]


def test_minimal_config_gets_defaults():
    config = validate_config(copy.deepcopy(MINIMAL))
    assert config.settings.delta == 1e-5 and config.synthesis.batch_size == 80
    assert config.student.temperature == 100.0 and config.teacher.seed is None  # fresh entropy
    assert config.ks == (0, 2) and config.seeds == (1,)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(learning_rate=1), "learning_rate"),
    (lambda c: c["teacher"].update(epoch=3), "teacher.epoch"),
    (lambda c: c["teacher"].pop("lr"), "teacher.lr"),
    (lambda c: c.pop("statistics"), "statistics"),
    (lambda c: c["teacher"].update(epochs="ten"), "teacher.epochs"),
    (lambda c: c["synthesis"].update(g_steps=5), "synthesis.g_steps"),
    (lambda c: c["student"].update(augment="yes"), "student.augment"),
    (lambda c: c.update(noise_multiplier=0.5), "target_epsilon"),
])
def test_bad_config_names_the_key(mutate, key):
    config = copy.deepcopy(MINIMAL)
    mutate(config)
    with pytest.raises(DPImgSynError) as info:
        validate_config(config)
    assert key in str(info.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output: [unclosed\n")
    with pytest.raises(DPImgSynError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(DPImgSynError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path, epsilon", [("configs/demo.yaml", 10), ("configs/demo_baseline.yaml", 10),
                                           ("configs/demo_tuned.yaml", 10), ("configs/demo_eps10.yaml", 10),
                                           ("configs/demo_eps1.yaml", 1)])
def test_demo_configs_parse(path, epsilon):
    config = load_config(path)
    assert config.settings.dataset == "mnist5k" and config.synthesis.public_set == "photos"
    assert config.settings.target_epsilon == epsilon and 0 in config.ks
    assert len(config.num_samples) == len(config.ks)


def test_a_recipe_changes_its_base_only_where_it_says(tmp_path):
    """'base': the recipe's top-level keys replace the base's; in a section, only the keys it gives."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(MINIMAL))
    recipe = tmp_path / "recipes" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"base": "../base.yaml", "target_epsilon": 1, "teacher": {"lr": 2.0}}))
    config, base = load_config(recipe), load_config(tmp_path / "base.yaml")
    assert config.settings.target_epsilon == 1 and config.teacher.lr == 2.0
    assert config.teacher.epochs == base.teacher.epochs == 1 and config.teacher.max_norm == 1.0
    assert config.student == base.student and config.ks == base.ks
    assert load_config("configs/demo_eps10.yaml").student == load_config("configs/demo_tuned.yaml").student


@pytest.mark.parametrize("base, message", [("self.yaml", "leads back to itself"), ("missing.yaml", "not found"),
                                           (3, "must be the path")])
def test_bad_base(tmp_path, base, message):
    path = tmp_path / "self.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "base": base}))
    with pytest.raises(DPImgSynError, match=message):
        load_config(path)


def test_one_image_count_per_k():
    config = copy.deepcopy(MINIMAL)
    config["synthesis"]["num_samples"] = [500, 80]
    assert validate_config(config).num_samples == (500, 80)
    assert validate_config(copy.deepcopy(MINIMAL)).num_samples == (80, 80)  # one number: every k
    for counts, message in (([500], "1 counts for 2 k values"), ([500, 0], "positive integers")):
        config["synthesis"]["num_samples"] = counts
        with pytest.raises(DPImgSynError, match=message) as info:
            validate_config(copy.deepcopy(config))
        assert "synthesis.num_samples" in str(info.value)


def test_every_paper_row_has_a_config():
    names = row_names()
    expected = [f"{d}_eps{e}_{p}" for d, e, p, _ in PAPER_ROWS] + ["cifar10_eps10_tinyimagenet"]
    assert names == expected
    for (dataset, epsilon, public, k_exp), name in zip(PAPER_ROWS, names):
        config = load_config("configs/paper.yaml", name)
        assert config.settings.dataset == dataset and config.synthesis.public_set == public
        assert config.ks == (0, k_exp)
        assert config.seeds == (111, 2023, 50173) and config.student.temperature == 100.0


def test_paper_rows_need_a_row_name():
    with pytest.raises(DPImgSynError, match="--row"):
        load_config("configs/paper.yaml")
    with pytest.raises(DPImgSynError, match="unknown row"):
        load_config("configs/paper.yaml", "mnist_eps3_nowhere")


def test_config_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(path).ks == (0, 2)


@pytest.mark.parametrize("mode", [None, "hooks"])
def test_teacher_grad_sample_mode_reaches_train_dp(mode, tmp_path, monkeypatch):
    """Unset, train_dp's own default (fused) applies; set, the pipeline passes it on."""
    import stages.pipeline

    class Stop(Exception):
        pass

    calls = []

    def first_stage_only(stage, config, nproc=1):
        calls.append(config)
        raise Stop

    monkeypatch.setattr(stages.pipeline, "run_stage", first_stage_only)
    config = copy.deepcopy(MINIMAL)
    if mode:
        config["teacher"]["grad_sample_mode"] = mode
    with pytest.raises(Stop):
        stages.pipeline.run_pipeline(validate_config(config), output=tmp_path)
    assert calls[0].grad_sample_mode == (mode or "fused")
