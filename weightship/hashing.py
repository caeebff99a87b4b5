"""sha256 of files, in parallel threads (hashlib releases the GIL on large updates)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 4 * 1024 * 1024

Progress = Callable[[int], None]


def default_workers() -> int:
    return max(2, min(16, (os.cpu_count() or 2) * 2))


class Cancelled(Exception):
    """Hashing stopped because the caller no longer needs the result."""


def sha256_file(path: Path, progress: Progress | None = None, cancel: threading.Event | None = None) -> tuple[str, int]:
    """Return (hex digest, size) of a file, reading it once."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if progress:
                progress(n)
            if cancel is not None and cancel.is_set():
                raise Cancelled(str(path))
    return h.hexdigest(), size


def sha256_files(
    paths: Iterable[Path],
    progress: Progress | None = None,
    workers: int | None = None,
    cancel: threading.Event | None = None,
) -> dict[Path, tuple[str, int]]:
    """Hash many files at once; the biggest first so the pool drains evenly."""
    items = sorted(paths, key=lambda p: -p.stat().st_size)
    if not items:
        return {}
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = pool.map(lambda p: sha256_file(p, progress, cancel), items)
        return dict(zip(items, results, strict=False))


class HashingWriter:
    """A file writer that hashes what passes through it, so nothing is read twice."""

    def __init__(self, fh, h=None) -> None:
        self._fh = fh
        self.hash = h or hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._fh.write(data)
