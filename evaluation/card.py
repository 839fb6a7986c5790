"""The release card: a publishable part and an internal part that must never be published.

The publishable part may only carry what the release itself already discloses (its DP privacy
ledger, its size, its class names, its per-class counts by the teacher's labels and how often those
labels agree with the synthesis targets, both computed from DP outputs only, and its preview). Everything
measured against private data — accuracies, nearest-neighbour obfuscation figures, feature-space
fidelity, the gallery of closest pairs — goes to the internal part, which the data owner reads
before deciding to publish.
:func:`build_card` enforces the split with an allow-list, so a private figure cannot slip into the
publishable part by a misplaced key.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import DPImgSynError
from common.files import atomic_write_text

CARD_FORMAT = "dp-imgsyn-release-card/1"
MARKDOWN_FILE, JSON_FILE = "release_card.md", "release_card.json"

PUBLISHABLE_FIELDS: tuple[str, ...] = ("release", "dataset", "public_set", "k", "num_images", "class_names",
                                       "counts_per_class", "label_target_agreement", "epsilon", "delta", "accountant",
                                       "ledger", "preview_path")
"""Every key of the publishable part — and the only keys it may hold. ``counts_per_class`` counts the
teacher's labels; ``label_target_agreement`` is the fraction of images whose label is their target;
``class_names`` (label order) is the private set's public schema, ``None`` for unnamed classes."""

OPTIONAL_PUBLISHABLE_FIELDS: tuple[str, ...] = ("label_target_agreement", "class_names")
"""Publishable keys a release may lack (e.g. a release without synthesis targets); recorded as ``None``."""

INTERNAL_FIELDS: tuple[str, ...] = ("teacher_test_acc", "student_test_acc", "obfuscation", "fidelity", "gallery_path")
"""Keys the internal part must hold (``None`` means not measured); more keys are allowed."""

PRIVATE_VIEW_FIELD = "private_view"
"""Optional internal key: how the private set was seen when not in its own view (a foreign release's size)."""

NOT_MEASURED = "not measured"

NOT_FOR_PUBLICATION = (
    "**NOT FOR PUBLICATION: the \"Internal\" part of this card reads private data. "
    "Share only the \"Publishable\" part.**"
)

FIDELITY_NOTE = (
    "The feature-space Fréchet distance and precision/recall use the DP teacher's penultimate layer, "
    "not Inception-v3; they are not comparable with published FID numbers, only between releases "
    "evaluated with the same teacher."
)

PUBLISHABLE_NOTE = (
    "Nothing in this part is computed from private data outside the DP mechanisms recorded in the "
    "ledger: it describes what the release itself discloses."
)

INTERNAL_NOTE = (
    "Computed from the private training and test data for the data owner only: read it, in "
    "particular the gallery of the closest synthetic/private pairs, before publishing the release."
)


