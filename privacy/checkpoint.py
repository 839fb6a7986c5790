"""The ``.dppt`` checkpoint: ``torch.save`` of plain values and tensors only.

A ``.dppt`` may be downloaded from strangers, so it must never be able to run code: writing
refuses anything but plain containers, scalars and tensors (so every file loads with
``weights_only=True``), and reading always uses ``weights_only=True``.
"""
from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from common.errors import DPImgSynError
from common.files import atomic_torch_save, require_same_settings, with_suffix_once

CHECKPOINT_FORMAT = "dpimgsyn.dppt"
CHECKPOINT_VERSION = 1
CHECKPOINT_SUFFIX = ".dppt"
STAGES = ("teacher", "statistics")
REQUIRED_KEYS = ("format", "version", "stage", "model", "architecture", "num_classes", "dataset", "privacy")

# Prefixes that training wrappers put on every state-dict key: Opacus's GradSampleModule
# ("_module.") and DistributedDataParallel ("module.").
WRAPPER_PREFIXES = ("_module.", "module.")

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """The state dict with wrapper prefixes removed, so the bare model can load it.

    A prefix is stripped only when *every* key carries it (as wrappers do), so a model that
    merely has a submodule called ``module`` keeps its keys.
    """
    stripped = OrderedDict(state_dict)
    while stripped:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in stripped)), None)
        if prefix is None:
            break
        stripped = OrderedDict((key[len(prefix):], value) for key, value in stripped.items())
    return stripped


def _first_non_plain(value, where: str) -> str | None:
    """Location and type of the first value ``weights_only`` loading would refuse, else None."""
    kind = type(value)
    if kind in _PLAIN_SCALARS or kind in (torch.Tensor, torch.nn.Parameter):
        return None
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                return f"a key of {where} ({type(key).__name__})"
            found = _first_non_plain(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if kind in (list, tuple):
        for index, item in enumerate(value):
            found = _first_non_plain(item, f"{where}[{index}]")
            if found:
                return found
        return None
    return f"{where} ({kind.__module__}.{kind.__qualname__})"


def dppt_payload(stage: str, model_state: dict, architecture: str, num_classes: int, dataset: str,
                 privacy: dict, **extra) -> dict:
    """A ``.dppt`` payload in the agreed layout, the model's keys freed of wrapper prefixes."""
    if stage not in STAGES:
        raise DPImgSynError(f"unknown checkpoint stage {stage!r}; use one of {', '.join(STAGES)}")
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": stage,
            "model": strip_wrapper_prefixes(model_state), "architecture": architecture,
            "num_classes": num_classes, "dataset": dataset, "privacy": privacy, **extra}


def save_dppt(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` atomically to ``path`` (``.dppt`` appended if missing); return the final path."""
    if type(payload) not in (dict, OrderedDict):
        raise DPImgSynError(f"a .dppt payload must be a dict, got {type(payload).__name__}")
    found = _first_non_plain(payload, "payload")
    if found:
        raise DPImgSynError(f"cannot save {found} in a .dppt: store only dicts, lists, str, int, float, "
                            "bool, None and tensors (convert it, e.g. str() or a tensor)")
    final = with_suffix_once(path, CHECKPOINT_SUFFIX)
    if final.is_dir():
        raise DPImgSynError(f"{final} is a directory; give a checkpoint file path")
    atomic_torch_save(payload, final)
    return final


def _refused_global(message: str) -> str | None:
    """The Python object a ``weights_only`` load refused to import, if that is why it failed."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def load_dppt(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` on the CPU; a pickled program is never run.

    ``path`` may omit the ``.dppt`` suffix. Missing, corrupt or unsafe files raise
    ``DPImgSynError`` with a one-line message.
    """
    path = Path(path)
    if not path.exists() and with_suffix_once(path, CHECKPOINT_SUFFIX).exists():
        path = with_suffix_once(path, CHECKPOINT_SUFFIX)
    if not path.is_file():
        raise DPImgSynError(f"checkpoint {path} not found; check the path (train it first, or download it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read a user-supplied file is a user error
        culprit = _refused_global(str(error))
        if culprit:
            raise DPImgSynError(
                f"refused to load {path}: it contains a pickled Python object ({culprit}) rather than only "
                "tensors and plain values, and such objects could run code; only use checkpoints written by "
                "this project, and convert foreign ones with the importer"
            ) from None
        raise DPImgSynError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a tensor checkpoint "
            f"({type(error).__name__}); re-create it or download it again"
        ) from None
    if not isinstance(payload, dict):
        raise DPImgSynError(f"{path} is not a DP-ImgSyn checkpoint (it holds a {type(payload).__name__})")
    return payload


def check_dppt(payload: dict, stage: str | None = None, architecture: str | None = None,
               dataset: str | None = None, what: str = "checkpoint") -> dict:
    """Check that ``payload`` is one of our checkpoints, of the expected stage/architecture/dataset."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise DPImgSynError(f"{what} is not a DP-ImgSyn checkpoint (format {found!r}, expected "
                            f"{CHECKPOINT_FORMAT!r}); original authors' files must be imported first")
    version = payload.get("version")
    if type(version) is not int or version > CHECKPOINT_VERSION:
        raise DPImgSynError(f"{what} has checkpoint version {version!r}, this code reads up to "
                            f"{CHECKPOINT_VERSION}; update the code")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise DPImgSynError(f"{what} is incomplete: it lacks {missing}; re-create it")
    expected = {"stage": stage, "architecture": architecture, "dataset": dataset}
    for key, wanted in expected.items():
        if wanted is not None and payload[key] != wanted:
            raise DPImgSynError(f"{what} has {key} {payload[key]!r} but {wanted!r} is needed; "
                                f"pass a {wanted} checkpoint")
    return payload


def completed_dppt(output: Path, settings_key: str, settings: dict) -> bool:
    """True (and says so) when ``output`` is already this run's finished `.dppt`.

    An existing file written with other settings is a user error; it is never overwritten.
    """
    if not output.exists():
        return False
    existing = load_dppt(output)
    require_same_settings(output, existing.get(settings_key, {}), settings)
    print(f"{output} already complete (epsilon {existing['privacy']['epsilon']:.3f}); nothing to do")
    return True
