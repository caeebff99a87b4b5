"""Where a node gets blob bytes from: per-blob URLs (presigned or ``file://``) or a store
opened with the node's own credentials. Every source resumes a partial file and hashes
while writing; a blob is handed back only if its bytes hash to its name.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from weightship.errors import IntegrityError, NotFoundError, StoreError, UsageError
from weightship.hashing import CHUNK

Progress = Callable[[int], None]


class Source:
    def fetch(self, hexdigest: str, dest: Path, size: int, progress: Progress) -> int:
        """Complete the partial file ``dest``; return bytes fetched (not those reused)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# Reads from a URL: small enough that progress and a rate limit move smoothly, large
# enough not to cost throughput.
URL_CHUNK = 1024 * 1024


def open_source(spec: dict[str, Any], chunk: int = URL_CHUNK) -> Source:
    """``{"urls": {HEX: URL}}`` or ``{"store": URL}``, as a warm request carries it."""
    if not isinstance(spec, dict):
        raise UsageError("warm request: source must be an object")
    if "urls" in spec:
        urls = spec["urls"]
        if not isinstance(urls, dict) or not all(isinstance(v, str) for v in urls.values()):
            raise UsageError("warm request: source.urls must map sha256 to URL")
        return UrlSource(urls, chunk)
    if "store" in spec and isinstance(spec["store"], str):
        return StoreSource(spec["store"])
    raise UsageError("warm request: source needs urls or store")


class StoreSource(Source):
    """The node reads the store itself, with its own credentials (``--credentials node``)."""

    def __init__(self, url: str) -> None:
        from weightship.store import open_store

        self.store = open_store(url)

    def fetch(self, hexdigest: str, dest: Path, size: int, progress: Progress) -> int:
        return self.store.get_blob(hexdigest, dest, size, progress)

    def close(self) -> None:
        self.store.close()


def redact(url: str) -> str:
    """A URL fit for a message: a presigned query string is a credential."""
    u = urlsplit(url)
    return u._replace(query="", fragment="").geturl() + ("?…" if u.query else "")


class UrlSource(Source):
    def __init__(self, urls: dict[str, str], chunk: int = URL_CHUNK) -> None:
        self.urls = urls
        self.chunk = chunk
        self._client = None
        self._lock = threading.Lock()

    def _http(self):
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(timeout=httpx.Timeout(30.0, read=60.0), follow_redirects=True)
            return self._client

    def fetch(self, hexdigest: str, dest: Path, size: int, progress: Progress) -> int:
        url = self.urls.get(hexdigest)
        if not url:
            raise UsageError(f"warm request has no URL for blob {hexdigest[:12]}…")
        h = _Digest()
        have = _hash_partial(dest, size, h)
        if have != 0 and have == size and h.hexdigest() == hexdigest:
            return 0
        if have == size:
            h.reset()
            have = 0
            dest.unlink(missing_ok=True)
        if url.startswith("file://"):
            n = self._fetch_file(url, dest, have, h, progress)
        elif url.startswith(("http://", "https://")):
            n = self._fetch_http(url, dest, have, h, progress)
        else:
            raise UsageError(f"unsupported blob URL scheme in {redact(url)}")
        if h.hexdigest() != hexdigest:
            dest.unlink(missing_ok=True)
            raise IntegrityError(f"blob {hexdigest[:12]}… from {redact(url)} is corrupt (sha256 mismatch)")
        return n

    def _fetch_file(self, url: str, dest: Path, have: int, h, progress: Progress) -> int:
        path = Path(unquote(urlsplit(url).path))
        try:
            with open(path, "rb", buffering=0) as fin, open(dest, "ab") as fout:
                fin.seek(have)
                return _copy(fin.read, fout, h, progress, self.chunk)
        except FileNotFoundError:
            raise NotFoundError(
                f"{path} not found on this node", "use --credentials node or a store nodes can reach"
            ) from None

    def _fetch_http(self, url: str, dest: Path, have: int, h, progress: Progress) -> int:
        import httpx

        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._http().stream("GET", url, headers=headers) as resp:
                if resp.status_code == 200 and have:
                    # The server ignored the range: start again rather than append twice.
                    dest.unlink(missing_ok=True)
                    h.reset()
                elif resp.status_code not in (200, 206):
                    raise _http_error(resp.status_code, url)
                with open(dest, "ab") as fout:
                    it = resp.iter_raw(self.chunk)
                    return _copy(lambda _n: next(it, b""), fout, h, progress, self.chunk)
        except httpx.HTTPError as e:
            raise StoreError(f"fetching {redact(url)} failed: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _http_error(status: int, url: str) -> StoreError:
    if status == 404:
        return NotFoundError(f"{redact(url)} returned 404: the blob is missing from the store")
    if status in (401, 403):
        return StoreError(f"{redact(url)} refused the request ({status}): the presigned URL expired or is wrong")
    return StoreError(f"{redact(url)} returned HTTP {status}")


class _Digest:
    """sha256 that can start over (when a server ignores a Range request)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _hash_partial(dest: Path, size: int, h) -> int:
    """Hash what an interrupted fetch left, so resuming never reads the source twice."""
    try:
        with open(dest, "rb", buffering=0) as part:
            have = _copy(part.read, None, h, None)
    except FileNotFoundError:
        return 0
    if have > size:
        dest.unlink()
        h.reset()
        return 0
    return have


def _copy(read: Callable[[int], bytes], dst, h, progress: Progress | None, chunk: int = CHUNK) -> int:
    n = 0
    while True:
        data = read(chunk)
        if not data:
            break
        h.update(data)
        if dst is not None:
            dst.write(data)
        n += len(data)
        if progress:
            progress(len(data))
    if dst is not None:
        dst.flush()
        os.fsync(dst.fileno())
    return n


class RateLimit:
    """A token bucket shared by a warm's fetch threads (``max_rate`` bytes/s), so warming
    does not take the bandwidth a node's serving traffic needs."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._allowance = 0.0
        self._last = time.monotonic()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._allowance / self.rate if self._allowance < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
