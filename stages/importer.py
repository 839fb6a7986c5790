"""Convert the original authors' released checkpoints into ``.dppt`` files, without running their code.

The original releases are ``torch.save`` pickles holding, besides the weights, pickled Opacus
accountant objects. Loading them the ordinary way would run whatever code the pickle names, and
``weights_only=True`` refuses them outright. :func:`restricted_load` reads the zip-format file with
an unpickler whose ``find_class`` builds only tensors, ordered dicts and numeric numpy scalars; any
other class becomes an inert :class:`Dropped` placeholder that records the plain data handed to it
and is removed from the result. Nothing the file names is ever imported or called.

Original layouts (keys of the saved dict):

- teacher: ``model`` (state dict with Opacus ``_module.`` prefixes), ``dp_accountant``;
- statistics: ``model`` (each GroupNorm replaced by a BatchNorm2d-derived stat layer holding
  ``running_mean``, ``running_var``, ``num_batches_tracked`` and the wrapped GroupNorm's
  ``group_norm.weight``/``group_norm.bias``), ``dp_accountant``, ``training_dp_acc``, ``eps``,
  ``delta``, ``bn_nm``, ``bn_epochs``.

An imported *teacher* gets a single *claimed by source* ledger entry (its accountant history,
read as plain data and accounted here, or the epsilon its source published): we cannot re-derive
the guarantee, only state it. Imported *statistics* get a non-private entry (epsilon = inf),
whatever epsilon the file states: the original statistics mechanism drew its noise without adding
it, so the statistics are exact functions of the private data, and synthesis refuses them unless
the user asks for a non-private run.
"""
from __future__ import annotations

import io
import math
import numbers
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import registry
from common.errors import DPImgSynError
from common.files import require_same_settings, sha256_file, with_suffix_once
from privacy.accountant import DEFAULT_ACCOUNTANT, DEFAULT_DELTA, Mechanism, compute_epsilon, validate_mechanism
from privacy.checkpoint import STAGES, dppt_payload, load_dppt, save_dppt, strip_wrapper_prefixes
from privacy.ledger import claimed_entry, non_private_entry, privacy_block
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics

ORIGINAL_LAYOUT = "original DP-ImgSyn release"
TEACHER_ACCOUNTANT_KEYS = {"teacher": "dp_accountant", "statistics": "training_dp_acc"}
STATEMENT_FIELDS = ("eps", "delta", "bn_nm", "bn_epochs")
STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
STATISTICS_CAVEAT = ("the original statistics mechanism clamped activations and drew Gaussian noise without "
                     "adding it, so these normalization statistics are exact functions of the private data and "
                     "are recorded as non-private (epsilon = inf); for a guarantee, import with --as_teacher and "
                     "recompute them with save_dp_db_stats.py")

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
NUMPY_SCALAR_KINDS = "biuf"
LATIN1_NAMES = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


class _Corrupt(Exception):
    """Internal: the pickle is not a well-formed tensor checkpoint."""


class Dropped:
    """Inert stand-in for any class the restricted unpickler does not allow.

    Whatever pickle does with it (instantiate, call, set state, append, set items) only stores
    or discards data; no method of the original class exists here to run.
    """

    source = "?"

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.state = None
        return instance  # object.__init__ accepts the arguments too, since __new__ is overridden

    def __call__(self, *args, **kwargs) -> Dropped:
        return type(self)()

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass

    def add(self, value) -> None:
        pass


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    flat: torch.Tensor


class _NumpyDtype:
    """A numpy dtype named by the pickle; only numeric kinds are ever materialized."""

    def __init__(self, name, align=False, copy=True) -> None:
        self.name, self.byteorder = name, "="

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise _Corrupt(f"tensor {what} {values!r}")
    return tuple(values)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A fresh tensor copied out of ``storage``; shapes are checked before any memory is used."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise _Corrupt("tensor without a valid storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or math.prod(size) > max(storage.flat.numel(), 1):
        raise _Corrupt(f"tensor of size {size} larger than its storage")
    try:
        return storage.flat.as_strided(size, stride, offset).clone()
    except RuntimeError as error:
        raise _Corrupt(str(error).splitlines()[0]) from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise _Corrupt("parameter without tensor data")
    return data


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDtype) or not isinstance(dtype.name, str) or not isinstance(data, bytes):
        raise _Corrupt("numpy scalar without a dtype and bytes")
    try:
        kind = np.dtype(dtype.name)
    except TypeError:
        raise _Corrupt(f"numpy dtype {dtype.name!r}") from None
    if kind.kind not in NUMPY_SCALAR_KINDS or kind.itemsize != len(data):
        raise _Corrupt(f"numpy scalar of dtype {dtype.name!r}")
    return np.frombuffer(data, dtype=kind.newbyteorder(dtype.byteorder))[0].item()


