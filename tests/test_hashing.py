"""Digests of files: the sha256, and the chunk CRC32s read in the same pass, which an
upload to an object store checks the bytes it sends against."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from weightship.artifact import hashing

MiB = hashing.CRC_CHUNK


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 8 * MiB, 21 * MiB + 123])
def test_chunk_crc32s(tmp_path: Path, size: int):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    d = hashing.digest_file(path, crc32=True)
    assert (d.sha256, d.size) == (hashlib.sha256(data).hexdigest(), size)
    assert d.chunk_crc32 == tuple(zlib.crc32(data[i : i + MiB]) for i in range(0, size, MiB))
    assert hashing.digest_file(path).chunk_crc32 is None


def test_reads_that_end_between_chunk_boundaries(tmp_path: Path, monkeypatch):
    """A short read (a signal, a network file system) must not shift the chunks."""
    data = os.urandom(3 * MiB + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(hashing, "CHUNK", 700 * 1024)
    d = hashing.digest_file(path, crc32=True)
    assert d.chunk_crc32 == tuple(zlib.crc32(data[i : i + MiB]) for i in range(0, len(data), MiB))
