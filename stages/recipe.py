"""Recipes: the teacher's, the releases' and the student's numbers as rules of public facts.

A data owner cannot tune on their own records without spending privacy that no ledger counts, and
numbers tuned at one dataset size do not carry to another. So the recipe is a set of rules of what is
public: the training set's size N, the target epsilon, the class count and the model. It never reads
a record or an accuracy. The rules and where they come from:

- **Sample rate and steps fixed, batch grows with N, from the anchors' size N_ref = 3,610 up** (Sander
  et al. 2023, "TAN without a burn"). At a fixed sample rate q = B / N and step count S, the sigma that
  meets an epsilon depends on epsilon alone, and accuracy follows the noise of the mean step, sigma / B.
  So B = q N: a larger private set lowers the noise at the same steps. Epochs = S q are fixed too.
- **Below N_ref the batch shrinks like sqrt(N), not N**: B = q sqrt(N N_ref). At q N a small set's
  batch is so small that sigma / B drowns the step; the best batch at 1,000 to 2,000 records stayed
  near 270 to 570 (validation grid), and q sqrt(N N_ref) beat q N on two fresh validation parts at
  about 1,000 and 2,000 records by 2 to 8 points (docs/recipes.md). Fewer steps, at a larger rate.
- **Below N_ref the learning rate shrinks with N at small epsilon and with the batch at large**:
  lr = lr_ref (N / N_ref)^p, p = 1 at epsilon 1 (the grid's best lr at 982, 1,308 and 2,019 records; lr 2
  at N = 982, epsilon 1 ended at 16%), p = 1/2 at epsilon 10, where it follows the batch (Goyal et al.
  2017's linear scaling; it beat p = 1 on two fresh validation parts at about 1,000 records by 2.4 and
  2.8 points). Above N_ref it stays the anchors' (the clipped signal of a step, at most lr C, does not
  grow with B).
- **More budget buys more steps and a larger step** (De et al. 2022): the epochs and the learning rate
  move log-linearly in epsilon between two anchors chosen on validation splits of mnist5k's training
  records at N = 3,610 (docs/utility.md, docs/recipes.md): epsilon 1: q = 512 / 3610, 20 epochs, lr 1
  (confirmed on two fresh validation parts); epsilon 10: q = 512 / 3610, 30 epochs, lr 4; outside
  [1, 10], the nearer anchor's. (q may differ per anchor; at these two the same one won.)
- **Clipping norm 0.1, momentum 0.9** for a ScatterNet + CNN (Tramer & Boneh 2021: their MNIST
  ScatterNet + CNN used C = 0.1, momentum 0.9, batch 1,024, lr 1, 40 epochs at N = 60,000).
- **DP statistics**: the same fixed-rate rule, q = 256 / 3610, one epoch (the demo's).
- **Releases and student** (docs/utility.md): the student of the k = 0 release stopped gaining at
  16,000 public images for 10 classes (32,000 did no better), so 1,600 per class at k = 0; aligned
  releases (k > 0) add little beside it and cost far more per image: 200 per class; the student 30
  epochs (60 did no better).

delta and the image shape enter through sigma's calibration and the model's front end, not the rules.
Only models with validated anchors have a recipe; for others the numbers are the user's to give.

The rules' form is this module's; their numbers are a :class:`Recipe`. ``auto`` is the validated one
(:data:`AUTO_RECIPE`); a recipe file (YAML, configs/recipe_auto.yaml is ``auto`` written out) gives other
anchors, models or release sizes to the same rules, e.g. anchors validated on another kind of data.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.errors import DPImgSynError

AUTO = "auto"
# The teacher-config fields a recipe chooses (a value given for one of them is refused beside a recipe).
TEACHER_KEYS = ("epochs", "train_batch_size", "lr", "max_norm", "momentum", "stats_epochs", "stats_batch_size")


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A teacher validated at the recipe's reference size: its batch there sets the sample rate; below that
    size its lr scales as (N / N_ref) ** lr_power (1: with N; 0.5: with the batch, which grows like sqrt(N))."""

    epsilon: float
    batch: int
    epochs: int
    lr: float
    lr_power: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The numbers behind the rules. ``name`` is what the teacher records: ``auto``, or a file's name and hash."""

    name: str
    reference_size: int
    anchors: tuple[Anchor, ...]  # by increasing epsilon
    models: Mapping[str, Mapping[str, float]]  # model -> its max_norm and momentum
    stats_batch: int  # the DP statistics' batch at the reference size
    stats_epochs: int
    k0_per_class: int
    aligned_per_class: int
    student_epochs: int


