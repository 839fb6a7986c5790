"""Command-line plumbing shared by every stage script, and typed stage configs.

Every CLI reports a user mistake as exactly one line ``error: ...`` on stderr with exit
code 2 and no traceback; argparse's own two-line usage error is replaced accordingly.

A stage's settings are one frozen dataclass whose fields are declared with :func:`option`: the
default and the help text are written there once, and both the stage's CLI flags
(:func:`add_config_arguments`) and its section of a pipeline YAML file (:func:`config_from_mapping`)
are read from it, checked by the same rules, so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import types
import typing
from typing import Any, Callable, NoReturn

from common import distributed
from common.errors import DPImgSynError
from common.runtime import keep_freed_memory


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every flag that has one, and a script's docstring (its examples) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, defaults shown in ``--help`` and no abbreviated flags (``--epoch`` is not
    taken for ``--epochs``: a typo is refused, never read as another setting)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    @classmethod
    def for_script(cls, doc: str) -> ArgumentParser:
        """A parser described by a script's docstring: its first paragraph, then the rest as the epilog."""
        description, _, epilog = doc.partition("\n\n")
        return cls(description=description, epilog=epilog or None)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with code 2 (under torchrun, naming ranks other than 0)."""
    rank = int(os.environ.get("RANK", "0")) if distributed.launched_by_torchrun() else 0
    print(f"error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main_guard(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main`` so that a :class:`DPImgSynError` becomes a one-line error, exit 2.

    The process first lets malloc keep freed memory (:func:`common.runtime.keep_freed_memory`).
    """

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        keep_freed_memory()
        try:
            main(argv)
        except DPImgSynError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        finally:
            distributed.teardown()
        return 0

    return wrapped


def _number(kind: type, positive: bool, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if positive and (value < 0 or (value == 0 and not allow_zero)):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'non-negative' if allow_zero else 'positive'}"
            )
        return value

    parse.__name__ = kind.__name__
    parse.words = "positive" if positive and not allow_zero else "non-negative" if positive else ""
    return parse


positive_float = _number(float, positive=True, allow_zero=False)
nonnegative_float = _number(float, positive=True, allow_zero=True)
positive_int = _number(int, positive=True, allow_zero=False)
nonnegative_int = _number(int, positive=True, allow_zero=True)


def _below_one(parse: Callable[[str], float], doc: str) -> Callable[[str], float]:
    def parse_below_one(text: str) -> float:
        value = parse(text)
        if value >= 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be below 1")
        return value

    parse_below_one.__doc__, parse_below_one.words = doc, parse.words
    return parse_below_one


probability = _below_one(positive_float, "A float in the open interval (0, 1), e.g. delta.")
fraction = _below_one(nonnegative_float, "A float in [0, 1), e.g. a held-out fraction.")


# --------------------------------------------------------------------------- typed stage configs
REQUIRED: Any = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, parse: Callable[[str], Any] | None = None,
           aliases: tuple[str, ...] = (), choices: tuple[str, ...] | None = None, run_only: bool = False) -> Any:
    """A config field: its one default, its help, how a flag's text is parsed and checked, other names.

    ``aliases`` are accepted as flags and as YAML keys too (the paper's ``--g_steps`` for ``k``).
    ``run_only``: the value as given does not make the stage's output what it is (where or how it runs, a
    secret seed, or an input the stage records by its identity instead), so :func:`content_settings` leaves it out.
    """
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "aliases": aliases,
                                                        "choices": choices, "run_only": run_only})


def content_settings(config: Any) -> dict[str, Any]:
    """The settings that make a stage's output what it is: every field of ``config`` not marked ``run_only``.

    A stage records them in its output and reuses an existing output only when they match, so a new field
    counts unless it is marked. Values are as given: the stage replaces any that names a local input (a
    ``folder:`` set) by its artifact name, so no local path enters an artifact.
    """
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
            if not field.metadata.get("run_only")}


def _options(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(field, _plain_type(hints[field.name])) for field in dataclasses.fields(cls)]


