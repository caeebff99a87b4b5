"""Downloaded bytes reach files in WRITE_SLICE pieces, whatever size they arrived in."""

from __future__ import annotations

import hashlib
import io
import os

from weightship.store.file import FileStore
from weightship.store.pagecache import WRITE_SLICE, write_all


class Recorder(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return super().write(data)


def test_write_all_writes_every_byte_in_slices():
    data = os.urandom(3 * WRITE_SLICE + 123)
    out = Recorder()
    write_all(out, memoryview(data))
    assert out.getvalue() == data
    assert max(out.sizes) == WRITE_SLICE
    assert out.sizes[-1] == 123
    small = Recorder()
    write_all(small, b"abc")
    assert small.getvalue() == b"abc" and small.sizes == [3]


def test_a_download_writes_in_slices(tmp_path, monkeypatch):
    """The file:// store's get_blob (through the one blob writer every source uses: S3
    pulls, node fetches, URLs and peers) never hands the kernel more than WRITE_SLICE at once."""
    data = os.urandom(5 * 1024 * 1024 + 7)
    src = tmp_path / "src"
    src.write_bytes(data)
    hexdigest = hashlib.sha256(data).hexdigest()
    store = FileStore(tmp_path / "store")
    store.put_blob(hexdigest, src, len(data))
    dest = tmp_path / "dest"
    sizes: list[int] = []
    real_write = os.write

    def spying_write(fd: int, b) -> int:
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(dest):
            sizes.append(len(b))
        return real_write(fd, b)

    monkeypatch.setattr(os, "write", spying_write)
    assert store.get_blob(hexdigest, dest, len(data)) == len(data)
    monkeypatch.undo()
    assert dest.read_bytes() == data
    assert sizes and max(sizes) <= WRITE_SLICE
    assert sum(sizes) == len(data)
