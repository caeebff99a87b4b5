"""``file://`` store: the store layout on a local or mounted file system."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from weightship.artifact.hashing import CHUNK
from weightship.artifact.manifest import check_relpath
from weightship.errors import ConflictError, IntegrityError, NotFoundError, StoreError
from weightship.store.base import ObjectInfo, Progress, Store, blob_key
from weightship.store.writer import BlobWriter, Busy, TooLarge, read_capped

# Uploads in flight, and interrupted ones a re-run resumes (readers skip them).
PARTIAL_PREFIX = ".partial-"
# Temporary files of atomic writes in flight (readers skip them too).
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """temp file + fsync + rename (or link, which refuses to replace, when exclusive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    commit(tmp, path, exclusive=exclusive)


def write_new_file(path: Path, data: bytes, mode: int = 0o444) -> None:
    """Write ``data`` as a new file at ``path`` by renaming a temp file over it: whatever
    ``path`` was (a hard link to a blob, say), it is replaced, never written through."""
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit(tmp: Path, path: Path, *, exclusive: bool) -> None:
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConflictError(f"{path} already exists") from None
            finally:
                tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FileStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_relpath(key)

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from None

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        try:
            atomic_write(self._path(key), data, exclusive=exclusive)
        except ConflictError:
            raise ConflictError(f"{key} already exists in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot write {key} to {self.url}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.startswith((TMP_PREFIX, PARTIAL_PREFIX)):
                    continue
                out.append((Path(dirpath) / f).relative_to(self.root).as_posix())
        return sorted(out)

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return out

    def delete_leftovers(self, older_than: datetime, *, dry_run: bool = False) -> list[ObjectInfo]:
        """``.partial-*`` blob uploads and ``.tmp-*`` files of writes that were interrupted:
        only those last written before ``older_than`` and, for a partial upload, whose
        lock no publisher holds (a publish stalled for longer keeps its bytes)."""
        if not self.root.is_dir():
            return []
        found = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if not f.startswith((TMP_PREFIX, PARTIAL_PREFIX)):
                    continue
                path = Path(dirpath) / f
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                modified = datetime.fromtimestamp(st.st_mtime, timezone.utc)
                if modified >= older_than:
                    continue
                if _unlink_unless_locked(path, dry_run=dry_run):
                    found.append(ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size, modified))
        return sorted(found, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put_blob(
        self,
        hexdigest: str,
        src: Path,
        size: int,
        progress: Progress | None = None,
        *,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        # chunk_crc32 is not needed: the copy is hashed as it is written, on this machine.
        final = self._path(blob_key(hexdigest))
        if final.exists():
            return 0
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._partial(hexdigest, size) as w:
                if final.exists():
                    # Another publisher committed it while this one waited for the lock.
                    w.discard()
                    return 0
                if not w.complete:
                    n = self._append_from(src, w, progress)
                    if not w.complete and w.have == size and n < size:
                        # What an earlier run left is not this file's prefix: once more, whole.
                        w.restart()
                        n = self._append_from(src, w, progress)
                    if not w.complete:
                        raise IntegrityError(
                            f"{src} changed while publishing (sha256 now {w.digest()[:12]}…)",
                            "re-run publish once the file is stable",
                        )
                else:
                    n = 0
                # The blob's age (prune's grace period) counts from now, not from when an
                # interrupted publish wrote the bytes this one resumed.
                os.utime(w.fileno())
                w.commit(final, exclusive=True)
                return n
        except TooLarge:
            raise IntegrityError(
                f"{src} grew while publishing (more than {size} bytes)", "re-run publish once the file is stable"
            ) from None
        except OSError as e:
            raise StoreError(f"cannot store blob {hexdigest[:12]} in {self.url}: {e.strerror}") from None

    @contextlib.contextmanager
    def _partial(self, hexdigest: str, size: int) -> Iterator[BlobWriter]:
        """The partial file of a blob upload: ``.partial-HEX`` beside the blobs, kept when
        a publish is interrupted so that the next run resumes inside the blob. A second
        publisher of the same blob at the same moment (the first holds a lock on it) writes
        a temporary file of its own instead, removed whatever happens."""
        d = self._path(blob_key(hexdigest)).parent
        try:
            w = BlobWriter(d / f"{PARTIAL_PREFIX}{hexdigest}", hexdigest, size).open(lock=True)
        except Busy:
            w = BlobWriter(d / f".tmp-{hexdigest}-{uuid.uuid4().hex[:12]}", hexdigest, size).open()
            try:
                yield w
            finally:
                w.discard()
            return
        try:
            yield w
        finally:
            w.close()

    @staticmethod
    def _append_from(src: Path, w: BlobWriter, progress: Progress | None) -> int:
        with open(src, "rb", buffering=0) as fin:
            fin.seek(w.have)
            return read_capped(fin.read, w, CHUNK, progress)

    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        src = self._path(blob_key(hexdigest))
        try:
            with BlobWriter(dest, hexdigest, size, sync=sync) as w:
                if w.complete:
                    return 0
                try:
                    with open(src, "rb", buffering=0) as fin:
                        fin.seek(w.have)
                        n = read_capped(fin.read, w, CHUNK, progress)
                except (TooLarge, FileNotFoundError):
                    w.discard()  # the store's copy is wrong, or not there: keep nothing of it
                    raise
                w.check(f" in {self.url}")
                w.flush()
                return n
        except FileNotFoundError:
            raise NotFoundError(f"blob {hexdigest[:12]}… missing from {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read blob {hexdigest[:12]}… from {self.url}: {e.strerror}") from None

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        return f"file://{self._path(blob_key(hexdigest)).resolve()}"


def _unlink_unless_locked(path: Path, *, dry_run: bool = False) -> bool:
    """Unlink ``path`` while holding its flock, so that no publisher resumes it meanwhile
    (one that opens it after the unlink creates a new file); False if a publisher holds
    it. With ``dry_run``, only whether it would be unlinked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not dry_run:
            path.unlink(missing_ok=True)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
