"""Recipe auto: the teacher's, the releases' and the student's numbers as rules of public facts."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

import privacy
import registry
import train_dp
from common.errors import DPImgSynError
from privacy.sampling import steps_per_epoch
from stages.config import load_config, validate_config
from stages.recipe import release_sizes, teacher_recipe, with_recipe
from stages.teacher import TeacherConfig
from test_stage_options import few_digits  # noqa: F401 (a fixture)

SIZES = (1000, 2000, 3610, 60000)


def test_the_rule_is_a_pure_function_of_public_facts(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the rule read a dataset")

    monkeypatch.setattr(registry, "get_dataset", no_data)
    assert teacher_recipe(3610, 1, "scatter_cnn") == teacher_recipe(3610, 1.0, "scatter_cnn")
    # At the size they were chosen at, the anchors are the demo's validated teachers (docs/utility.md).
    assert teacher_recipe(3610, 1, "scatter_cnn") == {
        "train_batch_size": 1024, "epochs": 20, "lr": 2.0, "max_norm": 0.1, "momentum": 0.9,
        "stats_batch_size": 256, "stats_epochs": 1}
    ten = teacher_recipe(3610, 10, "scatter_cnn")
    assert (ten["train_batch_size"], ten["epochs"], ten["lr"]) == (512, 30, 4.0)
    assert teacher_recipe(3610, 100, "scatter_cnn") == ten  # outside the anchors: the nearer one's
    assert release_sizes(10, (0, 20)) == (16000, 2000) and release_sizes(2, (0,)) == (3200,)


@pytest.mark.parametrize("epsilon", [1, 2, 4, 10])
def test_the_batch_grows_with_n_at_a_fixed_sample_rate_and_fixed_steps(epsilon):
    rules = [teacher_recipe(n, epsilon, "scatter_cnn") for n in SIZES]
    rates = [rule["train_batch_size"] / n for rule, n in zip(rules, SIZES)]
    steps = {rule["epochs"] * steps_per_epoch(n, rule["train_batch_size"]) for rule, n in zip(rules, SIZES)}
    assert [rule["train_batch_size"] for rule in rules] == sorted(rule["train_batch_size"] for rule in rules)
    assert max(rates) - min(rates) < 1e-3 and len(steps) == 1  # q and S fixed: sigma depends on epsilon alone
    assert len({(rule["max_norm"], rule["epochs"]) for rule in rules}) == 1
    # The learning rate follows the batch up to the anchors' N (the noise a step adds to the weights stays
    # theirs), and stays the anchors' above it.
    lrs = [rule["lr"] for rule in rules]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == teacher_recipe(3610, epsilon, "scatter_cnn")["lr"]
    assert lrs[0] / rules[0]["train_batch_size"] == pytest.approx(lrs[2] / rules[2]["train_batch_size"], rel=0.02)
    # ... so sigma is the same at every N, and the noise of the mean step, sigma / B, falls as N grows.
    sigmas = [privacy.calibrate_noise_multiplier(epsilon, 1e-5, [privacy.poisson_plan(
        n, rule["train_batch_size"], rule["epochs"])], "rdp") for n, rule in zip(SIZES[::3], rules[::3])]
    assert max(sigmas) / min(sigmas) < 1.01


def test_more_budget_buys_more_steps_at_a_smaller_rate():
    rules = [teacher_recipe(3610, epsilon, "scatter_cnn") for epsilon in (0.5, 1, 2, 4, 10)]
    steps = [rule["epochs"] * steps_per_epoch(3610, rule["train_batch_size"]) for rule in rules]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    batches = [rule["train_batch_size"] for rule in rules]
    assert batches == sorted(batches, reverse=True)


def test_what_the_rule_cannot_decide_is_refused():
    with pytest.raises(DPImgSynError, match="recipe auto has validated rules for scatter_cnn only, not small_cnn"):
        teacher_recipe(3610, 1, "small_cnn")
    with pytest.raises(DPImgSynError, match="needs a target epsilon"):
        with_recipe(TeacherConfig(dataset="mnist5k", model="scatter_cnn", recipe="auto"), 3610, False)
    config = TeacherConfig(dataset="mnist5k", model="scatter_cnn", recipe="auto", target_epsilon=1.0)
    with pytest.raises(DPImgSynError, match="recipe auto chooses lr, stats_epochs: leave them unset"):
        with_recipe(replace(config, lr=5.0, stats_epochs=3), 3610, False)
    assert with_recipe(replace(config, recipe=None), 3610, False) == replace(config, recipe=None)


@pytest.mark.parametrize("extra, said", [(["--epochs", "14"], "--recipe auto chooses --epochs: drop them"),
                                         (["--momentum", "0.9", "--lr", "1"], "chooses --lr, --momentum"),
                                         (["--preset", "mnist_eps1"], "chooses the preset numbers")])
def test_train_dp_refuses_a_number_given_beside_the_recipe(extra, said):
    """Even a flag that repeats a default is refused: the recipe would silently replace it."""
    with pytest.raises(DPImgSynError, match=said):
        train_dp.parse_config(["--dataset", "mnist5k", "--model", "scatter_cnn", "--recipe", "auto",
                               "--target_epsilon", "1", *extra])


def test_recipe_auto_numbers_become_the_teachers_recorded_settings(few_digits, tmp_path, capsys):
    """The real rule on scatter_cnn, on 12 records (few_digits): its numbers are the teacher's, as flags would be."""
    flags = ["--dataset", few_digits, "--model", "scatter_cnn", "--recipe", "auto", "--target_epsilon", "1",
             "--device", "cpu", "--no_progress", "--seed", "3", "--output", str(tmp_path / "t")]
    path = train_dp.run(flags)
    chosen = teacher_recipe(12, 1.0, "scatter_cnn")
    assert (chosen["train_batch_size"], chosen["epochs"], chosen["stats_batch_size"]) == (3, 20, 1)
    assert "recipe auto for N = 12, epsilon = 1: batch 3, epochs 20, lr 0.00665, C 0.1, momentum 0.9; DP statistics " \
           "batch 1, epochs 1" in capsys.readouterr().out
    payload = privacy.load_dppt(path)
    assert payload["settings"]["recipe"] == "auto"
    assert {key: payload["settings"][key] for key in chosen} == chosen
    assert payload["plan"]["statistics"]["epochs"] == 1 and payload["plan"]["statistics"]["train_batch_size"] == 1
    (entry,) = payload["privacy"]["ledger"]
    assert entry["sample_rate"] == pytest.approx(3 / 12) and entry["steps"] == 20 * 4
    assert payload["plan"]["total_epsilon"] <= 1.0
    # The rerun finds the same numbers for the same N: the finished teacher is reused, not retrained.
    before = path.read_bytes()
    assert train_dp.run(flags) == path and path.read_bytes() == before


