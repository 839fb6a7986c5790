"""Name tables (models, loss terms, datasets, accountants) that refuse a second entry under a taken name."""
from __future__ import annotations

from typing import Iterable, TypeVar

Entry = TypeVar("Entry")


def register(table: dict[str, Entry], kind: str, name: str, entry: Entry) -> Entry:
    """Add ``entry`` under ``name``; a taken name is refused, since the second entry would silently replace
    the first one everywhere the name is used."""
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice; give one of them another name")
    table[name] = entry
    return entry


def unique_table(kind: str, entries: Iterable[tuple[str, Entry]]) -> dict[str, Entry]:
    """A table of ``(name, entry)`` pairs, each name taken once (see :func:`register`)."""
    table: dict[str, Entry] = {}
    for name, entry in entries:
        register(table, kind, name, entry)
    return table
