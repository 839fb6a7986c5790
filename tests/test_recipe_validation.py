"""scripts/recipe_validation.py: fresh validation parts and a table against today's rule."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from privacy.split import split_by_content
from sources.convert import InMemoryImages

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe_validation.py"
spec = importlib.util.spec_from_file_location("recipe_validation", SCRIPT)
validation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validation)


def test_each_fold_holds_out_its_own_records_and_fold_0_is_the_pipelines_split():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(400, 1, 4, 4, generator=generator), torch.randint(0, 3, (400,), generator=generator)
    records = InMemoryImages(images, labels)
    held_out = []
    for fold in range(3):
        train, val = validation.fold_split(records, fold)
        assert len(train) + len(val) == 400 and 15 < len(val) < 70
        held_out.append({tuple(image.flatten().tolist()) for image in val.tensors[0]})
        assert not held_out[-1] & {tuple(image.flatten().tolist()) for image in train.tensors[0]}
    assert not (held_out[0] & held_out[1] or held_out[0] & held_out[2] or held_out[1] & held_out[2])
    pipeline_train, pipeline_val = split_by_content(records, validation.VAL_SPLIT)
    assert torch.equal(validation.fold_split(records, 0)[1].tensors[0], pipeline_val.tensors[0])
    # Nested subsets of fold 1's training part: about the asked size, each inside the larger.
    train, _ = validation.fold_split(records, 1)
    parts = validation.subsets(train, [100, 200, 10_000], 1)
    assert 70 < len(parts[100]) < 130 and set(parts[100].tolist()) <= set(parts[200].tolist())
    assert len(parts[10_000]) == len(train)


def test_the_table_compares_todays_rule_whichever_rule_the_runs_ran_under():
    """Runs recorded as the rule under an older anchor are grid points now; today's rule is found by its numbers."""
    def row(batch, lr, accuracy, seed, is_rule):
        return {"dataset": "mnist5k", "n": "3610", "epsilon": "1.0", "lr": str(lr), "batch": str(batch),
                "epochs": "20", "is_rule": str(is_rule), "seed": str(seed), "val_acc": str(accuracy)}
    rows = [row(1024, 2.0, 0.84, seed, True) for seed in range(3)]
    rows += [row(512, 1.0, 0.86, seed, False) for seed in range(3)] + [row(512, 0.5, 0.99, 0, False)]
    (line,) = validation.table(rows).splitlines()[2:]
    assert line.startswith("| mnist5k | 3,610 | 1 | 512, 20, 1 | 86.0 ± 0.0 | 512, 1 | 86.0 ± 0.0 | +0.0 | 3 | 3 |")