def card_path(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """``path`` as the card in ``out_dir`` names it in its publishable part: relative to that folder, or the
    bare name where no relative path exists (another drive), never an absolute local path."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
    except ValueError:
        return Path(path).name


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NumPy/torch scalars and arrays become lists and numbers, inf/nan strings."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def build_card(publishable: Mapping[str, Any], internal: Mapping[str, Any]) -> dict:
    """Assemble the card's JSON structure, refusing a publishable part outside the allow-list.

    ``publishable`` must hold exactly :data:`PUBLISHABLE_FIELDS`; ``internal`` must hold at least
    :data:`INTERNAL_FIELDS`, where ``None`` is recorded as "not measured".
    """
    missing = [key for key in PUBLISHABLE_FIELDS if key not in publishable and key not in OPTIONAL_PUBLISHABLE_FIELDS]
    unexpected = [key for key in publishable if key not in PUBLISHABLE_FIELDS]
    if unexpected:
        raise DPImgSynError(
            f"refusing to put {unexpected} into the publishable part of the release card: it may only "
            f"hold {list(PUBLISHABLE_FIELDS)}; figures measured on private data belong to the internal part"
        )
    if missing:
        raise DPImgSynError(f"the publishable part of the release card lacks {missing}")
    missing_internal = [key for key in INTERNAL_FIELDS if key not in internal]
    if missing_internal:
        raise DPImgSynError(
            f"the internal part of the release card lacks {missing_internal}; pass None for what was not measured"
        )
    internal_part = {key: NOT_MEASURED if value is None else value for key, value in internal.items()}
    internal_part["warning"] = NOT_FOR_PUBLICATION
    internal_part.setdefault("fidelity_note", FIDELITY_NOTE)  # a foreign release may use other features
    return _jsonable(
        {
            "format": CARD_FORMAT,
            "publishable": {key: publishable.get(key) for key in PUBLISHABLE_FIELDS},
            "internal": internal_part,
        }
    )


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return NOT_MEASURED
    return str(value)


def _table(rows: list[Mapping[str, Any]], first_column: str | None = None, labels: list[str] | None = None
          ) -> list[str]:
    """A Markdown table over the union of the rows' keys (an optional leading label column)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = ([first_column] if first_column is not None else []) + columns
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, row in enumerate(rows):
        label = [labels[position]] if labels is not None else []
        cells = label + [_format(row.get(column, "")) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _is_flat_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and not any(isinstance(item, (Mapping, list)) for item in value.values())


def _render(value: Any, heading_level: int) -> list[str]:
    """Generic rendering: dicts of dicts and lists of dicts become tables, other dicts bullets."""
    if isinstance(value, Mapping) and value and all(_is_flat_mapping(item) for item in value.values()):
        return _table(list(value.values()), first_column="", labels=list(value))
    if isinstance(value, list) and value and all(_is_flat_mapping(item) for item in value):
        return _table(value)
    if isinstance(value, Mapping):
        lines = []
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item:
                lines += [f"{'#' * heading_level} {key}", ""] + _render(item, heading_level + 1)
            else:
                lines.append(f"- {key}: {_format(item)}")
        return lines if lines and lines[-1] == "" else lines + [""]
    return [_format(value), ""]


def _class_columns(public: Mapping[str, Any]) -> dict[str, Any]:
    """Images per class, a column per label, headed ``label: name`` where the class has a name other than its label."""
    names = public.get("class_names") or []
    columns = {}
    for label, count in public["counts_per_class"].items():
        name = names[int(label)] if int(label) < len(names) else label
        columns[(label if name == label else f"{label}: {name}").replace("|", "\\|")] = count
    return columns


def _epsilon_text(epsilon: Any) -> str:
    return "inf (non-private run: no DP guarantee)" if str(epsilon) == "inf" else _format(epsilon)


def _agreement_text(public: Mapping[str, Any]) -> str:
    """The targets' agreement rate, and a reminder that the labels, not the targets, describe the images."""
    rate = public.get("label_target_agreement")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        return "not recorded"
    return (f"{100 * rate:.1f}% (targets are the classes the synthesis aimed at; train on the labels "
            "or soft labels, not on the targets)")


def render_card_markdown(card: Mapping[str, Any]) -> str:
    """Human-readable card; its first line warns that the internal part is not for publication."""
    public, internal = card["publishable"], card["internal"]
    lines = [
        NOT_FOR_PUBLICATION,
        "",
        "# Release card",
        "",
        "## Publishable",
        "",
        PUBLISHABLE_NOTE,
        "",
        f"- Release: {public['release']}",
        f"- Private dataset: {public['dataset']}",
        f"- Public initialization: {public['public_set']}",
        f"- Alignment steps k: {public['k']}",
        f"- Images: {public['num_images']}",
        "- Privacy: privacy unknown (the release carries no DP ledger)" if public["ledger"] is None else
        f"- Privacy: epsilon = {_epsilon_text(public['epsilon'])}, delta = {_format(public['delta'])} "
        f"({public['accountant']} accountant)",
        "",
        "### Privacy ledger",
        "",
        *(_table(public["ledger"]) if public["ledger"] else ["(no ledger)" if public["ledger"] is None
                                                             else "(empty ledger)", ""]),
        "### Images per class (the teacher's labels)" if public["ledger"] is not None else
        "### Images per class (the release's own labels)",
        "",
        *_table([_class_columns(public)]),
        f"- Agreement of the teacher's labels with the synthesis targets: {_agreement_text(public)}",
        "",
        "### Preview",
        "",
        f"![preview of synthetic images]({public['preview_path']})",
        "",
        "## Internal — NOT FOR PUBLICATION",
        "",
        INTERNAL_NOTE,
        "",
        *([f"- Note: {internal[PRIVATE_VIEW_FIELD]}", ""] if PRIVATE_VIEW_FIELD in internal else []),
        "### Utility",
        "",
        f"- Teacher test accuracy: {_format(internal['teacher_test_acc'])}",
    ]
    student = internal["student_test_acc"]
    if isinstance(student, (list, Mapping)):
        lines += ["- Student test accuracy:", ""] + _render(student, 4)
    else:
        lines += [f"- Student test accuracy: {_format(student)}", ""]
    lines += ["### Obfuscation", ""] + _render(internal["obfuscation"], 4)
    lines += ["### Fidelity", "", internal["fidelity_note"], ""] + _render(internal["fidelity"], 4)
    gallery = internal["gallery_path"]
    lines += ["### Closest synthetic / private pairs", ""]
    lines += [f"![gallery of closest pairs]({gallery})" if gallery != NOT_MEASURED else NOT_MEASURED, ""]
    standard = (*INTERNAL_FIELDS, "warning", "fidelity_note", PRIVATE_VIEW_FIELD)
    extras = {key: value for key, value in internal.items() if key not in standard}
    if extras:
        lines += ["### Other diagnostics", ""] + _render(extras, 4)
    return "\n".join(lines).rstrip() + "\n"


def write_card(out_dir: str | os.PathLike, card: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``release_card.md`` and ``release_card.json`` atomically; returns both paths."""
    out = Path(out_dir)
    markdown_path, json_path = out / MARKDOWN_FILE, out / JSON_FILE
    atomic_write_text(json_path, json.dumps(_jsonable(card), indent=2, allow_nan=False) + "\n")
    atomic_write_text(markdown_path, render_card_markdown(card))
    return markdown_path, json_path
