#!/usr/bin/env python
"""Recipe auto against a small grid around it, at several training-set sizes, on validation only.

mnist5k's training records are split by content (privacy/split.py, val_split 0.1: 3,610 train, 390
validation); nested subsets of about 1,000 and 2,000 of the 3,610 are carved by the same content hash,
so a record's membership never depends on the others. At each size and epsilon the rule's teacher
(stages/recipe.py) is compared with a grid of 3 learning rates x 3 batch sizes around it (the rule is
the centre; epochs, C and the DP statistics' plan as the rule's; sigma calibrated for the whole
pipeline as the teacher stage does), 3 seeds each, by the scatter_cnn teacher's accuracy on the 390
validation records. The test split is never read. Each finished run is appended to the CSV at once, and
a rerun skips those already there. The table goes to docs/recipes.md between its validation markers.

  nice -n 10 python scripts/recipe_validation.py            # about an hour of one core
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import privacy  # noqa: E402
import registry  # noqa: E402
from common.runtime import seed_everything  # noqa: E402
from sources.convert import InMemoryImages  # noqa: E402
from privacy.split import record_fraction, split_by_content  # noqa: E402
from stages.recipe import teacher_recipe  # noqa: E402
from training.accuracy import evaluate  # noqa: E402
from training.dp_sgd import DPSGDConfig, DPSGDTrainer  # noqa: E402
from training.frontend import scoring_features, training_inputs  # noqa: E402

MODEL, DELTA, VAL_SPLIT = "scatter_cnn", privacy.DEFAULT_DELTA, 0.1
SCREEN_MARGIN = 0.02  # a point screened this far below the rule's first seed gets no other seeds
COLUMNS = ("dataset", "n", "epsilon", "lr", "batch", "epochs", "is_rule", "seed", "sigma", "val_acc", "seconds")
DOC, BEGIN, END = ROOT / "docs" / "recipes.md", "<!-- validation -->", "<!-- /validation -->"


def fold_split(train: TensorDataset, fold: int) -> tuple[TensorDataset, TensorDataset]:
    """(training, validation): validation holds the records whose content hash is in fold ``fold``'s band
    [fold x VAL_SPLIT, (fold + 1) x VAL_SPLIT); fold 0 is the pipeline's own split (privacy/split.py), a
    later fold a fresh validation part, disjoint from fold 0's, to confirm what fold 0 chose."""
    if fold == 0:
        return split_by_content(train, VAL_SPLIT)
    images, labels = train.tensors
    band = torch.tensor([int(record_fraction(image, int(label)) // VAL_SPLIT) == fold
                         for image, label in zip(images, labels)])
    return (InMemoryImages(images[~band], labels[~band]), InMemoryImages(images[band], labels[band]))


def subsets(train: TensorDataset, sizes: list[int], fold: int) -> dict[int, TensorDataset]:
    """Nested subsets of about each size: a record is in when its content hash falls low enough."""
    images, labels = train.tensors
    # The training part holds the records whose hash is outside fold's band: rescaled, uniform on [0, 1).
    low = fold * VAL_SPLIT
    fractions = [record_fraction(image, int(label)) for image, label in zip(images, labels)]
    position = torch.tensor([(value - VAL_SPLIT * (value >= low)) / (1 - VAL_SPLIT) for value in fractions])
    return {size: (torch.arange(len(images)) if size >= len(images) else
                   torch.nonzero(position < size / len(images)).flatten()) for size in sizes}


def grid(rule: dict, n: int, full: bool) -> list[tuple[float, int]]:
    """(lr, batch) around the rule's, the rule first: a cross (lr / 2, lr x 2 at the rule's batch; batch / 2,
    batch x 2 at the rule's lr), or with ``full`` all 3 learning rates x 3 batch sizes."""
    lr, batch = rule["lr"], rule["train_batch_size"]
    lrs, batches = (lr, lr / 2, lr * 2), (batch, max(batch // 2, 1), min(batch * 2, n))
    if full:
        return [(each_lr, each_batch) for each_batch in batches for each_lr in lrs]
    return [(lr, batch), *((each_lr, batch) for each_lr in lrs[1:]), *((lr, each) for each in batches[1:])]


def private_set(name: str) -> tuple[registry.DatasetSpec, InMemoryImages]:
    """The spec and the training split, in memory (a folder: set is decoded once, in its inferred view)."""
    view, _ = registry.folder_view(name, None, None)
    _, train_set, _ = registry.get_dataset(name, None, False, **view)
    if not hasattr(train_set, "tensors"):
        items = [train_set[index] for index in range(len(train_set))]
        train_set = InMemoryImages(torch.stack([image for image, _ in items]), torch.tensor([y for _, y in items]))
    return registry.dataset_info(name, **view), train_set


def run_one(spec: registry.DatasetSpec, features: TensorDataset, val_features: TensorDataset, rule: dict, lr: float,
            batch: int, sigma: float, seed: int) -> float:
    seed_everything(seed)
    head = registry.get_model(MODEL, spec.num_classes, spec.channels, spec.image_size).head
    config = DPSGDConfig(epochs=rule["epochs"], train_batch_size=batch, lr=lr, max_norm=rule["max_norm"],
                         momentum=rule["momentum"], noise_multiplier=sigma)
    trainer = DPSGDTrainer(head, features, config, torch.device("cpu"), seed)
    while trainer.epoch < config.epochs:
        trainer.train_epoch(progress=False)
    return evaluate(trainer.released_model, val_features, torch.device("cpu"))


def table(rows: list[dict]) -> str:
    """The rule of today's stages/recipe.py vs the best grid point (by mean validation accuracy over all seeds),
    per dataset, size and epsilon; a rule point not yet run leaves its row out."""
    lines = ["| data | N | epsilon | rule: batch, epochs, lr | rule (val %) | best of grid: batch, lr | best (val %) "
             "| rule - best | seeds | grid points |", "|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, dict[tuple, list[float]]] = {}
    for row in rows:
        key = (row["dataset"], int(row["n"]), float(row["epsilon"]))
        point = (int(row["batch"]), float(row["lr"]), int(row["epochs"]))
        cells.setdefault(key, {}).setdefault(point, []).append(100 * float(row["val_acc"]))
    for (dataset, n, epsilon), points in sorted(cells.items()):
        chosen = teacher_recipe(n, epsilon, MODEL)
        # The rule's point, its batch and lr matched to 1% (a point run as a multiple of an earlier rule's rounds
        # differently).
        matches = [point for point in points if point[2] == chosen["epochs"]
                   and math.isclose(point[0], chosen["train_batch_size"], rel_tol=0.01)
                   and math.isclose(point[1], chosen["lr"], rel_tol=0.01)]
        if not matches:
            continue
        rule = max(matches, key=lambda point: len(points[point]))
        # The best among the points run with every seed (the rule, and the best-screened other point).
        best = max((point for point in points if len(points[point]) == len(points[rule])),
                   key=lambda point: statistics.mean(points[point]))

        def stat(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.1f} ± {spread:.1f}"

        gap = statistics.mean(points[rule]) - statistics.mean(points[best])
        lines.append(f"| {dataset} | {n:,} | {epsilon:g} | {rule[0]}, {rule[2]}, {rule[1]:g} | {stat(points[rule])} "
                     f"| {best[0]}, {best[1]:g} | {stat(points[best])} | {gap:+.1f} | {len(points[rule])} "
                     f"| {len(points)} |")
    return "\n".join(lines)


def write_doc(rows: list[dict]) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        DOC.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{rest.partition(END)[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--dataset", default="mnist5k", help="private set (e.g. folder:PATH): its training split")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 2000, 3610])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--full_grid", action="store_true", help="3 x 3 grid instead of the cross of 5 points")
    parser.add_argument("--points", nargs="+", default=[], metavar="BATCH_FACTOR:LR_FACTOR",
                        help="instead of the grid: these multiples of the rule's batch and lr (e.g. 1:0.5 for half "
                             "the lr) beside the rule, every one with all seeds")
    parser.add_argument("--fold", type=int, default=0, choices=range(int(1 / VAL_SPLIT)),
                        help="validation band of the content hash: 0 is the pipeline's split, another a fresh one")
    parser.add_argument("--csv", default=str(ROOT / "docs" / "recipe_validation.csv"))
    parser.add_argument("--table_only", action="store_true", help="write the CSV's table into docs/recipes.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(args.csv)
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    if args.table_only:
        write_doc(rows)
        print(table(rows))
        return
    if not rows:
        with path.open("w", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writeheader()

    spec, train_set = private_set(args.dataset)
    name = registry.artifact_name(args.dataset) + (f" fold {args.fold}" if args.fold else "")
    train_set, val_set = fold_split(train_set, args.fold)
    model = registry.get_model(MODEL, spec.num_classes, spec.channels, spec.image_size)
    head, features = training_inputs(model, train_set)
    val_features = scoring_features(model, head, val_set, "cpu")
    cells = []
    for size, indices in subsets(train_set, args.sizes, args.fold).items():
        part = TensorDataset(*(tensor[indices] for tensor in features.tensors))
        cells += [(part, epsilon, teacher_recipe(len(part), epsilon, MODEL)) for epsilon in args.epsilons]
    sigmas: dict[tuple, float] = {}

    def accuracy(cell: tuple, lr: float, batch: int, seed: int) -> float:
        """The run's validation accuracy: from the CSV if it is there, else trained now and appended."""
        part, epsilon, rule = cell
        n = len(part)
        for row in rows:
            if (row["dataset"], row["n"], row["epsilon"], row["lr"], row["batch"], row["seed"]) == (
                    name, str(n), str(epsilon), str(lr), str(batch), str(seed)):
                return float(row["val_acc"])
        if (n, epsilon, batch) not in sigmas:
            plan = [privacy.poisson_plan(n, batch, rule["epochs"]),
                    privacy.poisson_plan(n, rule["stats_batch_size"], rule["stats_epochs"])]
            sigmas[n, epsilon, batch] = privacy.calibrate_noise_multiplier(epsilon, DELTA, plan, ratios=[1.0, 1.0])[0]
        sigma, started = sigmas[n, epsilon, batch], time.time()
        value = run_one(spec, part, val_features, rule, lr, batch, sigma, seed)
        is_rule = (lr, batch) == (rule["lr"], rule["train_batch_size"])  # the rule when it ran (it may change)
        row = dict(zip(COLUMNS, (name, n, epsilon, lr, batch, rule["epochs"], is_rule, seed, round(sigma, 4),
                                 round(value, 4), round(time.time() - started, 1))))
        with path.open("a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow(row)
        rows.append({key: str(item) for key, item in row.items()})
        print(row, flush=True)
        return value

    if args.points:
        factors = [tuple(map(float, point.split(":"))) for point in args.points]
        for cell in cells:
            lr, batch = cell[2]["lr"], cell[2]["train_batch_size"]
            chosen = [(float(f"{lr * lr_factor:.3g}"), min(round(batch * batch_factor), len(cell[0])))
                      for batch_factor, lr_factor in factors]
            for point in [(lr, batch), *chosen]:
                for seed in args.seeds:
                    accuracy(cell, *point, seed)
        print(table(rows))
        return
    # The rule at every size first (all seeds); then the other grid points with the first seed, a group at a
    # time (learning rates first), each group followed by the other seeds for the best point screened so far:
    # successive halving, so the rule is compared with the best at all seeds, and a cut-off run still is.
    for cell in cells:
        for seed in args.seeds:
            accuracy(cell, cell[2]["lr"], cell[2]["train_batch_size"], seed)
    others = {id(cell): grid(cell[2], len(cell[0]), args.full_grid)[1:] for cell in cells}
    for group in range(0, max(map(len, others.values())), 2):
        for cell in cells:
            screened = {point: accuracy(cell, *point, args.seeds[0]) for point in others[id(cell)][:group + 2]}
            best = max(screened, key=screened.get)
            rule_first = accuracy(cell, cell[2]["lr"], cell[2]["train_batch_size"], args.seeds[0])
            if screened[best] >= rule_first - SCREEN_MARGIN:  # else the rule is the best, by more than noise
                for seed in args.seeds[1:]:
                    accuracy(cell, *best, seed)
    print(table(rows))


if __name__ == "__main__":
    main()
