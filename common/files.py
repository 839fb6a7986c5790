"""Files every floor reads or writes: atomic writes with the user's permissions (owner-only for local
secrets: resume files, metrics), names, sha256, YAML, and the rules for an output that exists already:
a stage records the settings that determine its artifact; rerunning with the same settings continues
(or finds the work done), different settings on an existing path are a user error, and nothing
already on disk is overwritten or deleted.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from common.errors import DPImgSynError
from common.runtime import open_private, set_rng_state


CACHE_ENV = "DPIMGSYN_CACHE"


def cache_root() -> Path:
    """The data owner's local cache (kept keys of private sets, front-end features): ``$DPIMGSYN_CACHE``, else
    ``$XDG_CACHE_HOME/dpimgsyn``, else ``~/.cache/dpimgsyn``. Each user of it keeps a 0700 folder inside."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpimgsyn"
    return Path(root).expanduser()


def with_suffix_once(path: str | Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended unless it already ends with it."""
    path = Path(path)
    return path if path.name.endswith(suffix) else path.with_name(path.name + suffix)



def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints and releases can be large)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _new_temp_file(target: Path, private: bool) -> Path:
    """An empty, new file beside ``target``: 0600 when ``private``, else with the permissions of any file the
    user creates (``tempfile.mkstemp`` would make every file 0600); the rename keeps the mode.
    """
    while True:
        candidate = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            if private:
                os.close(open_private(candidate, os.O_WRONLY | os.O_EXCL))
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
            return candidate
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | os.PathLike, *, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A killed process therefore never leaves a half-written artifact under the final name. ``private``:
    a local secret (resume state, log, metrics), owner-only (0600) whatever the umask.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp_file(target, private)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_torch_save(obj: object, path: str | os.PathLike, *, private: bool = False) -> None:
    """``torch.save`` atomically, through a file handle.

    Given a path, torch names the archive inside the file after it -- here the random temp name --
    so equal content would give different bytes; through a handle the name is fixed.
    """
    with atomic_path(path, private=private) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str | os.PathLike, text: str, *, private: bool = False) -> None:
    """Write a text file atomically (owner-only with ``private``)."""
    with atomic_path(path, private=private) as tmp:
        tmp.write_text(text)


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str] | None = None, *,
                     private: bool = False) -> None:
    """A CSV of ``rows`` (columns: ``columns``, else every key in order of appearance), written atomically
    (owner-only with ``private``: per-epoch metrics are local, non-private figures)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or dict.fromkeys(key for row in rows for key in row)),
                            lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue(), private=private)


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


def resumed_state(path: Path, settings: dict[str, Any]) -> dict | None:
    """What a killed run of these ``settings`` left at ``path`` (``None`` if nothing); another run's is refused."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    require_same_settings(path, state["settings"], settings)
    return state


def resumed_history(path: Path, settings: dict[str, Any], trainer: Any) -> list[dict]:
    """Restore ``trainer`` (and the RNGs, if saved) from a killed epoch loop's state; its per-epoch history."""
    state = resumed_state(path, settings)
    if state is None:
        return []
    trainer.load_state_dict(state["trainer"])
    if "rng" in state:
        set_rng_state(state["rng"])
    return list(state["history"])
