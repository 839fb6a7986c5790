"""A pipeline config: a YAML file read into the stages' own typed configs, errors naming the key.

Each section holds the settings of one stage, under the names (or the paper's aliases) of its
config's fields; the pipeline supplies what links the stages (the dataset, the artifacts' paths,
the sigma the teacher calibrated). Unknown keys are errors, so a typo never silently falls back to
a default. Everything is checked before any stage runs.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import registry
from common.cli import RunOptions, config_from_mapping, fraction, option, positive_float, probability
from common.errors import DPImgSynError
from common.files import read_yaml
from privacy.accountant import ACCOUNTANTS
from stages.dp_statistics import StatisticsConfig
from stages.paper import expand_row
from stages.recipe import AUTO, TEACHER_KEYS, load_recipe, release_sizes
from stages.student import StudentConfig
from stages.synthesis import SynthesisConfig
from stages.teacher import EVAL_SPLIT_HELP, EVAL_SPLITS, TeacherConfig
from synthesizer.export import FORMATS
from training.distill import PAPER_SEEDS

SECTIONS = ("teacher", "statistics", "synthesis", "student")
UNSET = ""  # a path the pipeline fills in once the output folder is known


@dataclass(frozen=True, kw_only=True)
class PipelineSettings(RunOptions):
    """The top level of a pipeline config: what every stage shares."""

    output: str = option(help="output folder of the run")
    dataset: str = option(help="private dataset from the registry")
    # Settings the pipeline hands to the teacher: the teacher stage's defaults (noise_multiplier has none here:
    # a pipeline gives exactly one of it and target_epsilon).
    model: str = option(TeacherConfig.model, "teacher architecture from the registry")
    delta: float = option(TeacherConfig.delta, "delta of the (epsilon, delta) guarantee", parse=probability)
    accountant: str = option(TeacherConfig.accountant, "privacy accountant", choices=tuple(ACCOUNTANTS))
    target_epsilon: float | None = option(TeacherConfig.target_epsilon, "total epsilon of both private stages "
                                          "(sigma is calibrated); a list sweeps over several, one run folder each",
                                          parse=positive_float)
    noise_multiplier: float | None = option(None, "the one sigma of both private stages", parse=positive_float)
    val_split: float = option(TeacherConfig.val_split, "expected fraction of the private training records held out "
                              "for validation (both private stages train on the rest)", parse=fraction)
    eval_split: str = option(TeacherConfig.eval_split, EVAL_SPLIT_HELP, choices=EVAL_SPLITS)
    recipe: str | None = option(TeacherConfig.recipe, "'auto' or a recipe file (relative to this config): the "
                                "teacher's and the DP statistics' numbers follow rules of N and target_epsilon, the "
                                "release sizes and the student's epochs rules of the class count (stages/recipe.py); "
                                "the keys it chooses are then refused")
    evaluate: bool = option(False, "release cards (utility, obfuscation, fidelity) at the end")
    exports: tuple[str, ...] = option((), f"export every release in these formats ({', '.join(FORMATS)}) "
                                      "to export_k<k>_<format>/")


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: its shared settings and one config per stage, paths still unset."""

    settings: PipelineSettings
    teacher: TeacherConfig
    statistics: StatisticsConfig
    synthesis: SynthesisConfig
    ks: tuple[int, ...]  # one release per k
    num_samples: tuple[int, ...]  # images of each release, in the order of ks
    student: StudentConfig
    seeds: tuple[int, ...]  # one student per release and seed
    epsilons: tuple[float | None, ...] = (None,)  # a sweep's target epsilons (None: the settings' own)
    replicates: tuple[int | None, ...] = (None,)  # whole-pipeline seeds of a sweep (None: the stages' own)
    together: bool = False  # also one student per seed on all the run's releases at once


def _int_list(section: dict, names: tuple[str, ...], where: str, default: tuple[int, ...] | None,
              minimum: int | None = None) -> tuple[int, ...]:
    """The list under the first of ``names`` in ``section`` (removed from it), checked element by element."""
    name = next((key for key in names if key in section), names[0])
    values = section.pop(name, default)
    if values is None:
        raise DPImgSynError(f"config: missing required key '{where}{name}'")
    if not isinstance(values, list | tuple) or not all(
            isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
            for value in values):
        kind = {None: "integers", 0: "non-negative integers", 1: "positive integers"}.get(minimum,
                                                                                          f"integers >= {minimum}")
        raise DPImgSynError(f"config: key '{where}{name}' must be a list of {kind}")
    return tuple(values)


