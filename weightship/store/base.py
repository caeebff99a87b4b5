"""The store interface: small immutable objects plus content-addressed blobs.

Keys are ``/``-separated and relative (``releases/NAME/VERSION/manifest.json``,
``tags/NAME/TAG``, ``blobs/sha256/HEX``); the layout is in docs/format.md. Every
implementation keeps three promises: a write is all-or-nothing, an ``exclusive``
write never replaces an existing object, and a blob is never stored or handed to a
caller unless its bytes hash to its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

from weightship.store.layout import blob_key

Progress = Callable[[int], None]


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
