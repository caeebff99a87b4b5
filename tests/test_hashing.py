"""Digests of files: the sha256, and the chunk CRC32s read in the same pass that an S3
upload turns into the checksums of its parts."""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from pathlib import Path

import pytest

from weightship import hashing

MiB = hashing.CRC_CHUNK


def test_crc32_combine_matches_zlib():
    rng = random.Random(1)
    for _ in range(200):
        a, b = os.urandom(rng.randint(0, 3000)), os.urandom(rng.randint(0, 3000))
        assert hashing.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 8 * MiB, 21 * MiB + 123])
def test_chunk_and_part_crc32s(tmp_path: Path, size: int):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    d = hashing.digest_file(path, crc32=True)
    assert (d.sha256, d.size) == (hashlib.sha256(data).hexdigest(), size)
    assert d.chunk_crc32 == tuple(zlib.crc32(data[i : i + MiB]) for i in range(0, size, MiB))
    for part in (MiB, 5 * MiB, 8 * MiB):
        want = [zlib.crc32(data[i : i + part]) for i in range(0, size, part)]
        assert hashing.part_crc32s(d.chunk_crc32, size, part) == want
    # Parts that do not fall on chunk boundaries, or chunks of another file: not derived.
    assert hashing.part_crc32s(d.chunk_crc32, size, 5 * MiB + 1) is None
    assert hashing.part_crc32s(d.chunk_crc32, size + MiB, MiB) is None
    assert hashing.digest_file(path).chunk_crc32 is None


def test_reads_that_end_between_chunk_boundaries(tmp_path: Path, monkeypatch):
    """A short read (a signal, a network file system) must not shift the chunks."""
    data = os.urandom(3 * MiB + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(hashing, "CHUNK", 700 * 1024)
    d = hashing.digest_file(path, crc32=True)
    assert d.chunk_crc32 == tuple(zlib.crc32(data[i : i + MiB]) for i in range(0, len(data), MiB))