def _release_sizes(synthesis: dict, releases: int) -> tuple[int, ...]:
    """A list 'num_samples' (one count per k, in the same order) taken out of ``synthesis``, whose own
    'num_samples' becomes the first count so that it is still checked; () when it is one number for every k."""
    if not isinstance(synthesis.get("num_samples"), list):
        return ()
    sizes = _int_list(synthesis, ("num_samples",), "synthesis.", None, minimum=1)
    if len(sizes) != releases:
        raise DPImgSynError(f"config: key 'synthesis.num_samples' lists {len(sizes)} counts for {releases} k values; "
                            "give one number, or one count per k")
    synthesis["num_samples"] = sizes[0]
    return sizes


# The keys a recipe chooses, per section: given beside it (under any of their names), they are refused (the
# pipeline checks before any stage).
RECIPE_KEYS = {"teacher": (TeacherConfig, TEACHER_KEYS),
               "statistics": (StatisticsConfig, ("epochs", "train_batch_size")),
               "synthesis": (SynthesisConfig, ("num_samples",)), "student": (StudentConfig, ("epochs",))}


def _refuse_recipe_keys(raw: dict, recipe: str) -> None:
    for name, (cls, keys) in RECIPE_KEYS.items():
        fields = {field.name: field for field in dataclasses.fields(cls)}
        names = [alias for key in keys for alias in (key, *fields[key].metadata.get("aliases", ()))]
        given = [key for key in names if isinstance(raw[name], dict) and key in raw[name]]
        if given:
            raise DPImgSynError(f"config: recipe {recipe} chooses '{name}.{given[0]}'; remove it, or remove 'recipe' "
                                "and give every number yourself")


def _section(raw: dict, name: str) -> dict:
    if not isinstance(raw[name], dict):
        raise DPImgSynError(f"config: {name} must be a mapping")
    return dict(raw[name])


def validate_config(raw: dict) -> Pipeline:
    """Check a config mapping against every stage's config; the result has every setting."""
    if not isinstance(raw, dict):
        raise DPImgSynError("config: top level must be a mapping")
    missing = [name for name in SECTIONS if name not in raw]
    if missing:
        raise DPImgSynError(f"config: missing section {missing[0]!r}")
    top_level = {key: value for key, value in raw.items() if key not in SECTIONS}
    replicates = _int_list(top_level, ("seeds",), "", (), minimum=0) if "seeds" in top_level else ()
    epsilons = top_level.get("target_epsilon")
    if isinstance(epsilons, list):  # a sweep: each value is checked as the one target would be
        if not epsilons:
            raise DPImgSynError("config: key 'target_epsilon' must be a number or a non-empty list of numbers")
        for value in epsilons:
            config_from_mapping(PipelineSettings, {**top_level, "target_epsilon": value})
        top_level["target_epsilon"] = epsilons[0]
    top = config_from_mapping(PipelineSettings, top_level)
    if any(fmt not in FORMATS for fmt in top.exports):
        raise DPImgSynError(f"config: key 'exports' must list formats among {', '.join(FORMATS)}, got {top.exports}")
    if (top.target_epsilon is None) == (top.noise_multiplier is None):
        raise DPImgSynError("config: give exactly one of 'target_epsilon' and 'noise_multiplier'")
    if top.eval_split == "validation" and (not top.val_split or top.evaluate):
        raise DPImgSynError("config: eval_split 'validation' needs 'val_split' > 0 and no 'evaluate' (release cards "
                            "read the test split)")
    recipe = load_recipe(top.recipe) if top.recipe else None
    if recipe:
        _refuse_recipe_keys(raw, recipe.name)
        if top.target_epsilon is None:
            raise DPImgSynError(f"config: recipe {recipe.name} needs 'target_epsilon' (its rules depend on it)")
    run = {"device": top.device, "data_root": top.data_root}
    split = {"val_split": top.val_split, "eval_split": top.eval_split}
    # With a recipe, the teacher plans the statistics' epochs and batch for its N, and stage 2 follows the plan.
    statistics = config_from_mapping(StatisticsConfig, raw["statistics"], "statistics.",
                                     required=() if top.recipe else ("epochs", "train_batch_size"), fixed={
        **run, "teacher": UNSET, "output": UNSET, "dataset": top.dataset, "noise_multiplier": None})
    if statistics.epochs is not None and not float(statistics.epochs).is_integer():
        raise DPImgSynError("config: key 'statistics.epochs' must be a whole number of epochs in a pipeline")
    planned = {} if top.recipe else {"stats_epochs": int(statistics.epochs),
                                     "stats_batch_size": statistics.train_batch_size}
    teacher = config_from_mapping(TeacherConfig, raw["teacher"], "teacher.", required=() if top.recipe else (
        "epochs", "train_batch_size", "lr", "max_norm"), fixed={
        **run, **split, "dataset": top.dataset, "model": top.model, "delta": top.delta, "accountant": top.accountant,
        "noise_multiplier": top.noise_multiplier or 1.0, "target_epsilon": top.target_epsilon, "recipe": top.recipe,
        **planned})
    synthesis_section = _section(raw, "synthesis")
    ks = _int_list(synthesis_section, ("k", "g_steps"), "synthesis.", None, minimum=0)
    if recipe:
        synthesis_section["num_samples"] = list(release_sizes(registry.dataset_info(top.dataset).num_classes, ks,
                                                              recipe))
    num_samples = _release_sizes(synthesis_section, len(ks))
    synthesis = config_from_mapping(SynthesisConfig, synthesis_section, "synthesis.", required=(
        "public_set", "num_samples"), fixed={**run, "teacher": UNSET, "output": UNSET, "k": 0,
                                               "dataset": top.dataset})
    student_section = _section(raw, "student")
    if recipe:
        student_section["epochs"] = recipe.student_epochs
    seeds = _int_list(student_section, ("seeds",), "student.", PAPER_SEEDS)
    together = student_section.pop("together", False)
    if not isinstance(together, bool):
        raise DPImgSynError("config: key 'student.together' must be true or false")
    if together and len(ks) < 2:
        raise DPImgSynError("config: 'student.together' needs at least two k values in 'synthesis.k'")
    student = config_from_mapping(StudentConfig, student_section, "student.", fixed={
        **run, **split, "release": (UNSET,), "output": UNSET, "dataset": top.dataset, "seed": 0})
    if replicates and (any(raw[name].get("seed") is not None for name in SECTIONS[:3]) or "seeds" in raw["student"]):
        raise DPImgSynError("config: give either the top-level 'seeds' (one whole run per seed) or the stages' own "
                            "seeds, not both")
    return Pipeline(top, teacher, statistics, synthesis, ks, num_samples or (synthesis.num_samples,) * len(ks), student,
                    seeds, tuple(epsilons) if isinstance(epsilons, list) else (None,), replicates or (None,), together)


