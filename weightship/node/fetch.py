"""Where a node gets blob bytes from: per-blob URLs (presigned or ``file://``) or a store
opened with the node's own credentials (the origin), and the peers of its region that the
warm's plan names for a blob (:class:`Sources`). Every source resumes a partial file and
hashes while writing; a blob is handed back only if its bytes hash to its name.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from weightship.errors import IntegrityError, NotFoundError, StoreError, UsageError
from weightship.store.writer import BlobWriter, TooLarge, read_capped

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


_PEER_CONTEXT: Any = None


def configure_tls_ca(path: Path | str) -> None:
    """Make the CA certificates in ``path`` (PEM) the only roots a peer's certificate may
    chain to (``agent serve --tls-ca``): a region's agents serve certificates of a private
    CA, and a certificate some public CA issued for a peer's address must not pass. Origin
    URLs (presigned links to public object stores) keep the system's roots."""
    import ssl

    global _PEER_CONTEXT
    # PROTOCOL_TLS_CLIENT checks certificates and host names, and trusts no root but ours.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise UsageError(f"CA file {path} not found") from None
    except ssl.SSLError as e:  # an OSError too: caught first
        raise UsageError(f"{path} holds no PEM CA certificate ({e.reason or e})") from None
    except OSError as e:
        raise UsageError(f"cannot read CA file {path}: {e.strerror}") from None
    with _SSL_LOCK:
        _PEER_CONTEXT = ctx


def peer_ssl_context() -> Any:
    """The TLS context https peers are checked with: the --tls-ca roots, else the shared one."""
    return _PEER_CONTEXT if _PEER_CONTEXT is not None else shared_ssl_context()


def open_source(spec: dict[str, Any], chunk: int = URL_CHUNK, file_sources: Path | bool = True) -> Source:
    """``{"urls": {HEX: URL}}`` or ``{"store": URL}``, as a warm request carries it.
    ``file_sources`` says which local files a request may name (NodeCache.file_sources)."""
    if not isinstance(spec, dict):
        raise UsageError("warm request: source must be an object")
    if "urls" in spec:
        urls = spec["urls"]
        if not isinstance(urls, dict) or not all(isinstance(v, str) for v in urls.values()):
            raise UsageError("warm request: source.urls must map sha256 to URL")
        return UrlSource(urls, chunk, file_sources)
    if "store" in spec and isinstance(spec["store"], str):
        return StoreSource(spec["store"], file_sources)
    raise UsageError("warm request: source needs urls or store")


def check_local_path(path: Path, allowed: Path | bool) -> Path:
    """``path`` resolved, if a warm request may read it: a node serving callers who hold
    only its token (an agent) reads local files inside its own store and nowhere else,
    so a request cannot make it copy ``/dev/zero`` or another user's secrets."""
    if allowed is True:
        return path
    real = Path(os.path.realpath(path))
    if allowed is False:
        raise UsageError(
            f"this node does not read local files ({path}) for a warm request",
            "start the agent with --store naming the store it may read, or warm with presigned URLs",
        )
    root = Path(os.path.realpath(allowed))
    if real != root and root not in real.parents:
        raise UsageError(
            f"{path} is outside this node's store {root}",
            "warm from the store the agent was started with (--store)",
        )
    return real


