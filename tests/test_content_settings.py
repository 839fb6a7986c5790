"""What makes a finished output "the same": every field of a stage's config but those marked run-only."""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import typing

import pytest

import privacy
from common.cli import content_settings
from common.errors import DPImgSynError
from stages.dp_statistics import StatisticsConfig
from stages.student import StudentConfig
from stages.synthesis import SynthesisConfig
from stages.teacher import TeacherConfig, train_teacher

# The fields that do not make a stage's output what it is, each for a reason given where it is declared; every
# other field is recorded, so a new field is left out only when it is added here on purpose.
RUN_OPTIONS = {"device", "data_root", "download", "progress", "output"}  # where and how the stage runs
VIEW = {"image_size", "channels"}  # the teacher records the view it resolves; later stages take their input's
RUN_ONLY = {
    TeacherConfig: RUN_OPTIONS | VIEW | {"suffix", "seed", "max_physical_batch_size"},
    StatisticsConfig: RUN_OPTIONS | VIEW | {"teacher", "sha256", "dataset", "sampling_dir", "seed", "report_bias"},
    SynthesisConfig: RUN_OPTIONS | VIEW | {"teacher", "sha256", "dataset", "sampling_dir", "precision"},
    StudentConfig: RUN_OPTIONS | VIEW | {"release", "precision"},
}
REQUIRED = {StatisticsConfig: {"teacher": "t.dppt", "output": "s.dppt", "public_set": "photos"},  # clip_quantile's
            SynthesisConfig: {"teacher": "s.dppt", "public_set": "photos", "output": "release"},
            StudentConfig: {"release": ("release",), "output": "student"}}


def valid(field: dataclasses.Field, value: object) -> bool:
    parse = field.metadata.get("parse")
    try:
        parse is None or parse(value if isinstance(value, str) else repr(value))
    except argparse.ArgumentTypeError:
        return False
    return True


def other_value(cls: type, field: dataclasses.Field, value: object) -> object:
    """A valid value of ``field`` other than ``value``."""
    if field.metadata.get("choices"):
        return next(choice for choice in field.metadata["choices"] if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return next(other for other in (value + 1, value / 2, 0.5) if type(other) is type(value) and other != value
                    and valid(field, other))
    if isinstance(value, tuple):
        return (*value, "other")
    if isinstance(value, str):
        return value + "_other"
    kinds = typing.get_args(typing.get_type_hints(cls)[field.name])  # None: a value of the field's type
    return next(example for example in (2, 0.5, "photos", "auto") if type(example) in kinds and valid(field, example))


@pytest.mark.parametrize("cls", list(RUN_ONLY), ids=lambda cls: cls.__name__)
def test_every_field_changes_the_settings_unless_marked_run_only(cls):
    marked = {field.name for field in dataclasses.fields(cls) if field.metadata.get("run_only")}
    assert marked == RUN_ONLY[cls]
    base = cls(**REQUIRED.get(cls, {}))
    recorded = content_settings(base)
    assert set(recorded) == {field.name for field in dataclasses.fields(cls)} - marked
    for field in dataclasses.fields(cls):
        value = other_value(cls, field, getattr(base, field.name))
        assert value != getattr(base, field.name) and valid(field, value), field.name
        changed = content_settings(dataclasses.replace(base, **{field.name: value}))
        assert (changed != recorded) == (field.name not in marked), field.name


def test_finished_teacher_rerun_with_other_momentum_is_refused(tiny_pipeline, tmp_path):
    teacher = tmp_path / "teacher.dppt"
    shutil.copy(tiny_pipeline[0] / "teacher.dppt", teacher)
    recorded = privacy.load_dppt(teacher)["settings"]
    names = {field.name for field in dataclasses.fields(TeacherConfig)}
    config = TeacherConfig(**{name: value for name, value in recorded.items() if name in names}, device="cpu",
                           progress=False, output=str(teacher))
    before = teacher.read_bytes()
    with pytest.raises(DPImgSynError, match=r"exists with different settings \(momentum\);"):
        train_teacher(dataclasses.replace(config, momentum=0.0))
    assert teacher.read_bytes() == before


def test_a_release_rerun_with_another_sampling_list_of_the_same_name_is_refused(tiny_pipeline, tmp_path, capsys):
    """--sampling_dir only says where lists are kept; a list of the same name holding other public images would
    make other images, so the release records the list's content."""
    import numpy as np

    import synthesize

    out, _ = tiny_pipeline
    lists = tmp_path / "lists"
    flags = ["--teacher", str(out / "statistics.dppt"), "--public_set", "photos", "--num_samples", "6", "--k", "0",
             "--batch_size", "6", "--output", str(tmp_path / "release"), "--no_progress", "--device", "cpu"]
    synthesize.run([*flags, "--sampling_dir", str(lists)])
    (name,) = [path.name for path in lists.iterdir()]
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / name, np.load(lists / name)[::-1].copy())
    with pytest.raises(DPImgSynError, match=r"exists with different settings \(settings\.sampling_sha256:"):
        synthesize.run([*flags, "--sampling_dir", str(other)])
