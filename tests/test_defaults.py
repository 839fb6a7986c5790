"""Every default has one owner: a named constant or a stage config's field, which the others refer to."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from stages.config import PipelineSettings
from stages.dp_statistics import UNPLANNED_DEFAULTS
from stages.teacher import TeacherConfig
from training.distill import DistillationConfig
from training.dp_sgd import DPSGDConfig

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = sorted(path for path in ROOT.rglob("*.py")
                 if not {".venv", "tests"} & set(path.relative_to(ROOT).parts[:1])
                 and not any(part.startswith(".") for part in path.relative_to(ROOT).parts))


def constants(value: object) -> list[str]:
    """'file:line' of every literal ``value`` (a string, number or tuple of them) in the product's Python."""
    found = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            literal = node.value if isinstance(node, ast.Constant) else None
            if isinstance(node, ast.Tuple) and all(isinstance(item, ast.Constant) for item in node.elts):
                literal = tuple(item.value for item in node.elts)
            if type(literal) is type(value) and literal == value:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def default(config: type, name: str) -> object:
    return next(field.default for field in dataclasses.fields(config) if field.name == name)


def test_the_default_model_and_seeds_are_written_once():
    assert PRODUCT and [place.split(":")[0] for place in constants("resnet18")] == ["registry.py"]
    assert [place.split(":")[0] for place in constants((111, 2023, 50173))] == ["training/distill.py"]


def test_the_default_accountant_and_delta_are_the_accountants_own():
    assert {place.split(":")[0] for place in constants("prv")} == {"privacy/accountant.py"}
    lines = {path.relative_to(ROOT).as_posix(): path.read_text().splitlines() for path in PRODUCT}
    delta_defaults = [place for place in constants(1e-5) if "delta" in lines[place.split(":")[0]][
        int(place.split(":")[1]) - 1].lower()]
    assert {place.split(":")[0] for place in delta_defaults} == {"privacy/accountant.py"}  # DEFAULT_DELTA


def test_the_pipeline_and_the_unplanned_statistics_take_the_teachers_defaults():
    shared = {field.name for field in dataclasses.fields(PipelineSettings)} & {
        field.name for field in dataclasses.fields(TeacherConfig)} - {"noise_multiplier", "dataset", "output"}
    # a pipeline gives its dataset, output folder and exactly one of noise_multiplier and target_epsilon
    assert {"model", "delta", "accountant", "target_epsilon", "val_split", "eval_split"} <= shared
    assert {name: default(PipelineSettings, name) for name in shared} == {
        name: default(TeacherConfig, name) for name in shared}
    assert UNPLANNED_DEFAULTS == {"noise_multiplier": default(TeacherConfig, "noise_multiplier"),
                                  "epochs": default(TeacherConfig, "stats_epochs"),
                                  "train_batch_size": default(TeacherConfig, "stats_batch_size")}


def test_the_teacher_and_the_student_flip_alike_unless_told():
    assert default(DPSGDConfig, "augment_flip") is default(DistillationConfig, "augment_flip") is False