# Chosen on validation splits of mnist5k's training records at N = 3,610 (docs/recipes.md); C and momentum
# from Tramer & Boneh 2021.
AUTO_RECIPE = Recipe(AUTO, 3610, (Anchor(1.0, 512, 20, 1.0, 1.0), Anchor(10.0, 512, 30, 4.0, 0.5)),
                     {"scatter_cnn": {"max_norm": 0.1, "momentum": 0.9}}, 256, 1, 1600, 200, 30)

# A recipe file's layout, key -> type (numbers > 0, momentum >= 0); 'anchors' is a list of _ANCHOR_KEYS mappings.
_ANCHOR_KEYS = {"epsilon": float, "batch": int, "epochs": int, "lr": float, "lr_power": float}
_FILE_KEYS = {"reference_size": int, "anchors": list, "models": dict, "statistics": dict, "releases": dict,
              "student": dict}
_SECTION_KEYS = {"statistics": {"batch": int, "epochs": int}, "releases": {"k0_per_class": int,
                                                                           "aligned_per_class": int},
                 "student": {"epochs": int}}
_MODEL_KEYS = {"max_norm": float, "momentum": float}


def _checked(mapping: Any, keys: Mapping[str, type], where: str) -> dict[str, Any]:
    """``mapping`` with exactly ``keys``, each of its type (numbers > 0, momentum >= 0): one-line errors."""
    if not isinstance(mapping, dict):
        raise DPImgSynError(f"{where} must be a mapping of {', '.join(keys)}")
    unknown, missing = sorted(set(mapping) - set(keys)), [key for key in keys if key not in mapping]
    if unknown or missing:
        raise DPImgSynError(f"{where}: " + (f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}")
                            + f" (keys: {', '.join(keys)})")
    checked = {}
    for key, kind in keys.items():
        value = mapping[key]
        if kind in (int, float):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or (kind is int and value != int(value)) or value < 0 or (value == 0 and key != "momentum")):
                raise DPImgSynError(f"{where}: {key!r} must be a positive {'whole ' if kind is int else ''}number, "
                                    f"got {value!r}")
            value = kind(value)
        elif not isinstance(value, kind):
            raise DPImgSynError(f"{where}: {key!r} must be a {'list' if kind is list else 'mapping'}, got {value!r}")
        checked[key] = value
    return checked


def read_recipe(path: str | Path) -> Recipe:
    """A recipe file: the numbers of :data:`AUTO_RECIPE`'s fields, read faithfully or refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise DPImgSynError(f"recipe {str(path)!r} is neither 'auto' nor a recipe file (example: "
                            "configs/recipe_auto.yaml)")
    text = path.read_bytes()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DPImgSynError(f"recipe file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    where = f"recipe file {path}"
    raw = _checked(raw, _FILE_KEYS, where)
    sections = {name: _checked(raw[name], keys, f"{where}, {name}") for name, keys in _SECTION_KEYS.items()}
    anchors = tuple(Anchor(**_checked(anchor, _ANCHOR_KEYS, f"{where}, anchor {index + 1}"))
                    for index, anchor in enumerate(raw["anchors"]))
    epsilons = [anchor.epsilon for anchor in anchors]
    if not anchors or epsilons != sorted(set(epsilons)):
        raise DPImgSynError(f"{where}: 'anchors' must list at least one anchor, by increasing epsilon")
    if any(anchor.batch > raw["reference_size"] for anchor in anchors) or \
            sections["statistics"]["batch"] > raw["reference_size"]:
        raise DPImgSynError(f"{where}: a batch is larger than reference_size ({raw['reference_size']})")
    if not raw["models"]:
        raise DPImgSynError(f"{where}: 'models' must name at least one model")
    models = {str(model): _checked(numbers, _MODEL_KEYS, f"{where}, model {model}")
              for model, numbers in raw["models"].items()}
    return Recipe(f"{path.name}@sha256:{hashlib.sha256(text).hexdigest()[:16]}", raw["reference_size"], anchors,
                  models, sections["statistics"]["batch"], sections["statistics"]["epochs"],
                  sections["releases"]["k0_per_class"], sections["releases"]["aligned_per_class"],
                  sections["student"]["epochs"])


def recipe_argument(text: str) -> str:
    """A ``--recipe`` value: ``auto`` or a recipe file, read and checked by :func:`read_recipe` as the flag is
    parsed, so a bad file stops the script before any data is read."""
    try:
        load_recipe(text)
    except DPImgSynError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def load_recipe(recipe: str | Recipe) -> Recipe:
    """``auto``, a recipe file's path, or a recipe already loaded."""
    if isinstance(recipe, Recipe):
        return recipe
    return AUTO_RECIPE if recipe == AUTO else read_recipe(recipe)