def test_pipeline_key_recipe_fills_the_releases_and_student_and_leaves_the_teacher_to_its_n(tiny_config):
    raw = {**tiny_config, "model": "scatter_cnn", "recipe": "auto",
           "teacher": {"seed": 0}, "statistics": {"public_set": "photos", "clip_quantile": 0.5},
           "synthesis": {key: value for key, value in tiny_config["synthesis"].items() if key != "num_samples"},
           "student": {key: value for key, value in tiny_config["student"].items() if key != "epochs"}}
    pipeline = validate_config(raw)
    assert pipeline.teacher.recipe == "auto" and pipeline.teacher.target_epsilon == 10.0
    assert pipeline.num_samples == (16000, 2000) and pipeline.student.epochs == 30
    # The statistics' epochs and batch follow the teacher's plan, which the recipe makes for the teacher's N.
    assert pipeline.statistics.epochs is None and pipeline.statistics.train_batch_size is None
    for section, key in (("teacher", "lr"), ("statistics", "epochs"), ("statistics", "stats_batch_size"),
                         ("synthesis", "num_samples"), ("student", "epochs")):
        given = {**raw, section: {**raw[section], key: 1}}
        with pytest.raises(DPImgSynError, match=f"config: recipe auto chooses '{section}.{key}'; remove it"):
            validate_config(given)
    without_target = {key: value for key, value in raw.items() if key != "target_epsilon"}
    with pytest.raises(DPImgSynError, match="recipe auto needs 'target_epsilon'"):
        validate_config({**without_target, "noise_multiplier": 1.0})


def test_the_auto_demo_config_is_the_demo_with_the_recipe():
    auto, demo = load_config("configs/demo_auto.yaml"), load_config("configs/demo.yaml")
    assert auto.teacher.recipe == "auto" and demo.teacher.recipe is None
    assert auto.ks == (0, 20) and auto.num_samples == (16000, 2000)
    assert replace(auto.synthesis, num_samples=0) == replace(demo.synthesis, num_samples=0)
    assert math.isclose(auto.settings.target_epsilon, demo.settings.target_epsilon)
