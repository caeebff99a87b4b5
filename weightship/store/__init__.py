"""Stores: where releases live. ``open_store(url)`` picks the implementation."""

from __future__ import annotations

from pathlib import Path

from weightship.errors import UsageError
from weightship.store.base import Store, blob_key

DEFAULT_STORE = "file://.weightship/store"

__all__ = ["DEFAULT_STORE", "Store", "blob_key", "open_store", "takes_chunk_crc32"]


def takes_chunk_crc32(url: str | None = None) -> bool:
    """Whether the store at ``url`` uploads with chunk CRC32s (see Store.put_blob), so
    that publish can record them while hashing, before the store is opened."""
    return (url or DEFAULT_STORE).startswith("s3://")


def open_store(url: str | None = None) -> Store:
    """Open ``file://PATH`` (relative paths allowed) or ``s3://BUCKET[/PREFIX]``."""
    url = url or DEFAULT_STORE
    if url.startswith("file://"):
        from weightship.store.file import FileStore

        return FileStore(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        from weightship.store.s3 import S3Store

        return S3Store.from_url(url)
    if "://" not in url:
        from weightship.store.file import FileStore

        return FileStore(Path(url))
    raise UsageError(f"unsupported store URL {url!r}", "use file://PATH or s3://BUCKET/PREFIX")
