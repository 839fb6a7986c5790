"""Rules shared by every stage for existing outputs: resume the same run, never clobber another.

A stage records the settings that determine its artifact. Rerunning with the same settings
continues (or finds the work done); different settings on an existing path is a user error,
and nothing already on disk is overwritten or deleted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

import registry
from errors import DPImgSynError


def normalize_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip, so settings compare equal whether fresh or read back from disk."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def settings_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of settings whose values differ (missing on either side counts)."""
    stored, wanted = normalize_settings(stored), normalize_settings(wanted)
    return sorted(k for k in stored.keys() | wanted.keys()
                  if k not in stored or k not in wanted or not _equal(stored[k], wanted[k]))


def require_same_settings(path: str | Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise a user error naming the differing settings when ``path`` belongs to another run."""
    differing = settings_differences(stored, wanted)
    if differing:
        raise DPImgSynError(
            f"{path} exists with different settings ({', '.join(differing)}); "
            "choose another --output or delete it"
        )


def with_suffix_once(path: str | Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended unless it already ends with it."""
    path = Path(path)
    return path if path.name.endswith(suffix) else path.with_name(path.name + suffix)


def completed_dppt(output: Path, settings_key: str, settings: dict[str, Any]) -> bool:
    """True (and says so) when ``output`` is already this run's finished `.dppt`.

    An existing file written with other settings is a user error; it is never overwritten.
    """
    if not output.exists():
        return False
    from privacy import load_dppt  # privacy.checkpoint imports this module

    existing = load_dppt(output)
    require_same_settings(output, existing.get(settings_key, {}), settings)
    print(f"{output} already complete (epsilon {existing['privacy']['epsilon']:.3f}); nothing to do")
    return True


def model_from_checkpoint(checkpoint: dict, path: str | Path) -> nn.Module:
    """The checkpoint's architecture with its weights; weights that do not fit are a user error."""
    model = registry.get_model(checkpoint["architecture"], checkpoint["num_classes"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DPImgSynError(f"{path}: weights do not fit architecture {checkpoint['architecture']!r} ({first}); "
                            "the checkpoint is damaged or was edited") from None
    return model
