"""Device choice, seeding, memory and logging shared by all stages."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from common.errors import DPImgSynError


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU; anything else is validated."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DPImgSynError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DPImgSynError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


KEEP_FREED_MEMORY_ENV = "DPIMGSYN_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit systems


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when it now does.

    By default glibc hands freed blocks of more than a few MiB back to the kernel, so every
    training or synthesis step on the CPU builds its activations and gradients on fresh pages and
    pays a page fault per 4 KiB: ~10,000 a step for the demo's synthesis batch, 6-26% of its time
    in our runs (``benchmarks/bench_allocator.py``). With blocks up to 32 MiB served from a heap
    that is never trimmed, a process keeps its peak memory until it exits, as PyTorch's CUDA
    allocator does. Every stage CLI calls this; ``DPIMGSYN_KEEP_FREED_MEMORY=0`` opts out, and it
    does nothing where malloc is not glibc's.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or not _glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # Both or neither: a fixed trim threshold alone also freezes glibc's adaptive mmap threshold at
    # 128 KiB, and every tensor would then be mapped afresh.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keyed_seed(*key: int) -> int:
    """A 64-bit seed determined by ``key`` alone (e.g. seed, step): any part of a run is redrawn without saved state."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def keyed_generator(*key: int) -> torch.Generator:
    """A generator seeded by ``key`` alone (e.g. seed, shard), see :func:`keyed_seed`."""
    return torch.Generator().manual_seed(keyed_seed(*key))


def rng_state() -> dict:
    """Every RNG state a resumable stage needs to continue bit-for-bit (plain, weights_only-safe)."""
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    internal = tuple(int(x) for x in state["python"][:-1])
    gauss = state["python"][-1] or None
    random.setstate((state["python_version"], internal, gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


PRIVATE_MODE = 0o600  # owner only: local secrets (resume files with generator states, logs, metrics)


@contextlib.contextmanager
def in_mode(module: torch.nn.Module, training: bool) -> Iterator[torch.nn.Module]:
    """``module`` in train or eval mode for the block, and back in its own mode after it (after an error too)."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def open_private(path: str | os.PathLike, flags: int) -> int:
    """A descriptor of ``path`` (created if missing) that only its owner can read, whatever the umask.

    A new file is created 0600 (never briefly wider) and an existing one is tightened to 0600: who
    reads a resume file can regenerate a run's remaining noise, and logs hold non-private figures.
    """
    descriptor = os.open(path, flags | os.O_CREAT, PRIVATE_MODE)
    os.fchmod(descriptor, PRIVATE_MODE)
    return descriptor


def say(logger: logging.Logger | None, line: str) -> None:
    """Print ``line`` and log it (once a log is open): the log keeps what the terminal showed."""
    print(line, flush=True)
    if logger is not None:
        logger.info(line)


def setup_logging(log_file: str | os.PathLike | None, name: str = "dpimgsyn") -> logging.Logger:
    """Log to a file (everything; owner-only, see :func:`open_private`) and to stderr (warnings only, so
    progress bars stay readable)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        os.close(open_private(log_file, os.O_WRONLY))  # created or tightened before the handler appends to it
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
