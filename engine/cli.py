"""Command-line plumbing shared by every stage script.

Every CLI reports a user mistake as exactly one line ``error: ...`` on stderr with exit
code 2 and no traceback; argparse's own two-line usage error is replaced accordingly.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import Callable, NoReturn

from engine import distributed
from engine.runtime import keep_freed_memory
from errors import DPImgSynError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with code 2 (under torchrun, naming ranks other than 0)."""
    rank = int(os.environ.get("RANK", "0")) if distributed.launched_by_torchrun() else 0
    print(f"error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main_guard(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main`` so that a :class:`DPImgSynError` becomes a one-line error, exit 2.

    The process first lets malloc keep freed memory (:func:`engine.runtime.keep_freed_memory`).
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
    return parse


positive_float = _number(float, positive=True, allow_zero=False)
nonnegative_float = _number(float, positive=True, allow_zero=True)
finite_float = _number(float, positive=False, allow_zero=True)
positive_int = _number(int, positive=True, allow_zero=False)
nonnegative_int = _number(int, positive=True, allow_zero=True)


def probability(text: str) -> float:
    """A float in the open interval (0, 1), e.g. delta."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be below 1")
    return value
