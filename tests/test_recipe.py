"""Recipes (auto and recipe files): the teacher's, the releases' and the student's numbers as rules of public facts."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import yaml

import privacy
import registry
import train_dp
from common.errors import DPImgSynError
from privacy.sampling import steps_per_epoch
from stages.config import load_config, validate_config
from stages.recipe import AUTO, AUTO_RECIPE, load_recipe, read_recipe, release_sizes, teacher_recipe, with_recipe
from stages.teacher import TeacherConfig
from test_stage_options import few_digits  # noqa: F401 (a fixture)

SIZES = (1000, 2000, 3610, 60000)


def test_the_rule_is_a_pure_function_of_public_facts(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the rule read a dataset")

    monkeypatch.setattr(registry, "get_dataset", no_data)
    assert teacher_recipe(3610, 1, "scatter_cnn") == teacher_recipe(3610, 1.0, "scatter_cnn")
    # At the size they were chosen at, the anchors are the validated teachers (docs/recipes.md).
    assert teacher_recipe(3610, 1, "scatter_cnn") == {
        "train_batch_size": 512, "epochs": 20, "lr": 1.0, "max_norm": 0.1, "momentum": 0.9,
        "stats_batch_size": 256, "stats_epochs": 1}
    ten = teacher_recipe(3610, 10, "scatter_cnn")
    assert (ten["train_batch_size"], ten["epochs"], ten["lr"]) == (512, 30, 4.0)
    assert teacher_recipe(3610, 100, "scatter_cnn") == ten  # outside the anchors: the nearer one's
    assert release_sizes(10, (0, 20)) == (16000, 2000) and release_sizes(2, (0,)) == (3200,)


@pytest.mark.parametrize("epsilon", [1, 2, 4, 10])
def test_the_batch_grows_with_n_at_a_fixed_sample_rate_above_the_reference_size_and_like_its_root_below(epsilon):
    rules = [teacher_recipe(n, epsilon, "scatter_cnn") for n in SIZES]
    batches = [rule["train_batch_size"] for rule in rules]
    assert batches == sorted(batches) and len({(rule["max_norm"], rule["epochs"]) for rule in rules}) == 1
    # From the reference size up, q and S fixed (TAN): sigma depends on epsilon alone, sigma / B falls as N grows.
    reference, large = rules[2], rules[3]
    assert large["train_batch_size"] / SIZES[3] == pytest.approx(reference["train_batch_size"] / SIZES[2], rel=2e-3)
    assert steps_per_epoch(SIZES[3], large["train_batch_size"]) == steps_per_epoch(SIZES[2], reference["train_batch_size"])
    sigmas = [privacy.calibrate_noise_multiplier(epsilon, 1e-5, [privacy.poisson_plan(
        n, rule["train_batch_size"], rule["epochs"])], "rdp") for n, rule in zip(SIZES[2:], rules[2:])]
    assert max(sigmas) / min(sigmas) < 1.01
    # Below it the batch shrinks like sqrt(N), not N (validated on fresh validation parts: docs/recipes.md).
    for n, rule in zip(SIZES[:2], rules[:2]):
        assert rule["train_batch_size"] == pytest.approx(reference["train_batch_size"] * (n / SIZES[2]) ** 0.5, abs=1)
    # Up to the reference size the learning rate follows N at epsilon 1 and the batch at epsilon 10 (fresh
    # validation parts, docs/recipes.md), a power of N between; above it, the anchors'.
    lrs = [rule["lr"] for rule in rules]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == teacher_recipe(3610, epsilon, "scatter_cnn")["lr"]
    power = math.log(lrs[0] / lrs[2]) / math.log(SIZES[0] / SIZES[2])
    assert power == pytest.approx({1: 1.0, 10: 0.5}.get(epsilon, power), abs=0.01) and 0.5 - 0.01 < power < 1.01


def test_more_budget_buys_more_steps_and_a_larger_step():
    rules = [teacher_recipe(3610, epsilon, "scatter_cnn") for epsilon in (0.5, 1, 2, 4, 10)]
    steps = [rule["epochs"] * steps_per_epoch(3610, rule["train_batch_size"]) for rule in rules]
    assert steps == sorted(steps) and steps[1] < steps[2] < steps[3] < steps[4]
    lrs = [rule["lr"] for rule in rules]
    assert lrs == sorted(lrs) and lrs[1] < lrs[2] < lrs[3] < lrs[4]
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
    assert (chosen["train_batch_size"], chosen["epochs"], chosen["stats_batch_size"]) == (12, 20, 1)
    assert "recipe auto for N = 12, epsilon = 1: batch 12, epochs 20, lr 0.00332, C 0.1, momentum 0.9; DP statistics " \
           "batch 1, epochs 1" in capsys.readouterr().out
    payload = privacy.load_dppt(path)
    assert payload["settings"]["recipe"] == "auto"
    assert {key: payload["settings"][key] for key in chosen} == chosen
    assert payload["plan"]["statistics"]["epochs"] == 1 and payload["plan"]["statistics"]["train_batch_size"] == 1
    (entry,) = payload["privacy"]["ledger"]
    assert entry["sample_rate"] == pytest.approx(12 / 12) and entry["steps"] == 20 * 1
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


def test_the_demo_is_the_tuned_demo_with_the_recipe():
    """The demo runs recipe auto; the numbers it replaced stay in demo_tuned.yaml, the base of demo_eps1/10."""
    auto, tuned = load_config("configs/demo.yaml"), load_config("configs/demo_tuned.yaml")
    assert auto.teacher.recipe == "auto" and tuned.teacher.recipe is None
    assert auto.ks == tuned.ks == (0, 10) and auto.num_samples == (16000, 2000) and not auto.together
    assert replace(auto.synthesis, num_samples=0) == replace(tuned.synthesis, num_samples=0)
    assert math.isclose(auto.settings.target_epsilon, tuned.settings.target_epsilon)


RECIPE_FILE = {"reference_size": 1000,
               "anchors": [{"epsilon": 1, "batch": 100, "epochs": 5, "lr": 0.5, "lr_power": 1},
                           {"epsilon": 4, "batch": 50, "epochs": 10, "lr": 2.0, "lr_power": 1},
                           {"epsilon": 16, "batch": 50, "epochs": 20, "lr": 2.0, "lr_power": 0.25}],
               "models": {"scatter_cnn": {"max_norm": 0.5, "momentum": 0}}, "statistics": {"batch": 20, "epochs": 2},
               "releases": {"k0_per_class": 7, "aligned_per_class": 3}, "student": {"epochs": 4}}


def write_recipe(folder, content=None, name="mine.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(content or RECIPE_FILE))
    return path


def test_the_shipped_recipe_file_is_recipe_auto_written_out():
    """configs/recipe_auto.yaml is the example users copy: it must say exactly what auto does."""
    shipped = read_recipe("configs/recipe_auto.yaml")
    assert shipped.name.startswith("recipe_auto.yaml@sha256:") and replace(shipped, name=AUTO) == AUTO_RECIPE


def test_a_recipe_file_gives_the_same_rules_other_numbers(tmp_path):
    recipe = read_recipe(write_recipe(tmp_path))
    # At an anchor its numbers; batch and statistics batch at the reference rate; lr grows with N up to the reference.
    assert teacher_recipe(2000, 4, "scatter_cnn", recipe) == {
        "train_batch_size": 100, "epochs": 10, "lr": 2.0, "max_norm": 0.5, "momentum": 0.0,
        "stats_batch_size": 40, "stats_epochs": 2}
    assert teacher_recipe(500, 4, "scatter_cnn", recipe)["lr"] == 1.0
    assert teacher_recipe(625, 16, "scatter_cnn", recipe)["lr"] == pytest.approx(2.0 * 0.625 ** 0.25, rel=1e-3)
    # Between anchors log-linear in epsilon (the segment around it), beyond them the nearer anchor's.
    assert teacher_recipe(1000, 2, "scatter_cnn", recipe)["lr"] == pytest.approx(1.0)
    assert teacher_recipe(1000, 8, "scatter_cnn", recipe)["epochs"] == round(10 * 2 ** 0.5)
    assert teacher_recipe(1000, 0.5, "scatter_cnn", recipe) == teacher_recipe(1000, 1, "scatter_cnn", recipe)
    assert teacher_recipe(1000, 99, "scatter_cnn", recipe) == teacher_recipe(1000, 16, "scatter_cnn", recipe)
    assert release_sizes(4, (0, 5), recipe) == (28, 12)
    with pytest.raises(DPImgSynError, match=r"recipe mine.yaml@sha256:\w+ has validated rules for scatter_cnn"):
        teacher_recipe(1000, 1, "small_cnn", recipe)


def test_the_teacher_records_a_recipe_file_by_name_and_content_never_its_path(tmp_path):
    path = write_recipe(tmp_path)
    config = TeacherConfig(dataset="mnist5k", model="scatter_cnn", recipe=str(path), target_epsilon=4.0)
    chosen = with_recipe(config, 1000, False)
    assert chosen.lr == 2.0 and chosen.train_batch_size == 50
    assert chosen.recipe.startswith("mine.yaml@sha256:") and str(tmp_path) not in chosen.recipe
    assert with_recipe(config, 1000, False).recipe == chosen.recipe  # a rerun matches the recorded settings
    write_recipe(tmp_path, {**RECIPE_FILE, "student": {"epochs": 5}})
    assert with_recipe(config, 1000, False).recipe != chosen.recipe  # an edited file is another recipe


@pytest.mark.parametrize("change, said", [
    ({"lr_scale": 2}, "unknown key 'lr_scale'"),
    ({"student": {}}, "student: missing 'epochs'"),
    ({"anchors": [{"epsilon": 1, "batch": 10, "epochs": 5, "lr": -1, "lr_power": 1}]},
     "anchor 1: 'lr' must be a positive number"),
    ({"anchors": [{"epsilon": 1, "batch": 10.5, "epochs": 5, "lr": 1, "lr_power": 1}]},
     "'batch' must be a positive whole number"),
    ({"anchors": [{"epsilon": 1, "batch": 10, "epochs": 5, "lr": 1}]}, "anchor 1: missing 'lr_power'"),
    ({"anchors": [{**RECIPE_FILE["anchors"][1]}, {**RECIPE_FILE["anchors"][0]}]}, "by increasing epsilon"),
    ({"anchors": []}, "at least one anchor"),
    ({"statistics": {"batch": 2000, "epochs": 1}}, "a batch is larger than reference_size"),
    ({"models": {"scatter_cnn": {"max_norm": 0.1}}}, "model scatter_cnn: missing 'momentum'"),
    ({"models": {}}, "'models' must name at least one model"),
    ({"models": ["scatter_cnn"]}, "'models' must be a mapping"),
])
def test_a_bad_recipe_file_is_refused_in_one_line(tmp_path, change, said):
    with pytest.raises(DPImgSynError, match=said):
        read_recipe(write_recipe(tmp_path, {**RECIPE_FILE, **change}))


def test_a_recipe_that_is_not_there_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("anchors: [unclosed\n")
    with pytest.raises(DPImgSynError, match="broken.yaml is not valid YAML"):
        read_recipe(tmp_path / "broken.yaml")
    flags = ["--dataset", "mnist5k", "--model", "scatter_cnn", "--target_epsilon", "1", "--recipe"]
    with pytest.raises(SystemExit) as exit_info:
        train_dp.main([*flags, str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "is neither 'auto' nor a recipe file" in capsys.readouterr().err
    with pytest.raises(DPImgSynError, match="is neither 'auto' nor a recipe file"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit) as exit_info:  # a malformed file too, as the flag is parsed
        train_dp.main([*flags, str(tmp_path / "broken.yaml")])
    assert exit_info.value.code == 2 and "argument --recipe: recipe file" in capsys.readouterr().err


def test_a_pipeline_reads_its_recipe_file_relative_to_itself(tmp_path, tiny_config):
    (tmp_path / "recipes").mkdir()
    write_recipe(tmp_path / "recipes")
    raw = {**tiny_config, "model": "scatter_cnn", "recipe": "recipes/mine.yaml", "teacher": {"seed": 0},
           "statistics": {"public_set": "photos", "clip_quantile": 0.5},
           "synthesis": {key: value for key, value in tiny_config["synthesis"].items() if key != "num_samples"},
           "student": {key: value for key, value in tiny_config["student"].items() if key != "epochs"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    pipeline = load_config(tmp_path / "run.yaml")
    classes = registry.dataset_info(tiny_config["dataset"]).num_classes
    assert pipeline.num_samples == release_sizes(classes, pipeline.ks, read_recipe(tmp_path / "recipes" / "mine.yaml"))
    assert pipeline.student.epochs == 4 and pipeline.teacher.recipe == str(tmp_path / "recipes" / "mine.yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**raw, "teacher": {"seed": 0, "lr": 1.0}}))
    with pytest.raises(DPImgSynError, match=r"config: recipe mine.yaml@sha256:\w+ chooses 'teacher.lr'"):
        load_config(tmp_path / "run.yaml")