def _latin1_encode(text, encoding="utf-8"):
    """How numpy pickles a scalar's bytes; no other codec is looked up (a lookup can import modules)."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in LATIN1_NAMES:
        raise _Corrupt("only latin-1 encoded bytes are read")
    return text.encode("latin-1")


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of a torch zip checkpoint that can only build tensors and plain values."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        return type(name, (Dropped,), {"source": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise _Corrupt(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        name = f"{self._prefix}/data/{key}"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise _Corrupt(f"missing tensor data {name}") from None
        if info.file_size != nbytes:
            raise _Corrupt(f"tensor data {name} holds {info.file_size} bytes, {nbytes} expected")
        if nbytes == 0:
            return _Storage(torch.empty(0, dtype=dtype))
        return _Storage(torch.frombuffer(bytearray(self._archive.read(name)), dtype=dtype))


def _pickle_name(archive: zipfile.ZipFile) -> str:
    names = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(names) != 1:
        raise _Corrupt("no single data.pkl record")
    prefix = names[0][: -len("/data.pkl")]
    if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder").strip() != b"little":
        raise _Corrupt("big-endian tensor data")
    return names[0]


def restricted_load(path: str | Path) -> Any:
    """The content of a zip-format ``torch.save`` file; disallowed objects come back as :class:`Dropped`."""
    path = Path(path)
    if not path.is_file():
        raise DPImgSynError(f"checkpoint {path} not found; check the path")
    if not zipfile.is_zipfile(path):
        raise DPImgSynError(f"{path} is not a zip-format torch checkpoint (torch >= 1.6 writes those); "
                            "re-save it with a recent torch, or check that the download is complete")
    try:
        with zipfile.ZipFile(path) as archive:
            name = _pickle_name(archive)
            return _RestrictedUnpickler(archive.read(name), archive, name.rsplit("/", 1)[0]).load()
    except Exception as error:  # any failure to read a user-supplied file is a user error
        raise DPImgSynError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a tensor "
                            f"checkpoint ({type(error).__name__}: {str(error)[:120]}); download it again") from None


_DROPPED = object()  # marks a value that plain() removed


def _is_plain_scalar(value) -> bool:
    return value is None or type(value) in (str, int, float, bool)


def plain(value, where: str, dropped: list[str]):
    """``value`` with everything but tensors, plain scalars and containers removed (recorded in ``dropped``)."""
    if _is_plain_scalar(value) or type(value) is torch.Tensor:
        return value
    if type(value) in (dict, OrderedDict):
        result = {}
        for key, item in value.items():
            if type(key) not in (str, int):
                dropped.append(f"{where}: a key of type {type(key).__name__}")
                continue
            kept = plain(item, f"{where}[{key!r}]", dropped)
            if kept is not _DROPPED:
                result[key] = kept
        return result
    if type(value) in (list, tuple):
        kept = [plain(item, f"{where}[{index}]", dropped) for index, item in enumerate(value)]
        return type(value)(item for item in kept if item is not _DROPPED)
    dropped.append(f"{where} ({_describe(value)})")
    return _DROPPED


def _describe(value) -> str:
    """The class a dropped value stands for (the pickle's own name for placeholders)."""
    if isinstance(value, Dropped) or (isinstance(value, type) and issubclass(value, Dropped)):
        return value.source
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _statement(value):
    """A stated field as a plain scalar (a one-element tensor becomes its number), else None."""
    if type(value) is torch.Tensor and value.numel() == 1:
        return value.item()
    return value if _is_plain_scalar(value) else None


def recorded_history(obj) -> list[Mechanism] | None:
    """An accountant's recorded ``history`` of ``(noise_multiplier, sample_rate, steps)``, read as data.

    Opacus accountants keep that list in their instance state, which the placeholder received
    as plain values; nothing of the accountant's own code is involved.
    """
    state = obj.state if isinstance(obj, Dropped) else None
    history = state.get("history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not history:
        return None
    try:
        return [validate_mechanism(tuple(entry), "recorded accountant history") for entry in history]
    except (DPImgSynError, TypeError):
        return None


@dataclass
class OriginalCheckpoint:
    """What an original release file holds, as plain data."""

    layout: str  # "teacher" or "statistics"
    model: dict[str, torch.Tensor]  # wrapper prefixes removed
    statements: dict[str, Any]  # plain values of STATEMENT_FIELDS found in the file
    histories: dict[str, list[Mechanism]]  # accountant key -> recorded history
    dropped: list[str] = field(default_factory=list)


def read_original(path: str | Path) -> OriginalCheckpoint:
    """Read an original release file without executing any of its pickled code."""
    content = restricted_load(path)
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise DPImgSynError(f"{path} is not an original DP-ImgSyn checkpoint: it has no 'model' state dict")
    histories = {key: history for key in TEACHER_ACCOUNTANT_KEYS.values()
                 if (history := recorded_history(content.get(key))) is not None}
    dropped: list[str] = []
    model = plain(content["model"], "model", dropped)
    if not isinstance(model, dict) or not model or not all(
            isinstance(key, str) and type(value) is torch.Tensor for key, value in model.items()):
        raise DPImgSynError(f"{path}: 'model' must map parameter names to tensors")
    statements = {key: value for key in STATEMENT_FIELDS if key in content
                  and (value := _statement(plain(content[key], key, dropped))) is not None}
    for key in content.keys() - {"model", *STATEMENT_FIELDS}:
        plain(content[key], str(key), dropped)
    model = strip_wrapper_prefixes(model)
    is_statistics = any(key.endswith(".running_mean") for key in model)
    return OriginalCheckpoint("statistics" if is_statistics else "teacher", dict(model), statements, histories,
                              dropped)


def split_statistics(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Original stat layers -> (plain GroupNorm state dict, ``{layer: {"mean", "var"}}``).

    A stat layer ``P`` holds ``P.running_mean``/``P.running_var`` (its input statistics) and the
    wrapped GroupNorm under ``P.group_norm.``; the GroupNorm's parameters become ``P.weight`` and
    ``P.bias`` again. The stat layer's own BatchNorm affine parameters, if any, are unused by its
    forward pass and are left out.
    """
    layers = sorted(key[: -len(".running_mean")] for key in model if key.endswith(".running_mean"))
    weights = dict(model)
    statistics = {}
    for layer in layers:
        needed = [f"{layer}.{name}" for name in ("running_var", "group_norm.weight", "group_norm.bias")]
        missing = [key for key in needed if key not in model]
        if missing:
            raise DPImgSynError(f"stat layer {layer!r} lacks {missing}; the file does not have the original "
                                "statistics layout")
        statistics[layer] = {"mean": model[f"{layer}.running_mean"].float().clone(),
                             "var": model[f"{layer}.running_var"].float().clone()}
        for key in [f"{layer}.{name}" for name in STAT_BUFFERS] + [f"{layer}.weight", f"{layer}.bias"]:
            weights.pop(key, None)
        for name in ("weight", "bias"):
            weights[f"{layer}.{name}"] = weights.pop(f"{layer}.group_norm.{name}")
    return weights, statistics


def _load_weights(weights: dict[str, torch.Tensor], architecture: str, num_classes: int) -> torch.nn.Module:
    """Our architecture with ``weights`` loaded strictly; a mismatch names the offending keys."""
    model = registry.get_model(architecture, num_classes)
    try:
        result = model.load_state_dict(weights, strict=False)
        problems = [f"{kind} keys {keys[:4]}" for kind, keys in
                    (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    except RuntimeError as error:  # a tensor of the wrong shape
        problems = [line.strip() for line in str(error).splitlines()[1:2]]
    if problems:
        raise DPImgSynError(f"the weights do not fit architecture {architecture!r} with {num_classes} classes "
                            f"({'; '.join(problems)}); pass the right --model and --dataset")
    return model


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def source_claim(original: OriginalCheckpoint, stage: str, epsilon: float | None, delta: float | None,
                 accountant: str) -> tuple[float, float, str]:
    """(epsilon, delta, basis) of the guarantee the source states for what is imported as ``stage``.

    In order: a statistics file's own ``eps``/``delta`` (imported as statistics); the teacher
    accountant's recorded history, accounted here at ``delta``; the ``epsilon``/``delta`` the
    user copies from the source's publication; a statistics file's stated total, which also
    covers its teacher. User values that would be ignored are refused rather than dropped.
    """
    stated = (original.statements.get("eps"), original.statements.get("delta"))
    has_stated = all(_number(value) for value in stated)
    history = original.histories.get(TEACHER_ACCOUNTANT_KEYS[original.layout]) if stage == "teacher" else None
    used_delta = DEFAULT_DELTA if delta is None else delta
    refused = ([flag for flag, value in (("--epsilon", epsilon), ("--delta", delta)) if value is not None]
               if stage == "statistics" else ["--epsilon"] if history is not None and epsilon is not None else [])
    if refused:
        source = "states its own epsilon and delta" if stage == "statistics" else "records its accountant history"
        raise DPImgSynError(f"the file {source}; drop {' and '.join(refused)} (only for teacher files without one)")
    if stage == "statistics":
        if not has_stated:
            raise DPImgSynError("the statistics file states no numeric 'eps' and 'delta'; it is not in the "
                                "original layout")
        return float(stated[0]), float(stated[1]), "epsilon and delta stated in the source file"
    if history is not None:
        return (compute_epsilon(history, used_delta, accountant), used_delta,
                f"the source accountant's recorded history, accounted here ({accountant})")
    if epsilon is not None:
        return epsilon, used_delta, "stated by the user from the source's publication"
    if has_stated and delta is None:
        return float(stated[0]), float(stated[1]), "total stated in the source statistics file (covers the teacher)"
    raise DPImgSynError("the teacher file records no readable privacy accounting; pass --epsilon and --delta "
                        "as published by its source (e.g. the paper's Table 1)")


def convert(original: OriginalCheckpoint, dataset: str, architecture: str = registry.DEFAULT_MODEL,
            stage: str | None = None, epsilon: float | None = None, delta: float | None = None,
            accountant: str = DEFAULT_ACCOUNTANT, origin: dict | None = None) -> dict:
    """A ``.dppt`` payload of our format for ``original``; the weights are checked to load."""
    stage = stage or original.layout
    if stage not in STAGES:
        raise DPImgSynError(f"unknown stage {stage!r}; use teacher or statistics")
    if stage == "statistics" and original.layout != "statistics":
        raise DPImgSynError("the file is a teacher checkpoint without normalization statistics; import it as a "
                            "teacher and compute DP statistics with save_dp_db_stats.py")
    num_classes = registry.dataset_info(dataset).num_classes
    if num_classes < 1:
        raise DPImgSynError(f"{dataset!r} is a public-only dataset; pass the private dataset the teacher was "
                            "trained on")
    weights, statistics = split_statistics(original.model)
    model = _load_weights(weights, architecture, num_classes)
    model_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    claim_epsilon, claim_delta, basis = source_claim(original, stage, epsilon, delta, accountant)
    extra_claim = {"basis": basis, "imported_stage": stage, **(origin or {})}
    if stage == "statistics":
        attach_stat_layers(model)
        load_dp_statistics(model, statistics)
        extra_claim["caveat"] = STATISTICS_CAVEAT
    if original.histories:
        extra_claim["recorded_history"] = {key: [list(entry) for entry in history]
                                           for key, history in original.histories.items()}
    if stage == "statistics":  # the stated guarantee is recorded, never trusted: the noise was never added
        entry = non_private_entry(f"original_{stage}", stated_epsilon=claim_epsilon, stated_delta=claim_delta,
                                  **extra_claim)
    else:
        entry = claimed_entry(f"original_{stage}", claim_epsilon, claim_delta, **extra_claim)
    block = privacy_block([entry], DEFAULT_DELTA, accountant)
    imported_from = {"layout": ORIGINAL_LAYOUT, "stage_in_file": original.layout,
                     "statements": dict(original.statements), "dropped": list(original.dropped), **(origin or {})}
    extra = {"imported_from": imported_from}
    if stage == "statistics":
        extra["dp_statistics"] = statistics
    return dppt_payload(stage, model_state, architecture, num_classes, dataset, block, **extra)


def import_original(source: str | Path, output: str | Path, dataset: str, architecture: str = registry.DEFAULT_MODEL,
                    stage: str | None = None, epsilon: float | None = None, delta: float | None = None,
                    accountant: str = DEFAULT_ACCOUNTANT) -> Path:
    """Convert an original release file into a ``.dppt`` at ``output``; return its path.

    An existing output made from the same file with the same settings is kept (nothing to do);
    one with other settings is refused, never overwritten.
    """
    source = Path(source)
    original = read_original(source)
    origin = {"source_file": source.name, "source_sha256": sha256_file(source)}
    settings = {**origin, "dataset": dataset, "architecture": architecture, "stage": stage or original.layout,
                "epsilon": epsilon, "delta": delta, "accountant": accountant}
    final = with_suffix_once(output, ".dppt")
    if final.exists():
        require_same_settings(final, load_dppt(final).get("import_settings", {}), settings)
        print(f"{final} already imported from {source.name}; nothing to do")
        return final
    payload = convert(original, dataset, architecture, stage, epsilon, delta, accountant, origin)
    payload["import_settings"] = settings
    final = save_dppt(final, payload)
    block = payload["privacy"]
    basis = ("non-private: synthesis accepts it only with --non_private" if payload["stage"] == "statistics"
             else "claimed by source")
    print(f"imported {source.name} as a {payload['stage']} checkpoint: {final} (epsilon {block['epsilon']:.3f} "
          f"at delta {block['delta']:g}, {basis}; dropped: {', '.join(original.dropped) or 'nothing'})")
    if payload["stage"] == "statistics":
        print(f"warning: {STATISTICS_CAVEAT}")
    return final
