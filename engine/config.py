"""Pipeline configuration: a YAML file checked against one schema, errors naming the key.

The schema is a table (section -> key -> (type, default)); ``REQUIRED`` marks keys without
a default. Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from errors import DPImgSynError

REQUIRED = object()
NUMBER = (int, float)
# Numbers the stage CLIs require to be > 0; every other number except seeds must be >= 0. Checked
# here, before any stage runs, so that a bad student.lr fails at once and names its key.
POSITIVE = {"delta", "target_epsilon", "noise_multiplier", "teacher.epochs", "teacher.train_batch_size",
            "teacher.lr", "teacher.max_norm", "teacher.max_physical_batch_size", "statistics.epochs",
            "statistics.train_batch_size", "statistics.max_norm", "statistics.clip_quantile",
            "synthesis.num_samples", "synthesis.batch_size", "synthesis.batches_per_shard", "synthesis.lr_g",
            "student.epochs", "student.batch_size", "student.lr", "student.T"}

SCHEMA: dict[str, Any] = {
    "output": (str, REQUIRED),
    "dataset": (str, REQUIRED),
    "model": (str, "resnet18"),
    "delta": (NUMBER, 1e-5),
    "accountant": (str, "prv"),
    "target_epsilon": (NUMBER, None),
    "noise_multiplier": (NUMBER, None),
    "device": (str, "auto"),
    "data_root": (str, None),
    "evaluate": (bool, False),
    "teacher": {
        "epochs": (int, REQUIRED), "train_batch_size": (int, REQUIRED), "lr": (NUMBER, REQUIRED),
        "max_norm": (NUMBER, REQUIRED), "seed": (int, None), "max_physical_batch_size": (int, 256),
        "grad_sample_mode": (str, None), "secure_mode": (bool, False),
    },
    "statistics": {
        "epochs": (int, REQUIRED), "train_batch_size": (int, REQUIRED), "max_norm": (NUMBER, REQUIRED),
        "public_set": (str, None), "clip_quantile": (NUMBER, None), "seed": (int, None), "secure_mode": (bool, False),
    },
    "synthesis": {
        "public_set": (str, REQUIRED), "num_samples": (int, REQUIRED), "g_steps": (list, REQUIRED),
        "batch_size": (int, 80), "batches_per_shard": (int, 25), "lr_g": (NUMBER, 0.1), "bn": (NUMBER, 10.0),
        "oh": (NUMBER, 1.0), "tv": (NUMBER, 2.5e-5), "l2": (NUMBER, 3e-8), "targets": (str, "cyclic"),
        "flip": (bool, True), "seed": (int, 0),
    },
    "student": {
        "model": (str, "resnet18"), "epochs": (int, 200), "batch_size": (int, 256), "lr": (NUMBER, 0.1),
        "momentum": (NUMBER, 0.9), "weight_decay": (NUMBER, 1e-4), "T": (NUMBER, 100.0),
        "alpha": (NUMBER, 1.0), "beta": (NUMBER, 0.0), "augment": (bool, False),
        "seeds": (list, [111, 2023, 50173]),
    },
}


def _check(section: dict, schema: dict, where: str) -> dict:
    if not isinstance(section, dict):
        raise DPImgSynError(f"config: {where or 'top level'} must be a mapping")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise DPImgSynError(f"config: unknown key '{where}{unknown[0]}'; valid keys: {', '.join(schema)}")
    result: dict[str, Any] = {}
    for key, rule in schema.items():
        name = f"{where}{key}"
        if isinstance(rule, dict):
            if key not in section:
                raise DPImgSynError(f"config: missing section {name!r}")
            result[key] = _check(section[key], rule, f"{name}.")
            continue
        kind, default = rule
        if key not in section or section[key] is None:
            if default is REQUIRED:
                raise DPImgSynError(f"config: missing required key {name!r}")
            result[key] = default
            continue
        value = section[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise DPImgSynError(f"config: key {name!r} must be a {expected}, got {value!r}")
        if isinstance(value, NUMBER) and not isinstance(value, bool) and not key.endswith("seed"):
            if not math.isfinite(value) or value < 0 or (value == 0 and name in POSITIVE):
                raise DPImgSynError(f"config: key {name!r} must be a finite "
                                    f"{'positive' if name in POSITIVE else 'non-negative'} number, got {value!r}")
        result[key] = value
    return result


def validate_config(raw: dict) -> dict:
    """Check a config mapping against the schema; the result has every key, defaults filled in."""
    config = _check(raw, SCHEMA, "")
    if (config["target_epsilon"] is None) == (config["noise_multiplier"] is None):
        raise DPImgSynError("config: give exactly one of 'target_epsilon' and 'noise_multiplier'")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in config["synthesis"]["g_steps"]):
        raise DPImgSynError("config: key 'synthesis.g_steps' must be a list of non-negative integers")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in config["student"]["seeds"]):
        raise DPImgSynError("config: key 'student.seeds' must be a list of integers")
    return config


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from disk, with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DPImgSynError(f"config file {path} not found; check the --config path (examples in configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DPImgSynError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DPImgSynError(f"config {path} must be a YAML mapping")
    return raw


def load_config(path: str | Path, row: str | None = None) -> dict:
    """A validated pipeline config: a plain config file, or one row of a multi-row file (paper.yaml)."""
    raw = read_yaml(path)
    if "rows" in raw:
        from engine.paper import expand_row

        return validate_config(expand_row(raw, row, path))
    if row is not None:
        raise DPImgSynError(f"--row given but {path} has no 'rows'")
    return validate_config(raw)
