"""Progress of long work: a bar on a terminal, periodic log lines otherwise.

    with Progress("backup external", total_bytes=n) as p:
        p.advance(files=1, nbytes=size)

Thread-safe: workers advance the same Progress.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("drtool.progress")

LOG_EVERY_SECONDS = 10.0


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    enabled = True  # -q turns every bar and line off

    def __init__(self, label: str, total_bytes: int | None = None, total_files: int | None = None):
        self.label = label
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.files = 0
        self.nbytes = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TransferSpeedColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TextColumn("{task.fields[files]} files"),
                                     TimeElapsedColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total_bytes, files=0)
        return self

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files += files
            self.nbytes += nbytes
            now = time.monotonic()
            if self._bar is not None:
                self._bar.update(self._task, advance=nbytes, files=self.files)
            elif self.enabled and now - self._last_log >= LOG_EVERY_SECONDS:
                self._last_log = now
                log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        done = human_bytes(self.nbytes)
        if self.total_bytes:
            done += f" of {human_bytes(self.total_bytes)} ({100 * self.nbytes / self.total_bytes:.0f} %)"
        return f"{self.label}: {self.files} files, {done}, {human_bytes(self.nbytes / elapsed)}/s"

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and time.monotonic() - self._started >= LOG_EVERY_SECONDS:
            log.info("%s (done)", self.line())
