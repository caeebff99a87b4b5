"""The library's progress interface: a :class:`Reporter` that says nothing.

Library functions take a Reporter and never print. The command line passes one that
draws bars or writes lines (``weightship.cli.render``); everyone else gets silence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[[int], None]


class Reporter:
    """Silent reporter; the base of the command line's."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A task of ``total`` bytes; the body calls what it yields with each byte count done."""
        yield _noop


def _noop(n: int) -> None:
    pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 node``, ``3 nodes``: a count and its noun, agreeing (``words`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
