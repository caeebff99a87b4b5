"""The store interface: small immutable objects plus content-addressed blobs.

Keys are ``/``-separated and relative (``releases/NAME/VERSION/manifest.json``,
``tags/NAME/TAG``, ``blobs/sha256/HEX``); the layout is in docs/format.md. Every
implementation keeps three promises: a write is all-or-nothing, an ``exclusive``
write never replaces an existing object, and a blob is never stored or handed to a
caller unless its bytes hash to its name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from weightship.errors import NotFoundError, StoreError
from weightship.store.layout import BLOB_PREFIX, blob_key, removed_key

Progress = Callable[[int], None]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a listing reports it; ``modified`` is the store's own clock (file
    mtime, object Last-Modified), timezone-aware, so ages are never measured against
    this machine's clock alone."""

    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class BlobInfo:
    hexdigest: str
    size: int
    modified: datetime


class Store(ABC):
    url: str

    @abstractmethod
    def read(self, key: str) -> bytes:
        """Return an object's bytes; NotFoundError when absent."""

    @abstractmethod
    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write an object atomically; with ``exclusive``, ConflictError if it exists."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key below ``prefix`` (a folder-like prefix ending in ``/``), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def has_blob(self, hexdigest: str) -> bool:
        return self.exists(blob_key(hexdigest))

    @abstractmethod
    def put_blob(
        self,
        hexdigest: str,
        src: Path,
        size: int,
        progress: Progress | None = None,
        *,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        """Upload a file as a blob unless the store has it; return bytes sent.

        The bytes sent are checked against what was hashed, and if they are not the ones
        that hash to ``hexdigest`` the upload is abandoned with IntegrityError and nothing
        becomes visible. ``chunk_crc32`` (the CRC32 of each hashing.CRC_CHUNK bytes, read in
        the same pass as ``hexdigest``) lets a store that reads the file again check it
        chunk by chunk instead of hashing it a second time."""

    @abstractmethod
    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        """Download a blob into ``dest`` (a partial file: bytes already there are kept and
        not fetched again); return bytes fetched. Raises IntegrityError, after deleting
        ``dest``, when the result does not hash to ``hexdigest``. With ``sync`` the bytes
        are on disk (fsync) before it returns; without, they may still be in the page
        cache, for callers that verify again after a crash."""

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        """A URL a node may GET the blob from without credentials, if the store has one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def scoped(self, name: str) -> Store:
        """The store as the blobs of release ``name`` are read and written. Itself, but
        for a registry (``oci://``), which keeps blobs per repository: there, publish,
        pull and warm call the blob methods on the store this returns."""
        return self

    # -- deleting (rm, prune; docs/format.md "Deleting: rm and prune") --------------------

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Every object below ``prefix`` with its size and last-modified time, sorted by
        key: what prune needs to leave young objects alone. Stores that cannot say how
        old an object is do not support prune."""
        raise StoreError(f"{self.url} cannot list objects with their ages", "prune is not supported for this store")

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every committed blob: hexdigest, size, last-modified time."""
        for info in self.list_info(BLOB_PREFIX):
            hexdigest = info.key[len(BLOB_PREFIX) :]
            if _HEX64.match(hexdigest):
                yield BlobInfo(hexdigest, info.size, info.modified)

    def remember_removed(self, name: str, version: str, record: bytes) -> None:
        """Keep ``record`` (what ``rm`` removed) for as long as the store lives: a version
        removed once can then be published again only with the very same files."""
        self.write(removed_key(name, version), record)

    def removed_record(self, name: str, version: str) -> bytes | None:
        """What :meth:`remember_removed` kept for ``NAME:VERSION``, or None."""
        try:
            return self.read(removed_key(name, version))
        except NotFoundError:
            return None

    def delete_leftovers(self, older_than: datetime, *, dry_run: bool = False) -> list[ObjectInfo]:
        """Delete what interrupted writes left in the store and readers never see (partial
        uploads, temporary files) last modified before ``older_than`` and not being
        written now; return them. None by default: object stores keep unfinished uploads
        out of sight, and their lifecycle rules remove them."""
        return []
