"""Downloaded bytes reach files in WRITE_SLICE pieces, whatever size they arrived in."""

from __future__ import annotations

import hashlib
import io
import os

from weightship.pagecache import WRITE_SLICE, write_all
from weightship.store.file import FileStore


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
    """The file:// store's get_blob (the same write path as S3 pulls and node fetches)
    never hands the kernel more than WRITE_SLICE at once."""
    data = os.urandom(5 * 1024 * 1024 + 7)
    src = tmp_path / "src"
    src.write_bytes(data)
    hexdigest = hashlib.sha256(data).hexdigest()
    store = FileStore(tmp_path / "store")
    store.put_blob(hexdigest, src, len(data))
    sizes: list[int] = []
    real_write = io.BufferedWriter.write

    class Spy(io.BufferedWriter):
        def write(self, b) -> int:  # type: ignore[override]
            sizes.append(len(b))
            return real_write(self, b)

    real_open = open

    def spying_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if mode == "ab":
            raw = fh.detach()
            return Spy(raw)
        return fh

    import weightship.store.file as file_module

    monkeypatch.setattr(file_module, "open", spying_open, raising=False)
    dest = tmp_path / "dest"
    assert store.get_blob(hexdigest, dest, len(data)) == len(data)
    assert dest.read_bytes() == data
    assert sizes and max(sizes) <= WRITE_SLICE
    assert sum(sizes) == len(data)