class StoreSource(Source):
    """The node reads the store itself, with its own credentials (``--credentials node``)."""

    def __init__(self, url: str, file_sources: Path | bool = True) -> None:
        from weightship.store import open_store

        if file_sources is not True and (url.startswith("file://") or "://" not in url):
            check_local_path(Path(url.removeprefix("file://")), file_sources)
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
    def __init__(self, urls: dict[str, str], chunk: int = URL_CHUNK, file_sources: Path | bool = True) -> None:
        self.urls = urls
        self.chunk = chunk
        self.file_sources = file_sources
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
        with BlobWriter(dest, hexdigest, size) as w:
            if w.complete:
                return 0
            if url.startswith("file://"):
                n = self._fetch_file(url, w, progress)
            elif url.startswith(("http://", "https://")):
                n = self._fetch_http(url, w, progress)
            else:
                raise UsageError(f"unsupported blob URL scheme in {redact(url)}")
            w.check(f" from {redact(url)}")
            w.flush()
        return n

    def _fetch_file(self, url: str, w: BlobWriter, progress: Progress) -> int:
        path = check_local_path(Path(unquote(urlsplit(url).path)), self.file_sources)
        try:
            with open(path, "rb", buffering=0) as fin:
                fin.seek(w.have)
                return read_capped(fin.read, w, self.chunk, progress)
        except FileNotFoundError:
            raise NotFoundError(
                f"{path} not found on this node", "use --credentials node or a store nodes can reach"
            ) from None
        except TooLarge:
            raise
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None

    def _fetch_http(self, url: str, w: BlobWriter, progress: Progress, hops: int = 0) -> int:
        """GET the rest of the blob with http.client, read into one reused buffer: the
        same loop as a peer transfer, for the same reason (see Sources._from_peer).
        httpx takes over where the environment names a proxy, which it knows how to use."""
        import http.client

        if uses_proxy(url):
            return self._fetch_httpx(url, w, progress)
        u = urlsplit(url)
        conn = _connection(u, URL_TIMEOUT)
        try:
            conn.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=_range(w.have))
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location") and hops < 5:
                return self._fetch_http(urljoin(url, resp.getheader("Location") or ""), w, progress, hops + 1)
            if resp.status == 200 and w.have:
                # The server ignored the range: start again rather than append twice.
                w.restart()
            elif resp.status not in (200, 206):
                raise _http_error(resp.status, url)
            buf = bytearray(self.chunk)
            view = memoryview(buf)
            return read_capped(lambda n: view[: resp.readinto(view[:n])], w, self.chunk, progress)
        except (OSError, http.client.HTTPException) as e:
            raise StoreError(f"fetching {redact(url)} failed: {type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _fetch_httpx(self, url: str, w: BlobWriter, progress: Progress) -> int:
        import httpx

        try:
            with self._http().stream("GET", url, headers=_range(w.have)) as resp:
                if resp.status_code == 200 and w.have:
                    w.restart()
                elif resp.status_code not in (200, 206):
                    raise _http_error(resp.status_code, url)
                it = resp.iter_raw(self.chunk)
                return read_capped(lambda _n: next(it, b""), w, self.chunk, progress)
        except httpx.HTTPError as e:
            raise StoreError(f"fetching {redact(url)} failed: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _connection(u: SplitResult, timeout: float, context: Any = None) -> Any:
    """An unopened http.client connection to ``u``'s host, TLS verified with ``context``
    (default: the shared context)."""
    import http.client

    if u.scheme == "https":
        ctx = context or shared_ssl_context()
        return http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout, context=ctx)
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
        file_sources: Path | bool = True,
    ) -> None:
        self.origin = open_source(spec, chunk, file_sources)
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
        got = 0
        senders: list[str] = []
        with BlobWriter(dest, hexdigest, size) as w:
            if w.complete:
                return 0
            # Bytes already in the file that no source of this call sent (an earlier warm's).
            inherited = w.have
            queue = list(names)
            while queue:
                name = queue[0]
                with self._lock:
                    if name in self._left:
                        queue.pop(0)
                        continue
                nxt = next((n for n in queue[1:] if n not in self._left), "the origin")
                try:
                    n = self._from_peer(name, hexdigest, w, progress)
                except _PeerError as e:
                    got += e.appended
                    if e.appended and name not in senders:
                        senders.append(name)
                    self._problem(name, hexdigest, e.reason, leave=e.leave, then=f"going on from {nxt}")
                    queue.pop(0)
                    continue
                got += n
                if n and name not in senders:
                    senders.append(name)
                if w.complete:
                    w.flush()
                    return got
                w.restart()
                if inherited and senders == [name]:
                    # What an earlier warm left may be what is wrong: the same peer once more, whole.
                    inherited = 0
                    senders = []
                    continue
                self._blame(senders, hexdigest, then=f"fetching the blob again, whole, from {nxt}")
                senders = []
                queue.pop(0)
            # What peers appended stays for the origin to go on from.
            w.flush()
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
                self._report_corrupt(s, hexdigest)
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

    def _report_corrupt(self, name: str, hexdigest: str) -> None:
        """Tell a peer that the copy it served did not verify, so that it re-hashes its own
        (and quarantines it if the bit rot is there, not on the wire). Best effort: the
        peer answers at once and checks in the background; its answer changes nothing here."""
        import http.client

        peer = self.nodes[name]
        u = urlsplit(f"{peer['url'].rstrip('/')}/v1/blobs/sha256/{hexdigest}/check")
        conn = _connection(u, 5.0, peer_ssl_context())
        try:
            conn.request("POST", u.path, headers={"Authorization": f"Bearer {peer['token']}"})
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    def _from_peer(self, name: str, hexdigest: str, w: BlobWriter, progress: Progress) -> int:
        """Append what the peer has of the blob to ``w``; return the bytes appended, or
        raise _PeerError saying how many were appended before it failed.

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
        size = w.size
        while True:
            pos = w.have
            headers = {"Authorization": f"Bearer {peer['token']}"}
            if pos:
                headers["Range"] = f"bytes={pos}-"
            conn = _connection(u, PEER_READ_TIMEOUT, peer_ssl_context())
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
                while True:
                    try:
                        k = resp.readinto(view)
                    except TimeoutError:
                        raise _PeerError(f"sent nothing for {PEER_READ_TIMEOUT:g}s", appended) from None
                    except (OSError, http.client.HTTPException) as e:
                        raise _PeerError(f"failed ({type(e).__name__}: {e})", appended) from None
                    if not k:
                        break
                    try:
                        w.append(view[:k])
                    except TooLarge:
                        raise _PeerError("sent more bytes than the blob has", appended) from None
                    appended += k
                    pos += k
                    with self._lock:
                        self.from_peers[name] = self.from_peers.get(name, 0) + k
                    progress(k)
                w.flush()
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
