"""Reporting progress and messages: rich bars on a terminal, plain lines otherwise.

Library functions take a :class:`Reporter` and never print; the CLI picks one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TextIO

Advance = Callable[[int], None]
PLAIN_MIN_BYTES = 64 * 1024 * 1024


class Reporter:
    """Silent reporter; the base for the others."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int):
        yield _noop


def _noop(n: int) -> None:
    pass


class PlainReporter(Reporter):
    """One line per step and a line per 25% of a long task: readable in CI logs."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def info(self, message: str) -> None:
        self._print(message)

    def warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    @contextmanager
    def task(self, description: str, total: int):
        # Small transfers finish before a line would help anyone reading a CI log.
        if total < PLAIN_MIN_BYTES:
            yield _noop
            return
        done = 0
        marks = iter((25, 50, 75))
        mark = next(marks)
        start = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done, mark
            lines = []
            with self._lock:
                done += n
                while mark and done * 100 >= mark * total:
                    lines.append(f"{description}: {mark}%")
                    mark = next(marks, 0)
            for line in lines:
                self._print(line)

        yield advance
        secs = time.monotonic() - start
        self._print(f"{description}: done, {human_bytes(done)} in {secs:.1f}s")


class RichReporter(PlainReporter):
    """Progress bars on a terminal."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(stderr=True)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    @contextmanager
    def task(self, description: str, total: int):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n: bar.advance(tid, n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def make_reporter(*, quiet: bool = False, json_mode: bool = False) -> Reporter:
    if quiet:
        return Reporter()
    if sys.stderr.isatty() and not json_mode:
        return RichReporter()
    return PlainReporter()
