"""A node cache directory: its layout, its records, its lock and its tags.

This is the layer every part of the engine stands on (the warm pipeline, space, integrity,
and :class:`weightship.node.cache.NodeCache` on top of them); it knows nothing of them.
Layout (docs/format.md, DESIGN.md)::

    <cache>/blobs/sha256/<hex>                 verified blobs, read-only
    <cache>/models/<name>/<version>/<files…>   hard links into blobs/
    <cache>/models/<name>/<tag> -> <version>   symlink, switched by rename
    <cache>/state/releases/<name>/<version>/   record.json, manifest.json, model.sig
    <cache>/state/partial/<hex>                interrupted downloads, resumed
    <cache>/state/staging/                     trees being linked, tags being switched
    <cache>/state/quarantine/<hex>             blobs found corrupt, kept for a post-mortem
    <cache>/state/reserve                      space held back to record a failure
    <cache>/state/lock                         flock: one warm, gc or verify at a time

A record (``record.json``) is what the node knows of one release: its digest, state
(:data:`weightship.node.protocol.STATES`), signer, when it was warmed, whether it is pinned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from weightship.artifact import refs
from weightship.artifact.manifest import Manifest
from weightship.errors import NotFoundError, UsageError, WeightshipError
from weightship.node.arrivals import Arrivals
from weightship.trust.policy import TrustPolicy

# Allocated in state/reserve, and released to record a failure when the disk is full.
RECORD_RESERVE = 256 * 1024

Record = dict[str, Any]


def now() -> float:
    return time.time()


def size_of(p: Path) -> int:
    """The size of a file, 0 when there is none."""
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable, where the file system allows it."""
    from weightship.store.file import fsync_dir as fsync

    with contextlib.suppress(OSError):
        fsync(path)


class CacheLayout:
    """One node cache directory. ``policy`` is the node's own trust policy: it is applied
    to every warm whatever the caller asked for, and a caller cannot weaken it."""

    def __init__(
        self,
        root: Path | str,
        *,
        policy: TrustPolicy | None = None,
        capacity: int | None = None,
        file_sources: Path | bool = True,
    ) -> None:
        self.root = Path(root)
        self.policy = policy or TrustPolicy()
        self.capacity = capacity
        # Which file:// sources a warm request may name: any (ssh and local nodes, whose
        # caller already runs code as this user), none, or only files below one directory
        # (an agent, whose callers hold only its token: its own store).
        self.file_sources = file_sources
        self.blobs = self.root / "blobs" / "sha256"
        self.models = self.root / "models"
        self.state = self.root / "state"
        self.releases = self.state / "releases"
        self.partial = self.state / "partial"
        self.staging = self.state / "staging"
        self.quarantine = self.state / "quarantine"
        # Space held back so that a warm that fills the disk can still record why it failed.
        self.reserve = self.state / "reserve"
        self.lock_path = self.state / "lock"
        self.arrivals = Arrivals()

    def ensure(self) -> None:
        """Create the cache's directories (and its reserve) if they are not there yet."""
        try:
            for d in (self.blobs, self.models, self.releases, self.partial, self.staging):
                d.mkdir(parents=True, exist_ok=True)
            self.hold_reserve()
        except OSError as e:
            raise UsageError(
                f"cannot create the cache in {self.root}: {e.strerror}", "check --cache and its permissions"
            ) from None

    def hold_reserve(self) -> None:
        """Keep ``state/reserve`` allocated: when a warm fills the disk, it is given back so
        that the failure (and the records of a repair) can still be written."""
        try:
            if size_of(self.reserve) >= RECORD_RESERVE:
                return
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RECORD_RESERVE)
            finally:
                os.close(fd)
        except OSError:
            # No room for it now (the disk is full): the next warm or gc tries again.
            self.reserve.unlink(missing_ok=True)

    # -- records -------------------------------------------------------------------

    def release_dir(self, name: str, version: str) -> Path:
        return self.releases / name / version

    def read_record(self, name: str, version: str) -> Record | None:
        try:
            return json.loads((self.release_dir(name, version) / "record.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            return None

    def write_record(self, rec: Record) -> None:
        from weightship.store.file import atomic_write

        rec["updated"] = now()
        atomic_write(self.release_dir(rec["name"], rec["version"]) / "record.json", json.dumps(rec, indent=1).encode())

    def records(self) -> list[Record]:
        """Every release this cache has a record of, by name and version."""
        out: list[Record] = []
        if not self.releases.is_dir():
            return out
        for ndir in sorted(self.releases.iterdir()):
            for vdir in sorted(ndir.iterdir()) if ndir.is_dir() else []:
                rec = self.read_record(ndir.name, vdir.name)
                if rec:
                    out.append(rec)
        return out

    def manifest(self, name: str, version: str) -> Manifest | None:
        """The manifest a release was warmed from, None when it is missing or unreadable."""
        try:
            data = (self.release_dir(name, version) / "manifest.json").read_bytes()
        except OSError:
            return None
        try:
            return Manifest.from_bytes(data)
        except WeightshipError:
            return None

    def locate(self, ref: str) -> tuple[str, str]:
        """(name, version) of NAME:VERSION or NAME:TAG, which must have a record here."""
        r = refs.Ref.parse(ref)
        if r.label is None:
            raise UsageError("pass NAME:VERSION or NAME:TAG")
        version = self.tags(r.name).get(r.label, r.label)
        if self.read_record(r.name, version) is None:
            raise NotFoundError(f"{r} is not in the cache {self.root}", "warm it first")
        return r.name, version

    def tags(self, name: str) -> dict[str, str]:
        """Tag -> version, as the symlinks under models/NAME say."""
        d = self.models / name
        out = {}
        if d.is_dir():
            for p in d.iterdir():
                if p.is_symlink():
                    out[p.name] = os.readlink(p)
        return out

    # -- space ---------------------------------------------------------------------

    def used_bytes(self) -> int:
        total = 0
        for d in (self.blobs, self.partial):
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(d):
                    with contextlib.suppress(FileNotFoundError):
                        total += e.stat(follow_symlinks=False).st_size
        return total

    def free_bytes(self, capacity: int | None = None) -> int:
        """Free space on the cache's disk, less what a capacity leaves to others."""
        capacity = capacity or self.capacity
        probe = self.root if self.root.exists() else self.root.parent
        free = shutil.disk_usage(probe).free
        if capacity:
            free = min(free, max(0, capacity - self.used_bytes()))
        return free

    # -- the lock ------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[str], None] | None = None, run_id: str = "") -> Iterator[None]:
        """Exclusive per-cache lock. flock is per open file, so two threads of one agent
        exclude each other as two processes do; a killed holder releases it at once."""
        self.ensure()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                who = f" (pid {holder[0]})" if holder else ""
                if on_wait:
                    on_wait(f"waiting for another warm, gc or verify of this cache to finish{who}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {run_id}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def holder_run(self) -> str | None:
        """The run id holding the lock now, or None when nobody holds it."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                parts = os.pread(fd, 200, 0).decode(errors="replace").split()
                return parts[1] if len(parts) > 1 else ""
            return None
        finally:
            os.close(fd)


__all__ = ["RECORD_RESERVE", "CacheLayout", "Record", "fsync_dir", "now", "size_of"]
