"""Recipe ``auto``: the teacher's, the releases' and the student's numbers as rules of public facts.

A data owner cannot tune on their own records without spending privacy that no ledger counts, and
numbers tuned at one dataset size do not carry to another. So the recipe is a set of rules of what is
public: the training set's size N, the target epsilon, the class count and the model. It never reads
a record or an accuracy. The rules and where they come from:

- **Sample rate and steps fixed, batch grows with N** (Sander et al. 2023, "TAN without a burn"). At a
  fixed sample rate q = B / N and step count S, the sigma that meets an epsilon depends on epsilon
  alone, and accuracy follows the noise of the mean step, sigma / B. So B = q N: a larger private set
  lowers the noise at the same steps. Epochs = S q are fixed too.
- **The learning rate follows the batch** below the anchors' size N_ref = 3,610: lr = lr_ref N / N_ref
  (Goyal et al. 2017's linear scaling), so the noise each step adds to the weights, lr sigma C / B, stays
  the anchors' while sigma / B grows as N shrinks; a smaller set otherwise drowns in noise (validation:
  lr 2 at N = 982, epsilon 1 ended at 16%). Above N_ref it stays the anchors' (the clipped signal of a
  step, at most lr C, does not grow with B).
- **More budget buys more steps at a smaller rate** (De et al. 2022): q, the epochs and the learning
  rate move log-linearly in epsilon between two anchors chosen on the validation split of mnist5k's
  training records at N = 3,610 (docs/utility.md): epsilon 1: q = 1024 / 3610, 20 epochs, lr 2;
  epsilon 10: q = 512 / 3610, 30 epochs, lr 4; outside [1, 10], the nearer anchor's.
- **Clipping norm 0.1, momentum 0.9** for a ScatterNet + CNN (Tramer & Boneh 2021: their MNIST
  ScatterNet + CNN used C = 0.1, momentum 0.9, batch 1,024, lr 1, 40 epochs at N = 60,000).
- **DP statistics**: the same fixed-rate rule, q = 256 / 3610, one epoch (the demo's).
- **Releases and student** (docs/utility.md): the student of the k = 0 release stopped gaining at
  16,000 public images for 10 classes (32,000 did no better), so 1,600 per class at k = 0; aligned
  releases (k > 0) add little beside it and cost far more per image: 200 per class; the student 30
  epochs (60 did no better).

delta and the image shape enter through sigma's calibration and the model's front end, not the rules.
Only models with validated anchors have a recipe; for others the numbers are the user's to give.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from common.errors import DPImgSynError

AUTO = "auto"
RECIPES = (AUTO,)
# The teacher-config fields the recipe chooses (a value given for one of them is refused beside a recipe).
TEACHER_KEYS = ("epochs", "train_batch_size", "lr", "max_norm", "momentum", "stats_epochs", "stats_batch_size")
# (epsilon, sample rate, epochs, lr) at the two anchors, chosen on mnist5k's validation split at N = 3,610.
REFERENCE_SIZE = 3610
ANCHORS = ((1.0, 1024 / REFERENCE_SIZE, 20, 2.0), (10.0, 512 / REFERENCE_SIZE, 30, 4.0))
HEAD_MODELS = {"scatter_cnn": {"max_norm": 0.1, "momentum": 0.9}}  # Tramer & Boneh 2021
STATS_SAMPLE_RATE, STATS_EPOCHS = 256 / REFERENCE_SIZE, 1
K0_PER_CLASS, ALIGNED_PER_CLASS, STUDENT_EPOCHS = 1600, 200, 30


def _between_anchors(epsilon: float, low: float, high: float) -> float:
    """The value at ``epsilon``, log-linear in epsilon from ``low`` (epsilon 1) to ``high`` (epsilon 10)."""
    (eps_low, *_), (eps_high, *_) = ANCHORS
    t = min(max(math.log(epsilon / eps_low) / math.log(eps_high / eps_low), 0.0), 1.0)
    return math.exp((1 - t) * math.log(low) + t * math.log(high))


def _batch(sample_rate: float, num_examples: int) -> int:
    return min(max(round(sample_rate * num_examples), 1), num_examples)


def teacher_recipe(num_examples: int, target_epsilon: float, model: str) -> dict[str, Any]:
    """The teacher's DP-SGD numbers and its planned DP statistics' for N ``num_examples`` at ``target_epsilon``."""
    if model not in HEAD_MODELS:
        raise DPImgSynError(f"recipe auto has validated rules for {', '.join(HEAD_MODELS)} only, not {model}: give "
                            "--epochs, --train_batch_size, --lr and --max_norm yourself, or use one of those models")
    if num_examples < 1 or not target_epsilon > 0:
        raise DPImgSynError(f"recipe auto needs N >= 1 and epsilon > 0, got N = {num_examples}, "
                            f"epsilon = {target_epsilon}")
    rate, epochs, lr = (_between_anchors(target_epsilon, low, high) for low, high in zip(*(a[1:] for a in ANCHORS)))
    lr *= min(num_examples / REFERENCE_SIZE, 1.0)
    return {"train_batch_size": _batch(rate, num_examples), "epochs": round(epochs), "lr": float(f"{lr:.3g}"),
            **HEAD_MODELS[model], "stats_batch_size": _batch(STATS_SAMPLE_RATE, num_examples),
            "stats_epochs": STATS_EPOCHS}


def release_sizes(num_classes: int, ks: Sequence[int]) -> tuple[int, ...]:
    """Images of each release, in the order of ``ks``: public images grow with the classes to tell apart."""
    return tuple((K0_PER_CLASS if k == 0 else ALIGNED_PER_CLASS) * num_classes for k in ks)


def with_recipe(config: Any, num_examples: int, announce: bool) -> Any:
    """``config`` (a teacher config) with the recipe's numbers for its N; unchanged without a recipe.

    Runs where N (after the validation split) is known, before calibration, so the chosen numbers are
    the config's fields: recorded in the teacher's settings and matched on resumption. A field the
    recipe chooses that was given another value is refused rather than silently replaced.
    """
    if config.recipe is None:
        return config
    if config.target_epsilon is None:
        raise DPImgSynError(f"recipe {config.recipe} needs a target epsilon (--target_epsilon): its rules "
                            "depend on it")
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    given = [key for key in TEACHER_KEYS if getattr(config, key) != defaults[key]]
    if given:
        raise DPImgSynError(f"recipe {config.recipe} chooses {', '.join(given)}: leave them unset, or drop the "
                            "recipe and give every number yourself")
    numbers = teacher_recipe(num_examples, config.target_epsilon, config.model)
    if announce:
        print(f"recipe {config.recipe} for N = {num_examples}, epsilon = {config.target_epsilon:g}: batch "
              f"{numbers['train_batch_size']}, epochs {numbers['epochs']}, lr {numbers['lr']:g}, C "
              f"{numbers['max_norm']:g}, momentum {numbers['momentum']:g}; DP statistics batch "
              f"{numbers['stats_batch_size']}, epochs {numbers['stats_epochs']}", flush=True)
    return dataclasses.replace(config, **numbers)
