"""Stores: where releases live. ``open_store(url)`` picks the implementation."""

from __future__ import annotations

from pathlib import Path

from weightship.errors import UsageError
from weightship.store.base import Store, blob_key

DEFAULT_STORE = "file://.weightship/store"
OBJECT_SCHEMES = ("s3://", "az://")

__all__ = ["DEFAULT_STORE", "Store", "blob_key", "open_store", "takes_chunk_crc32"]


def takes_chunk_crc32(url: str | None = None) -> bool:
    """Whether the store at ``url`` checks uploads against chunk CRC32s (see
    Store.put_blob), so that publish records them while hashing, before the store is
    opened: object stores and registries read each file a second time to send it."""
    return (url or DEFAULT_STORE).startswith((*OBJECT_SCHEMES, "oci://"))


def open_store(url: str | None = None) -> Store:
    """Open ``file://PATH`` (relative paths allowed), ``s3://BUCKET[/PREFIX]``,
    ``az://CONTAINER[/PREFIX]`` or ``oci://HOST[:PORT]/NAMESPACE`` (an OCI registry).
    obstore (and boto3) are imported only here, for an object store: commands that touch
    no store load neither."""
    url = url or DEFAULT_STORE
    if url.startswith("file://"):
        from weightship.store.file import FileStore

        return FileStore(Path(url[len("file://") :]))
    if url.startswith(OBJECT_SCHEMES):
        from weightship.store.object import ObjectStore

        return ObjectStore.from_url(url)
    if url.startswith("oci://"):
        from weightship.store.oci import OciStore

        return OciStore.from_url(url)
    if "://" not in url:
        from weightship.store.file import FileStore

        return FileStore(Path(url))
    raise UsageError(
        f"unsupported store URL {url!r}",
        "use file://PATH, s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or oci://HOST/NAMESPACE",
    )
