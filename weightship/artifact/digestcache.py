"""The digest cache: a file's sha256, remembered while the file is provably unchanged.

Republishing a model in which one shard of eight changed should cost that shard, not
the whole model. Like git's index and restic's file cache, publish remembers each file's
sha256 together with what the kernel says about the file (size, mtime and ctime in
nanoseconds, inode, device) and takes the digest from here next time when all of them
are unchanged. ctime cannot be set by any user-level call, so even a rewrite that puts
the old mtime back is noticed.

A digest is remembered only for a file whose last change (mtime and ctime) is more than
``SETTLE_NS`` older than the start of the hashing that produced it: a file still being
written, or rewritten within the clock's resolution of being hashed, is hashed again
next time ("racily clean" in git's words).

What a wrong entry could do is bounded anyway: publish hashes every byte it uploads and
refuses a blob whose bytes do not match its name, so the store never holds a blob
under a wrong digest. ``--rehash`` (publish) ignores the cache.

One JSON file per model directory (by its real path) under ``WEIGHTSHIP_CACHE_DIR``,
else ``$XDG_CACHE_HOME/weightship``, else ``~/.cache/weightship``; it is written
atomically and is only ever a hint, so a missing, corrupt or concurrently replaced
file just means hashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

SETTLE_NS = 2_000_000_000
VERSION = 1


def cache_dir() -> Path:
    explicit = os.environ.get("WEIGHTSHIP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "weightship"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class DigestCache:
    """Digests of the files of one model directory."""

    def __init__(self, root: Path, directory: Path | None = None, settle_ns: int = SETTLE_NS) -> None:
        real = os.path.realpath(root)
        self.settle_ns = settle_ns
        name = hashlib.sha256(real.encode()).hexdigest()[:32]
        self.path = (directory or cache_dir()) / "digests" / f"{name}.json"
        self._root = real
        self._entries: dict[str, list] = {}
        self._dirty = False
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(self.path.read_text())
            if doc.get("version") == VERSION and doc.get("root") == real and isinstance(doc.get("files"), dict):
                self._entries = doc["files"]

    def lookup(self, relpath: str, st: os.stat_result) -> str | None:
        """The remembered sha256 of a file, if it is unchanged since it was hashed."""
        entry = self._entries.get(relpath)
        if not entry or len(entry) != 6 or entry[:5] != _identity(st):
            return None
        return entry[5]

    def remember(self, relpath: str, st: os.stat_result, digest: str, hashed_at_ns: int) -> None:
        """Remember a digest computed from a file whose stat before hashing was ``st``."""
        if max(st.st_mtime_ns, st.st_ctime_ns) > hashed_at_ns - self.settle_ns:
            self._entries.pop(relpath, None)
            self._dirty = True
            return
        entry = [*_identity(st), digest]
        if self._entries.get(relpath) != entry:
            self._entries[relpath] = entry
            self._dirty = True

    def forget_others(self, keep: set[str]) -> None:
        gone = set(self._entries) - keep
        for rel in gone:
            del self._entries[rel]
        self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        """Write the cache if it changed; a cache that cannot be written is no error."""
        if not self._dirty:
            return
        doc = {"version": VERSION, "root": self._root, "files": self._entries}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(doc, fh, separators=(",", ":"))
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            self._dirty = False
