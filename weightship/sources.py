"""Where a node gets blob bytes from: per-blob URLs (presigned or ``file://``) or a store
opened with the node's own credentials (the origin), and the peers of its region that the
warm's plan names for a blob (:class:`Sources`). Every source resumes a partial file and
hashes while writing; a blob is handed back only if its bytes hash to its name.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from weightship.errors import IntegrityError, NotFoundError, StoreError, UsageError
from weightship.hashing import CHUNK
from weightship.pagecache import write_all

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
URL_TIMEOUT = 60.0  # no byte for this long: the fetch fails and the warm retries it

_SSL_CONTEXT: Any = None
_SSL_LOCK = threading.Lock()


def shared_ssl_context() -> Any:
    """One TLS context for every HTTP client of this process: building one loads the CA
    bundle (about 50 ms of CPU), which a status of 50 agents, or 50 agents each starting
    a warm on a small machine, would otherwise pay 50 times over."""
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            import ssl

            import certifi

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        return _SSL_CONTEXT


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

                self._client = httpx.Client(
                    timeout=httpx.Timeout(30.0, read=60.0), follow_redirects=True, verify=shared_ssl_context()
                )
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

    def _fetch_http(self, url: str, dest: Path, have: int, h, progress: Progress, hops: int = 0) -> int:
        """GET the rest of the blob with http.client, read into one reused buffer: the
        same loop as a peer transfer, for the same reason (see Sources._from_peer).
        httpx takes over where the environment names a proxy, which it knows how to use."""
        import http.client

        if uses_proxy(url):
            return self._fetch_httpx(url, dest, have, h, progress)
        u = urlsplit(url)
        conn = _connection(u, URL_TIMEOUT)
        try:
            conn.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=_range(have))
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location") and hops < 5:
                return self._fetch_http(
                    urljoin(url, resp.getheader("Location") or ""), dest, have, h, progress, hops + 1
                )
            if resp.status == 200 and have:
                # The server ignored the range: start again rather than append twice.
                dest.unlink(missing_ok=True)
                h.reset()
            elif resp.status not in (200, 206):
                raise _http_error(resp.status, url)
            buf = bytearray(self.chunk)
            view = memoryview(buf)
            with open(dest, "ab") as fout:
                return _copy(lambda _n: view[: resp.readinto(view)], fout, h, progress, self.chunk)
        except (OSError, http.client.HTTPException) as e:
            raise StoreError(f"fetching {redact(url)} failed: {type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _fetch_httpx(self, url: str, dest: Path, have: int, h, progress: Progress) -> int:
        import httpx

        try:
            with self._http().stream("GET", url, headers=_range(have)) as resp:
                if resp.status_code == 200 and have:
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


def _connection(u: SplitResult, timeout: float) -> Any:
    """An unopened http.client connection to ``u``'s host, TLS verified with the shared context."""
    import http.client

    if u.scheme == "https":
        return http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout, context=shared_ssl_context())
    return http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)


def _range(have: int) -> dict[str, str]:
    return {"Range": f"bytes={have}-"} if have else {}


def uses_proxy(url: str) -> bool:
    """Whether the environment (HTTP(S)_PROXY, NO_PROXY) routes requests to ``url``
    through a proxy."""
    import urllib.request

    u = urlsplit(url)
    return bool(urllib.request.getproxies().get(u.scheme)) and not urllib.request.proxy_bypass(u.hostname or "")


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
            write_all(dst, data)
        n += len(data)
        if progress:
            progress(len(data))
    if dst is not None:
        dst.flush()
        os.fsync(dst.fileno())
    return n


# -- peers -------------------------------------------------------------------------------

# How long a peer may wait for a blob it does not know yet to be announced by a warm that
# is starting there (the region's warms start at about the same time).
PEER_WAIT = 10
# No byte from a peer for this long: it is slow or stuck, try the next source. (An agent
# ends a stream itself after agent.PEER_STALL seconds without a new byte to send.)
PEER_READ_TIMEOUT = 30.0
# How long to sleep while a peer says a blob is queued behind its other downloads.
QUEUED_POLL = (0.1, 1.0)


