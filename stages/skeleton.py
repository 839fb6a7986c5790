"""The frame every stage runs in, written once: rank and device, the local log, what rank 0 alone says or
writes (metrics, resume state), and at the end the wait for rank 0's artifact (an error leaves at once)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from common import distributed
from common.files import atomic_torch_save, atomic_write_csv
from common.runtime import say, setup_logging


class StageRun:
    """One process's run of a stage: ``with StageRun(device) as run:``; leaving normally waits for every rank."""

    def __init__(self, device: str) -> None:
        self.dist, self.device = distributed.setup(device)
        self.is_main = self.dist.is_main
        self.logger: logging.Logger | None = None
        self.settings: dict[str, Any] = {}
        self.resume_file: Path | None = None
        self.started = time.time()

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, error: type | None, *_: object) -> None:
        if error is None:
            self.dist.barrier()

    def open_log(self, log_file: Path, title: str, settings: dict[str, Any], resume_file: Path | None = None) -> None:
        """Rank 0 logs to ``log_file``, first the settings that make the output what it is (a rerun resumes from
        ``resume_file`` only with the same)."""
        self.logger = setup_logging(log_file if self.is_main else None)
        self.logger.info("%s settings: %s", title, settings)
        self.settings, self.resume_file, self.started = settings, resume_file, time.time()

    def say(self, line: str) -> None:
        """Rank 0 alone talks (:func:`common.runtime.say`: printed, and logged once the log is open)."""
        if self.is_main:
            say(self.logger, line)

    def write_metrics(self, path: Path, rows: list[dict], columns: Sequence[str] | None = None,
                      scope: str | None = None) -> None:
        """Rank 0's local metrics CSV: owner-only, as its figures may read private data (``scope`` labels them)."""
        if self.is_main:
            atomic_write_csv(path, [{**row, "scope": scope} if scope else row for row in rows], columns, private=True)

    def save_state(self, **state: Any) -> None:
        """Rank 0 saves what a rerun resumes from, owner-only: its generators can regenerate the noise."""
        if self.is_main:
            atomic_torch_save({"settings": self.settings, **state}, self.resume_file, private=True)

    def finish(self, summary: str) -> None:
        """Rank 0, the artifact written: the resume state goes, the log records the time, ``summary`` is said."""
        if self.resume_file is not None:
            self.resume_file.unlink(missing_ok=True)
        self.logger.info("stage took %.1fs", time.time() - self.started)
        self.say(summary)
