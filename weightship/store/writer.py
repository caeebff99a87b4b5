"""The one way blob bytes reach a disk: :class:`BlobWriter`.

Every source of blob bytes (a store, a presigned or ``file://`` URL, a peer) appends
through it, so every one of them gets the same guarantees:

* an interrupted download resumes from the bytes already in the partial file, which are
  hashed once on opening and never fetched again;
* no source can write more than the size the manifest declares: the byte past it fails
  the transfer before it is written (a store blob that is a link to ``/dev/zero``, or a
  URL that streams forever, cannot fill the disk);
* the sha256 is computed while writing, and :meth:`BlobWriter.commit` renames the
  partial file to its final name only if size and digest match; the final file is
  read-only, and nothing ever opens a committed blob for writing again (a release
  directory holds hard links to it).

A partial file is opened with ``O_NOFOLLOW``: a symlink planted in its place is refused
rather than followed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from weightship.errors import IntegrityError, write_error
from weightship.store.pagecache import WRITE_SLICE


class TooLarge(IntegrityError):
    """A source sent more bytes than the manifest declares for the blob."""


class Busy(Exception):
    """Another process holds the lock on this partial file (see BlobWriter.open)."""


class BlobWriter:
    """Append-only writer of one blob's partial file (see the module docstring).

    ``sync``: fsync before committing (node caches always; ``pull`` only with --sync,
    since it re-hashes what a crash may have torn).
    """

    def __init__(self, path: Path | str, hexdigest: str, size: int, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.hexdigest = hexdigest
        self.size = size
        self.sync = sync
        self.have = 0
        self._h = hashlib.sha256()
        self._fd = -1

    # -- opening and resuming ----------------------------------------------------------

    def open(self, *, lock: bool = False) -> BlobWriter:
        """Open (creating) the partial file and hash what an earlier attempt left.
        More bytes than the blob has, or a whole file that does not verify, start over.

        ``lock``: take an exclusive flock first, for a partial file that other processes
        may write too (a shared store); Busy if one holds it now."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise write_error(e, str(self.path)) from None
            if not lock or self._locked():
                break
        try:
            buf = bytearray(1024 * 1024)
            view = memoryview(buf)
            while self.have <= self.size:
                k = os.readv(self._fd, [view])
                if not k:
                    break
                self._h.update(view[:k])
                self.have += k
            if self.have > self.size or (self.have == self.size and not self.matches()):
                self.restart()
            os.lseek(self._fd, self.have, os.SEEK_SET)
        except BaseException:
            self.close()
            raise
        return self

    def _locked(self) -> bool:
        """Lock the open file; True once it is locked *and* still the file at ``path`` (the
        holder before us may have committed it, renaming it away: then open anew)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise Busy(f"{self.path} is being written by another process") from None
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self.close()
        return same

    def __enter__(self) -> BlobWriter:
        return self.open() if self._fd < 0 else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def complete(self) -> bool:
        """Every byte is here and hashes to the blob's name."""
        return self.have == self.size and self.matches()

    @property
    def remaining(self) -> int:
        return self.size - self.have

    def matches(self) -> bool:
        return self._h.hexdigest() == self.hexdigest

    def digest(self) -> str:
        return self._h.hexdigest()

    # -- writing -----------------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; TooLarge (nothing written) if they go past the declared size."""
        n = len(data)
        if self.have + n > self.size:
            raise TooLarge(
                f"blob {self.hexdigest[:12]}…: the source sent more than the {self.size} bytes the manifest declares"
            )
        pos = 0
        try:
            # WRITE_SLICE at a time (weightship.pagecache says why); os.write may write less.
            with memoryview(data) as view:
                while pos < n:
                    pos += os.write(self._fd, view[pos : pos + WRITE_SLICE])
        except OSError as e:
            # Drop what did land, so that the file stays exactly what was hashed.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.have)
                os.lseek(self._fd, self.have, os.SEEK_SET)
            raise write_error(e, str(self.path)) from None
        self._h.update(data)
        self.have += n

    def restart(self) -> None:
        """Drop every byte: the next source starts from zero (a server ignored a Range, or
        the whole did not verify)."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._h = hashlib.sha256()
        self.have = 0

    def flush(self) -> None:
        """Make what was appended durable (a resumed download trusts its partial file
        only after hashing it again, but a node should not lose a finished blob)."""
        if self.sync and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise write_error(e, str(self.path)) from None

    def check(self, where: str = "") -> None:
        """IntegrityError unless the partial file is the whole blob (it is then dropped)."""
        if self.have == self.size and self.matches():
            return
        got = f"{self.have} bytes" if self.have != self.size else f"sha256 {self._h.hexdigest()[:12]}…"
        self.discard()
        raise IntegrityError(f"blob {self.hexdigest[:12]}…{where} is corrupt ({got}, expected {self.size} bytes)")

    def commit(self, final: Path | str, where: str = "", *, exclusive: bool = False) -> None:
        """Verify, make read-only, and rename the partial file to ``final`` (atomic).
        ``exclusive``: never replace an existing ``final`` (a blob is written once; the one
        already there has the same name, so the same bytes). The partial file's name is
        gone before its lock is released, so nobody who waited for the lock takes it for
        a partial file still to be completed."""
        self.check(where)
        self.flush()
        os.fchmod(self._fd, 0o444)
        try:
            if not exclusive:
                os.replace(self.path, final)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(self.path, final)
                os.unlink(self.path)
        finally:
            self.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def read_capped(
    read: Callable[[int], bytes | memoryview],
    writer: BlobWriter,
    chunk: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy ``read(n)`` into ``writer`` until the source ends; return bytes appended.
    The source is asked for at most one byte past the blob's end, so a source that does
    not end (a device, a stream) costs one read past the size and fails with TooLarge."""
    n = 0
    while True:
        # append() refuses bytes past the size, so remaining is never negative.
        data = read(min(chunk, writer.remaining + 1))
        if not data:
            return n
        writer.append(data)
        n += len(data)
        if progress:
            progress(len(data))