class _PeerError(Exception):
    def __init__(self, reason: str, appended: int, *, leave: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.appended = appended
        self.leave = leave


class Sources:
    """A warm's sources: for each blob, the peers the plan names for it (in order), then
    the origin (``spec``: URLs or the store).

    Bytes from a peer are appended to the partial file and hashed like any others; the
    whole blob is verified at the end. A peer that fails, stalls or refuses is left for
    the rest of the warm and the next source continues from the bytes already received.
    A peer whose bytes do not verify is reported and left, and the blob is fetched again,
    whole, from the next source. A peer's own verification of what it relays does not
    matter: nothing is kept unless it hashes to the name the signed manifest gives."""

    def __init__(
        self,
        spec: dict[str, Any],
        peers: dict[str, Any] | None,
        chunk: int = URL_CHUNK,
        on_problem: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.origin = open_source(spec, chunk)
        self.nodes: dict[str, dict[str, str]] = dict((peers or {}).get("nodes") or {})
        self.blobs: dict[str, list[str]] = dict((peers or {}).get("blobs") or {})
        self.chunk = chunk
        self.on_problem = on_problem
        self.origin_bytes = 0
        self.from_peers: dict[str, int] = {}
        self.problems: list[dict[str, Any]] = []
        self._left: set[str] = set()
        self._lock = threading.Lock()

    def peers_for(self, hexdigest: str) -> list[str]:
        return [n for n in self.blobs.get(hexdigest, []) if n in self.nodes]

    def report(self) -> dict[str, Any]:
        with self._lock:
            bad = [
                {k: p.get(k) for k in ("peer", "file", "blob", "error", "corrupt")} for p in self.problems if p["leave"]
            ]
            return {"from_peers": dict(self.from_peers), "bad_peers": bad}

    def fetch(self, hexdigest: str, dest: Path, size: int, progress: Progress) -> int:
        """Complete ``dest`` from the peers named for this blob, then the origin; return
        bytes fetched. Raises IntegrityError only when the origin's own copy is corrupt."""
        names = self.peers_for(hexdigest)
        if not names:
            return self._from_origin(hexdigest, dest, size, progress)
        h = _Digest()
        have = _hash_partial(dest, size, h)
        if have == size and h.hexdigest() == hexdigest:
            return 0
        if have == size:
            dest.unlink(missing_ok=True)
            h.reset()
            have = 0
        # Bytes already in the file that no source of this call sent (an earlier warm's).
        inherited = have
        got = 0
        senders: list[str] = []
        queue = list(names)
        while queue:
            name = queue[0]
            with self._lock:
                if name in self._left:
                    queue.pop(0)
                    continue
            nxt = next((n for n in queue[1:] if n not in self._left), "the origin")
            try:
                n = self._from_peer(name, hexdigest, dest, size, have, h, progress)
            except _PeerError as e:
                have += e.appended
                got += e.appended
                if e.appended and name not in senders:
                    senders.append(name)
                self._problem(name, hexdigest, e.reason, leave=e.leave, then=f"going on from {nxt}")
                queue.pop(0)
                continue
            have += n
            got += n
            if n and name not in senders:
                senders.append(name)
            if h.hexdigest() == hexdigest:
                return got
            dest.unlink(missing_ok=True)
            h.reset()
            have = 0
            if inherited and senders == [name]:
                # What an earlier warm left may be what is wrong: the same peer once more, whole.
                inherited = 0
                senders = []
                continue
            self._blame(senders, hexdigest, then=f"fetching the blob again, whole, from {nxt}")
            senders = []
            queue.pop(0)
        try:
            return got + self._from_origin(hexdigest, dest, size, progress)
        except IntegrityError:
            if not senders and not inherited:
                raise
        # The origin's bytes completed what peers (or an earlier warm) left, and the whole
        # does not verify: fetch it all from the origin before blaming the origin.
        dest.unlink(missing_ok=True)
        n = self._from_origin(hexdigest, dest, size, progress)
        self._blame(senders, hexdigest, then="fetched it again, whole, from the origin")
        return got + n

    def _blame(self, senders: list[str], hexdigest: str, then: str) -> None:
        """Report the peers whose bytes made a copy that did not verify. A copy from one
        peer convicts it; parts from several could be any one's fault, so each of them is
        set aside for the rest of the warm without being called corrupt."""
        for s in senders:
            if len(senders) == 1:
                self._problem(s, hexdigest, "served bytes that do not match the signed sha256", corrupt=True, then=then)
            else:
                others = ", ".join(x for x in senders if x != s)
                self._problem(s, hexdigest, f"sent part of a copy that did not verify (with {others})", then=then)

    def _from_origin(self, hexdigest: str, dest: Path, size: int, progress: Progress) -> int:
        def counted(n: int) -> None:
            progress(n)
            with self._lock:
                self.origin_bytes += n

        return self.origin.fetch(hexdigest, dest, size, counted)

    def _problem(
        self, peer: str, hexdigest: str, error: str, *, leave: bool = True, corrupt: bool = False, then: str = ""
    ) -> None:
        p = {"peer": peer, "blob": hexdigest, "error": error, "corrupt": corrupt, "leave": leave, "then": then}
        with self._lock:
            self.problems.append(p)
            if leave:
                self._left.add(peer)
        if self.on_problem:
            self.on_problem(p)

    def _from_peer(self, name: str, hexdigest: str, dest: Path, size: int, have: int, h, progress: Progress) -> int:
        """Append what the peer has of the blob, from ``have`` on, to ``dest``; return the
        bytes appended, or raise _PeerError saying how many were appended before it failed.

        The standard library's http.client, reading into one reused buffer, rather than
        httpx: measured on loopback it spends 0.44 CPU-seconds per GiB against httpx's 3.7,
        and in a region every byte of the release passes through this loop on every node."""
        import http.client

        peer = self.nodes[name]
        u = urlsplit(f"{peer['url'].rstrip('/')}/v1/blobs/sha256/{hexdigest}")
        target = f"{u.path}?wait={PEER_WAIT}"
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        appended = 0
        delay = QUEUED_POLL[0]
        while True:
            pos = have + appended
            headers = {"Authorization": f"Bearer {peer['token']}"}
            if pos:
                headers["Range"] = f"bytes={pos}-"
            conn = _connection(u, PEER_READ_TIMEOUT)
            try:
                try:
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                except TimeoutError:
                    raise _PeerError(f"did not answer within {PEER_READ_TIMEOUT:g}s", appended) from None
                except (OSError, http.client.HTTPException) as e:
                    raise _PeerError(f"failed ({type(e).__name__}: {e})", appended) from None
                status = resp.status
                if status == 503:
                    # Queued behind the peer's other downloads: it will come.
                    progress(0)
                    time.sleep(delay)
                    delay = min(QUEUED_POLL[1], delay * 2)
                    continue
                if status == 404:
                    raise _PeerError("does not hold the blob", appended, leave=False)
                if status in (401, 403):
                    raise _PeerError(f"refused the peer token (HTTP {status})", appended)
                if status not in (200, 206) or (pos and status != 206):
                    raise _PeerError(f"answered HTTP {status}", appended)
                if pos and not (resp.getheader("Content-Range") or "").startswith(f"bytes {pos}-"):
                    raise _PeerError("answered another range than the one asked for", appended)
                with open(dest, "ab") as out:
                    while True:
                        try:
                            k = resp.readinto(view)
                        except TimeoutError:
                            raise _PeerError(f"sent nothing for {PEER_READ_TIMEOUT:g}s", appended) from None
                        except (OSError, http.client.HTTPException) as e:
                            raise _PeerError(f"failed ({type(e).__name__}: {e})", appended) from None
                        if not k:
                            break
                        if pos + k > size:
                            raise _PeerError("sent more bytes than the blob has", appended)
                        data = view[:k]
                        h.update(data)
                        write_all(out, data)
                        appended += k
                        pos += k
                        with self._lock:
                            self.from_peers[name] = self.from_peers.get(name, 0) + k
                        progress(k)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                conn.close()
            if pos < size:
                raise _PeerError("stopped sending before the end of the blob", appended)
            return appended

    def close(self) -> None:
        self.origin.close()


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