def _along_epsilon(recipe: Recipe, epsilon: float, value: str) -> float:
    """An anchor field at ``epsilon``: log-linear in epsilon between the anchors around it; beyond them, the
    nearer one's."""
    anchors = recipe.anchors
    if epsilon <= anchors[0].epsilon or len(anchors) == 1:
        return float(getattr(anchors[0], value))
    for low, high in zip(anchors, anchors[1:]):
        if epsilon <= high.epsilon:
            t = math.log(epsilon / low.epsilon) / math.log(high.epsilon / low.epsilon)
            return math.exp((1 - t) * math.log(getattr(low, value)) + t * math.log(getattr(high, value)))
    return float(getattr(anchors[-1], value))


def _batch(sample_rate: float, num_examples: int) -> int:
    return min(max(round(sample_rate * num_examples), 1), num_examples)


def _dp_sgd_batch(sample_rate: float, num_examples: int, reference_size: int) -> int:
    """q N from the reference size up; below it q sqrt(N N_ref): the batch shrinks like sqrt(N), not N."""
    return _batch(sample_rate * math.sqrt(max(reference_size / num_examples, 1.0)), num_examples)


def teacher_recipe(num_examples: int, target_epsilon: float, model: str,
                   recipe: str | Recipe = AUTO) -> dict[str, Any]:
    """The teacher's DP-SGD numbers and its planned DP statistics' for N ``num_examples`` at ``target_epsilon``."""
    recipe = load_recipe(recipe)
    if model not in recipe.models:
        raise DPImgSynError(f"recipe {recipe.name} has validated rules for {', '.join(recipe.models)} only, not "
                            f"{model}: give --epochs, --train_batch_size, --lr and --max_norm yourself, or use one of "
                            "those models")
    if num_examples < 1 or not target_epsilon > 0:
        raise DPImgSynError(f"recipe {recipe.name} needs N >= 1 and epsilon > 0, got N = {num_examples}, "
                            f"epsilon = {target_epsilon}")
    rate = _along_epsilon(recipe, target_epsilon, "batch") / recipe.reference_size
    below = min(num_examples / recipe.reference_size, 1.0)
    lr = _along_epsilon(recipe, target_epsilon, "lr") * below ** _along_epsilon(recipe, target_epsilon, "lr_power")
    epochs = round(_along_epsilon(recipe, target_epsilon, "epochs"))
    return {"train_batch_size": _dp_sgd_batch(rate, num_examples, recipe.reference_size), "epochs": epochs,
            "lr": float(f"{lr:.3g}"), **recipe.models[model],
            "stats_batch_size": _batch(recipe.stats_batch / recipe.reference_size, num_examples),
            "stats_epochs": recipe.stats_epochs}


def release_sizes(num_classes: int, ks: Sequence[int], recipe: str | Recipe = AUTO) -> tuple[int, ...]:
    """Images of each release, in the order of ``ks``: public images grow with the classes to tell apart."""
    recipe = load_recipe(recipe)
    return tuple((recipe.k0_per_class if k == 0 else recipe.aligned_per_class) * num_classes for k in ks)


def with_recipe(config: Any, num_examples: int, announce: bool) -> Any:
    """``config`` (a teacher config) with the recipe's numbers for its N; unchanged without a recipe.

    Runs where N (after the validation split) is known, before calibration, so the chosen numbers are
    the config's fields: recorded in the teacher's settings and matched on resumption, with the recipe by
    its name (a file by its name and content hash, never a local path). A field the recipe chooses that was
    given another value is refused rather than silently replaced.
    """
    if config.recipe is None:
        return config
    recipe = load_recipe(config.recipe)
    if config.target_epsilon is None:
        raise DPImgSynError(f"recipe {recipe.name} needs a target epsilon (--target_epsilon): its rules "
                            "depend on it")
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    given = [key for key in TEACHER_KEYS if getattr(config, key) != defaults[key]]
    if given:
        raise DPImgSynError(f"recipe {recipe.name} chooses {', '.join(given)}: leave them unset, or drop the "
                            "recipe and give every number yourself")
    numbers = teacher_recipe(num_examples, config.target_epsilon, config.model, recipe)
    if announce:
        print(f"recipe {recipe.name} for N = {num_examples}, epsilon = {config.target_epsilon:g}: batch "
              f"{numbers['train_batch_size']}, epochs {numbers['epochs']}, lr {numbers['lr']:g}, C "
              f"{numbers['max_norm']:g}, momentum {numbers['momentum']:g}; DP statistics batch "
              f"{numbers['stats_batch_size']}, epochs {numbers['stats_epochs']}", flush=True)
    return dataclasses.replace(config, recipe=recipe.name, **numbers)