def _plain_type(hint: Any) -> type:
    """``int | None`` -> ``int``; tuples stay tuples."""
    arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and len(arguments) == 1:
        return arguments[0]
    return typing.get_origin(hint) or hint


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config class ``cls`` (a bool that defaults to on becomes ``--no_<name>``)."""
    own, run_options = cls.__annotations__, {field.name for field in dataclasses.fields(RunOptions)}
    order = sorted(_options(cls), key=lambda item: (item[0].name not in own, item[0].name in run_options))
    for field, kind in order:  # the stage's own settings first, where and how it runs last
        if field.name in skip:
            continue
        meta = field.metadata
        flags = [f"--{name}" for name in (field.name, *meta.get("aliases", ()))]
        if kind is bool:
            on = field.default is True
            parser.add_argument(f"--no_{field.name}" if on else flags[0], *([] if on else flags[1:]),
                                dest=field.name, action="store_false" if on else "store_true",
                                help=f"turn off: {meta.get('help', '')}" if on else meta.get("help"))
            continue
        required = field.default is REQUIRED
        parser.add_argument(*flags, dest=field.name, type=meta.get("parse") or (str if kind is tuple else kind),
                            required=required,
                            default=None if required else field.default, choices=meta.get("choices"),
                            help=meta.get("help"), nargs="+" if kind is tuple else None)


def config_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """The config of class ``cls`` from parsed flags (``values`` fill or override fields)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(args).items() if name in names}, **values)


def config_from_mapping(cls: type, mapping: Any, where: str = "", fixed: dict[str, Any] | None = None,
                        required: tuple[str, ...] = ()) -> Any:
    """The config of class ``cls`` from a YAML mapping; every mistake names its key (``where`` + key).

    Keys are the fields (or their aliases) not in ``fixed``, whose values the caller supplies;
    ``required`` lists keys that must be given even though the field has a default.
    """
    fixed = dict(fixed or {})
    if not isinstance(mapping, dict):
        raise DPImgSynError(f"config: {where.rstrip('.') or 'top level'} must be a mapping")
    keys = {name: (field, kind) for field, kind in _options(cls) if field.name not in fixed
            for name in (field.name, *field.metadata.get("aliases", ()))}
    unknown = sorted(set(mapping) - set(keys))
    if unknown:
        raise DPImgSynError(f"config: unknown key '{where}{unknown[0]}'; valid keys: {', '.join(keys)}")
    values = dict(fixed)
    for key, value in mapping.items():
        field, kind = keys[key]
        if value is not None:
            values[field.name] = _checked(value, kind, field.metadata, f"{where}{key}")
    missing = [f"{where}{name}" for name in required if values.get(name) is None]  # given under an alias too
    missing += [f"{where}{field.name}" for field, _ in _options(cls)
                if field.default is REQUIRED and field.name not in values]
    if missing:
        raise DPImgSynError(f"config: missing required key {missing[0]!r}")
    return cls(**values)


def _checked(value: Any, kind: type, meta: Any, name: str) -> Any:
    """``value`` of YAML key ``name`` if it has the field's type and passes its flag's checks."""
    numeric = kind in (int, float)
    accepted = {float: int, tuple: list}.get(kind, kind)  # YAML gives a float as 1 too, and lists for tuples
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, (kind, accepted)):
        expected = {float: "number", tuple: "list"}.get(kind, kind.__name__)
        raise DPImgSynError(f"config: key {name!r} must be a {expected}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise DPImgSynError(f"config: key {name!r} must be one of {', '.join(meta['choices'])}, got {value!r}")
    parse = meta.get("parse")
    if numeric and parse is not None:
        try:
            parse(repr(value) if isinstance(value, float) else str(value))
        except argparse.ArgumentTypeError:
            words = getattr(parse, "words", "")
            raise DPImgSynError(f"config: key {name!r} must be a finite {words + ' ' if words else ''}number"
                                f"{' below 1' if parse in (probability, fraction) else ''}, got {value!r}") from None
    return float(value) if kind is float else tuple(value) if kind is tuple else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where and how a stage runs; a pipeline config sets them once for every stage."""

    device: str = option("auto", "cpu, cuda, cuda:N or auto", run_only=True)
    data_root: str | None = option(None, "dataset folder (default: $DPIMGSYN_DATA, else ./data)", run_only=True)
    download: bool = option(False, "let torchvision download a missing dataset", run_only=True)
    progress: bool = option(True, "progress bars", run_only=True)


class StageCLI:
    """A stage script: ``--help`` from its docstring and its config's fields, the stage run on the parsed
    config, and one-line errors (:func:`main_guard`)."""

    def __init__(self, doc: str, config_class: type, stage: Callable[[Any], Any], skip: tuple[str, ...] = ()) -> None:
        self.doc, self.config_class, self.stage, self.skip = doc, config_class, stage, skip
        self.main = main_guard(self.run)

    def build_parser(self) -> ArgumentParser:
        parser = ArgumentParser.for_script(self.doc)
        add_config_arguments(parser, self.config_class, self.skip)
        return parser

    def parse_config(self, argv: list[str] | None = None) -> Any:
        return config_from_args(self.config_class, self.build_parser().parse_args(argv))

    def run(self, argv: list[str] | None = None) -> Any:
        return self.stage(self.parse_config(argv))
