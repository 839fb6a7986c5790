"""Paper rows: one compact entry per results-table row, expanded with Table 1's settings."""
from __future__ import annotations

from pathlib import Path

import privacy
from engine.config import read_yaml
from errors import DPImgSynError

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
    presets = privacy.load_presets()
    if entry["preset"] not in presets:
        raise DPImgSynError(f"{path}: row {row!r} names unknown preset {entry['preset']!r}")
    preset = presets[entry["preset"]]
    defaults = paper.get("defaults", {})
    return {
        "output": f"{defaults.get('output_root', 'runs/paper')}/{row}",
        "dataset": preset["dataset"], "model": preset["model"],
        "delta": defaults.get("delta", 1e-5), "accountant": defaults.get("accountant", "prv"),
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
