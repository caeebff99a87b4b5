"""Digests of files, in parallel threads (hashlib and zlib release the GIL on large
updates): the sha256 that names a file's blob and, on request, a CRC32 of every
``CRC_CHUNK`` bytes read in the same pass.

The CRC32s are what a publish to S3 sends with each multipart part, which the server
verifies: :func:`part_crc32s` combines them into the CRC32 of any part whose size is a
multiple of ``CRC_CHUNK``, so that the upload sends the bytes that were hashed without
hashing them again (see docs/format.md).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
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


# -- CRC32 arithmetic ----------------------------------------------------------------------
# zlib computes crc32_combine but Python's binding does not expose it; these are zlib's
# own multmodp and x2nmodp (crc32.c, zlib 1.2.12+): polynomials over GF(2), reflected.

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    p, table = 1 << 30, []  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial: appending n zero bytes, as an operator."""
    p, k = 1 << 31, 3  # x^0; 2^3 bits per byte
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of A+B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def part_crc32s(chunk_crc32: Sequence[int], size: int, part_size: int) -> list[int] | None:
    """The CRC32 of every ``part_size`` bytes of a file of ``size`` bytes, from the CRC32s
    of its ``CRC_CHUNK``-byte chunks; None when parts do not fall on chunk boundaries or
    the chunks do not cover the file."""
    if part_size % CRC_CHUNK or len(chunk_crc32) != -(-size // CRC_CHUNK):
        return None
    per = part_size // CRC_CHUNK
    whole = _x8nmodp(CRC_CHUNK)
    last = len(chunk_crc32) - 1
    out = []
    for first in range(0, len(chunk_crc32), per):
        crc = chunk_crc32[first]
        for i in range(first + 1, min(first + per, last + 1)):
            # Every chunk is whole but the file's last, which may be shorter.
            shift = whole if i < last else _x8nmodp(size - last * CRC_CHUNK)
            crc = _multmodp(shift, crc) ^ chunk_crc32[i]
        out.append(crc)
    return out


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
