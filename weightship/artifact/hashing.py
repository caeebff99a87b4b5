"""Digests of files, in parallel threads (hashlib and zlib release the GIL on large
updates): the sha256 that names a file's blob and, on request, a CRC32 of every
``CRC_CHUNK`` bytes read in the same pass.

The CRC32s let a publish to an object store, which reads each file a second time to
send it, check that it sends the bytes that were hashed without computing their sha256
again (weightship.store.object, docs/format.md).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 * 1024 * 1024
CRC_CHUNK = 1024 * 1024

Progress = Callable[[int], None]


def default_workers() -> int:
    return max(2, min(16, (os.cpu_count() or 2) * 2))


class Cancelled(Exception):
    """Hashing stopped because the caller no longer needs the result."""


@dataclass(frozen=True)
class FileDigest:
    """What one read of a file learnt: its sha256 and size and, when asked for, the
    CRC32 of each ``CRC_CHUNK`` bytes (the last chunk may be shorter)."""

    sha256: str
    size: int
    chunk_crc32: tuple[int, ...] | None = None


def digest_file(
    path: Path, progress: Progress | None = None, cancel: threading.Event | None = None, *, crc32: bool = False
) -> FileDigest:
    """Hash a file, reading it once."""
    h = hashlib.sha256()
    size = 0
    crcs: list[int] = []
    crc, in_chunk = 0, 0  # the running CRC32 of the current chunk, and its length so far
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if crc32:
                # A read need not end on a chunk boundary: carry the CRC across reads.
                pos = 0
                while pos < n:
                    take = min(n - pos, CRC_CHUNK - in_chunk)
                    crc = zlib.crc32(view[pos : pos + take], crc)
                    pos += take
                    in_chunk += take
                    if in_chunk == CRC_CHUNK:
                        crcs.append(crc)
                        crc, in_chunk = 0, 0
            size += n
            if progress:
                progress(n)
            if cancel is not None and cancel.is_set():
                raise Cancelled(str(path))
    if crc32 and in_chunk:
        crcs.append(crc)
    return FileDigest(h.hexdigest(), size, tuple(crcs) if crc32 else None)


def digest_files(
    paths: Iterable[Path],
    progress: Progress | None = None,
    workers: int | None = None,
    cancel: threading.Event | None = None,
    *,
    crc32: bool = False,
) -> dict[Path, FileDigest]:
    """Hash many files at once; the biggest first so the pool drains evenly."""
    items = sorted(paths, key=lambda p: -p.stat().st_size)
    if not items:
        return {}
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = pool.map(lambda p: digest_file(p, progress, cancel, crc32=crc32), items)
        return dict(zip(items, results, strict=False))


def sha256_files(
    paths: Iterable[Path],
    progress: Progress | None = None,
    workers: int | None = None,
    cancel: threading.Event | None = None,
) -> dict[Path, tuple[str, int]]:
    """Hash many files at once: (hex digest, size) of each."""
    return {p: (d.sha256, d.size) for p, d in digest_files(paths, progress, workers, cancel).items()}


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
