"""The paper: Table 1's presets and one compact entry per results-table row, expanded with them."""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from common.errors import DPImgSynError
from common.files import read_yaml

ROW_KEYS = {"preset", "public_set", "k_exp"}


def expand_row(paper: dict, row: str | None, path: str | Path = "configs/paper.yaml") -> dict:
    """The full pipeline config of ``row``: Table 1 teacher/statistics settings + the paper's stage-3/4 settings."""
    rows = paper.get("rows") or {}
    if row is None:
        raise DPImgSynError(f"{path} holds several rows; pass --row with one of: {', '.join(rows)}")
    if row not in rows:
        raise DPImgSynError(f"unknown row {row!r} in {path}; choose one of: {', '.join(rows)}")
    entry = rows[row]
    if set(entry) != ROW_KEYS:
        raise DPImgSynError(f"{path}: row {row!r} must have exactly the keys {sorted(ROW_KEYS)}")
    presets = load_presets()
    if entry["preset"] not in presets:
        raise DPImgSynError(f"{path}: row {row!r} names unknown preset {entry['preset']!r}")
    preset = presets[entry["preset"]]
    defaults = paper.get("defaults", {})
    return {
        "output": f"{defaults.get('output_root', 'runs/paper')}/{row}",
        "dataset": preset["dataset"], "model": preset["model"],
        **{key: defaults[key] for key in ("delta", "accountant") if key in defaults},
        "noise_multiplier": preset["noise_multiplier"],
        "teacher": {"epochs": preset["epochs"], "train_batch_size": preset["train_batch_size"],
                    "lr": preset["lr"], "max_norm": preset["max_norm"]},
        "statistics": {"epochs": preset["stats_epochs"], "train_batch_size": preset["stats_batch_size"],
                       "max_norm": preset["max_norm"]},
        "synthesis": {**defaults.get("synthesis", {}), "public_set": entry["public_set"],
                      "g_steps": [0, entry["k_exp"]]},
        "student": dict(defaults.get("student", {})),
    }


def row_names(path: str | Path = "configs/paper.yaml") -> list[str]:
    """Every row of the paper config, in table order."""
    return list(read_yaml(path).get("rows", {}))


DEFAULT_PRESETS_PATH = Path(__file__).resolve().parent.parent / "configs" / "table1.yaml"

PRESET_FIELDS: dict[str, type] = {
    "dataset": str,
    "model": str,
    "epochs": int,
    "train_batch_size": int,
    "lr": float,
    "max_norm": float,
    "noise_multiplier": float,
    "stats_epochs": int,
    "stats_batch_size": int,
    "train_size": int,
    "delta": float,
    "target_epsilon": float,
    "expected_epsilon": float,
}


def _check_preset(name: str, preset) -> dict:
    if not isinstance(preset, dict):
        raise DPImgSynError(f"preset {name!r} must be a mapping of settings, got {preset!r}")
    missing = sorted(PRESET_FIELDS.keys() - preset.keys())
    unknown = sorted(preset.keys() - PRESET_FIELDS.keys())
    if missing or unknown:
        raise DPImgSynError(f"preset {name!r}: missing keys {missing}, unknown keys {unknown}; "
                            f"expected exactly {sorted(PRESET_FIELDS)}")
    checked = {}
    for key, kind in PRESET_FIELDS.items():
        value = preset[key]
        if kind is str:
            valid = isinstance(value, str) and bool(value)
        elif kind is int:
            valid = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            valid = (isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value) and value > 0)
            value = float(value) if valid else value
        if not valid:
            raise DPImgSynError(f"preset {name!r}: {key} must be a positive {kind.__name__}, got {value!r}")
        checked[key] = value
    if not 0 < checked["delta"] < 1:
        raise DPImgSynError(f"preset {name!r}: delta must be in (0, 1), got {checked['delta']!r}")
    for batch_key in ("train_batch_size", "stats_batch_size"):
        if checked[batch_key] > checked["train_size"]:
            raise DPImgSynError(f"preset {name!r}: {batch_key} exceeds train_size")
    return checked


def load_presets(path: str | Path | None = None) -> dict[str, dict]:
    """Read and validate the Table 1 presets (default: the repository's ``configs/table1.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PRESETS_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise DPImgSynError(f"cannot read presets file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise DPImgSynError(f"presets file {path} is not valid YAML ({type(error).__name__})") from None
    if not isinstance(data, dict) or not data:
        raise DPImgSynError(f"presets file {path} must map preset names to settings")
    return {str(name): _check_preset(str(name), preset) for name, preset in data.items()}


def get_preset(name: str, path: str | Path | None = None) -> dict:
    """One preset by name; an unknown name lists the available ones."""
    presets = load_presets(path)
    if name not in presets:
        raise DPImgSynError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]
