"""A blob's file as an upload reads it, checked against what publish hashed.

Every store that re-reads the file to send it (object stores through obstore, registries
through httpx) reads it through :class:`CheckedFile`, so that no store can put bytes
under a blob's name that are not the ones that hash to it, even when the file changes
between hashing and sending.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from weightship.artifact.hashing import CRC_CHUNK
from weightship.errors import IntegrityError
from weightship.store.base import Progress


class CheckedFile:
    """The file in order, CRC_CHUNK at a time, checked on the way. With ``chunk_crc32``
    (the CRC32 of each CRC_CHUNK bytes, read by publish in the same pass as the sha256
    that names the blob) each chunk's CRC32 must match, so the sha256 is computed once;
    without (a digest from the digest cache), the sha256 is computed here. The last bytes
    are handed over only once the check passed and the file is known to end there;
    otherwise iterating raises, which makes the store abandon the upload, and ``error``
    says why (a store whose client swallows the exception reads it there)."""

    def __init__(
        self,
        src: Path,
        hexdigest: str,
        size: int,
        progress: Progress | None,
        chunk_crc32: Sequence[int] | None = None,
    ) -> None:
        self.src = src
        self.hexdigest = hexdigest
        self.size = size
        self.progress = progress
        expected = -(-size // CRC_CHUNK)
        self.crcs = chunk_crc32 if chunk_crc32 is not None and len(chunk_crc32) == expected else None
        self.error: IntegrityError | None = None

    def _changed(self, why: str) -> IntegrityError:
        self.error = IntegrityError(f"{self.src} changed while publishing ({why})", "re-run publish once it is stable")
        return self.error

    def __iter__(self) -> Iterator[bytes]:
        h = hashlib.sha256() if self.crcs is None else None
        done = 0
        i = 0
        with open(self.src, "rb", buffering=0) as fh:
            while done < self.size:
                want = min(CRC_CHUNK, self.size - done)
                data = fh.read(want)
                if len(data) != want:
                    raise self._changed(f"it is shorter than the {self.size} bytes hashed")
                if h is not None:
                    h.update(data)
                elif zlib.crc32(data) != self.crcs[i]:  # type: ignore[index]
                    raise self._changed(f"the MiB at offset {done} differs from the bytes hashed")
                i += 1
                done += len(data)
                if done == self.size:
                    if fh.read(1):
                        raise self._changed(f"it is longer than the {self.size} bytes hashed")
                    if h is not None and h.hexdigest() != self.hexdigest:
                        raise self._changed(f"sha256 now {h.hexdigest()[:12]}…")
                if self.progress:
                    self.progress(len(data))
                yield data

    def read_all(self) -> bytes:
        return b"".join(self)


__all__ = ["CheckedFile"]
