"""``file://`` store: the store layout on a local or mounted file system."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from weightship.errors import ConflictError, IntegrityError, NotFoundError, StoreError
from weightship.hashing import CHUNK
from weightship.manifest import check_relpath
from weightship.pagecache import write_all
from weightship.store.base import Progress, Store, blob_key


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


def copy_hashing(src, dst, h, progress: Progress | None) -> int:
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        k = src.readinto(buf)
        if not k:
            return n
        h.update(view[:k])
        write_all(dst, view[:k])
        n += k
        if progress:
            progress(k)


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
                if f.startswith(".tmp-"):
                    continue
                out.append((Path(dirpath) / f).relative_to(self.root).as_posix())
        return sorted(out)

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
        tmp = final.parent / f".tmp-{hexdigest}-{uuid.uuid4().hex[:12]}"
        h = hashlib.sha256()
        try:
            with open(src, "rb", buffering=0) as fin, open(tmp, "wb") as fout:
                n = copy_hashing(fin, fout, h, progress)
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != hexdigest:
                raise IntegrityError(
                    f"{src} changed while publishing (sha256 now {h.hexdigest()[:12]}…)",
                    "re-run publish once the file is stable",
                )
            tmp.chmod(0o444)
            # ConflictError: another writer stored the same content first, which is fine.
            with contextlib.suppress(ConflictError):
                commit(tmp, final, exclusive=True)
            return n
        except OSError as e:
            raise StoreError(f"cannot store blob {hexdigest[:12]} in {self.url}: {e.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        src = self._path(blob_key(hexdigest))
        h = hashlib.sha256()
        have = 0
        try:
            if dest.exists():
                with open(dest, "rb", buffering=0) as part:
                    have = copy_hashing(part, _Null(), h, None)
                if have > size:
                    dest.unlink()
                    h, have = hashlib.sha256(), 0
            with open(src, "rb", buffering=0) as fin, open(dest, "ab") as fout:
                fin.seek(have)
                n = copy_hashing(fin, fout, h, progress)
                fout.flush()
                if sync:
                    os.fsync(fout.fileno())
        except FileNotFoundError:
            raise NotFoundError(f"blob {hexdigest[:12]}… missing from {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read blob {hexdigest[:12]}… from {self.url}: {e.strerror}") from None
        if h.hexdigest() != hexdigest:
            dest.unlink(missing_ok=True)
            raise IntegrityError(f"blob {hexdigest[:12]}… in {self.url} is corrupt (sha256 mismatch)")
        return n

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        return f"file://{self._path(blob_key(hexdigest)).resolve()}"


class _Null:
    def write(self, data) -> int:
        return len(data)