def as_sweep(raw: dict, epsilons: Sequence[float] = (), seeds: Sequence[int] = ()) -> dict:
    """``raw`` swept over ``epsilons`` (its target_epsilon) and/or whole-pipeline ``seeds`` (which replace the
    stages' own seeds), so one recipe file serves both a single run and an epsilon sweep."""
    raw = copy.deepcopy(raw)
    if epsilons:
        raw.pop("noise_multiplier", None)
        raw["target_epsilon"] = list(epsilons)
    if seeds:
        raw["seeds"] = list(seeds)
        for name in SECTIONS:
            if isinstance(raw.get(name), dict):
                raw[name].pop("seeds" if name == "student" else "seed", None)
    return raw


def read_config(path: str | Path, inheriting: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping. A top-level 'base' names another config (relative to this file) that this one
    changes: its top-level keys replace the base's, and within a section only the keys it gives, so a recipe
    that differs from another in a few settings says just those."""
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw.get("recipe"), str) and raw["recipe"] != AUTO:  # a recipe file, like a base, by this file
        raw["recipe"] = str((path.parent / raw["recipe"]).resolve())
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str):
        raise DPImgSynError(f"config {path}: key 'base' must be the path of another config file")
    base_path, chain = (path.parent / base).resolve(), (*inheriting, path.resolve())
    if base_path in chain:
        raise DPImgSynError(f"config {path}: 'base' {base} leads back to itself")
    merged = read_config(base_path, chain)
    for key, value in raw.items():
        both_sections = key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_sections else value
    return merged


def load_config(path: str | Path, row: str | None = None, epsilons: Sequence[float] = (),
                seeds: Sequence[int] = ()) -> Pipeline:
    """A validated pipeline config: a plain config file, or one row of a multi-row file (paper.yaml),
    optionally swept (:func:`as_sweep`)."""
    raw = read_config(path)
    if "rows" in raw:
        raw = expand_row(raw, row, path)
    elif row is not None:
        raise DPImgSynError(f"--row given but {path} has no 'rows'")
    return validate_config(as_sweep(raw, epsilons, seeds))
