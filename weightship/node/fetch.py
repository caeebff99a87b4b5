"""Where a node gets blob bytes from: per-blob URLs (presigned or ``file://``) or a store
opened with the node's own credentials (the origin), and the peers of its region that the
warm's plan names for a blob (:class:`Sources`; the peer protocol itself is in
:mod:`weightship.node.peers`). Every source resumes a partial file and writes through
BlobWriter, which hashes while writing; a blob is handed back only if its bytes hash to
its name.

Presigned URLs and peers are fetched over one HTTP client (:class:`HttpClient`) that
keeps connections alive from one blob to the next: a warm of 10,000 small files used to
open 10,001 connections, one per blob.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from weightship.errors import IntegrityError, NotFoundError, StoreError, UsageError
from weightship.node.metrics import NO_METER, Meter
from weightship.node.peers import HttpPeers, Peer, PeerError, PeerTransfer
from weightship.node.tls import peer_ssl_context, shared_ssl_context
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


# Idle connections kept per host: more than the warm's fetch threads (4 origin and up to
# 16 peer threads, which fall back to the origin), so that none is closed after its
# request for want of room, and another opened for the next.
POOL_SIZE = 32
# What is left of an error's or a redirect's body is read (up to this much), so that its
# connection serves the next request; a transfer cut short closes its connection instead.
DRAIN_LIMIT = 64 * 1024
REDIRECTS = (301, 302, 303, 307, 308)
MAX_HOPS = 5


@dataclass(frozen=True)
class _Route:
    """How a request for a URL goes out: ``key`` names the pool of its connections
    (scheme, host and port connected to, and what for), ``target`` is the request target,
    ``tunnel`` the (host, port) to CONNECT to through a proxy, ``headers`` the proxy's."""

    key: tuple[str, str, int, str]
    target: str
    tunnel: tuple[str, int] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class HttpClient:
    """The HTTP client of a warm's sources, for presigned URLs and peers alike: the
    standard library's http.client connections, kept alive and reused from one blob to
    the next (the idle ones pooled per host), shared by the warm's fetch threads.

    Why not urllib3's pools, which do this too: its request path percent-encodes the URL
    again in Python, byte by byte, four times per request, and a presigned URL's query
    string is several hundred bytes (more with a session token). Fetching 2-4 KB blobs
    from SeaweedFS with 4 threads, a node spent 1.3 ms of CPU per blob through urllib3,
    0.7 ms through this client (and 1.1 ms with a new connection per blob, as before);
    urllib3's readinto also copies each chunk twice more. The protocol is http.client's.

    Redirects are the caller's to follow (each hop may go through another proxy, or none),
    and failures its to retry: a request is sent once, except on a kept-alive connection
    that the server closed meanwhile, where it goes again on a new one.

    ``context`` checks the servers' certificates (origin URLs: shared_ssl_context(); peers:
    peer_ssl_context()). ``env_proxies``: requests go through the proxy HTTP_PROXY /
    HTTPS_PROXY names for their scheme unless NO_PROXY exempts the host, as for origin
    URLs (peers are reached directly, inside the region): http:// URLs are forwarded to
    it, https:// ones tunnelled through it with CONNECT, TLS still end to end."""

    def __init__(self, context: Any, *, env_proxies: bool) -> None:
        self.context = context
        self.env_proxies = env_proxies
        self._idle: dict[tuple[str, str, int, str], list[http.client.HTTPConnection]] = {}
        self._proxies: dict[tuple[str, str], str | None] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _route(self, url: str) -> _Route:
        u = urlsplit(url)
        host, https = u.hostname or "", u.scheme == "https"
        port = u.port or (443 if https else 80)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if not self.env_proxies:
            return _Route((u.scheme, host, port, ""), target)
        with self._lock:
            if (u.scheme, host) not in self._proxies:
                self._proxies[u.scheme, host] = _env_proxy(u.scheme, host)
            proxy = self._proxies[u.scheme, host]
        if proxy is None:
            return _Route((u.scheme, host, port, ""), target)
        p = urlsplit(proxy)
        if p.scheme != "http" or not p.hostname:
            shown = f"{p.scheme}://{p.hostname or ''}" + (f":{p.port}" if p.port else "")  # no credentials
            raise StoreError(
                f"cannot use the proxy {shown} for {u.scheme}:// URLs: only http:// proxies are supported",
                "name an http:// proxy in HTTP_PROXY / HTTPS_PROXY (https:// URLs are tunnelled through it)",
            )
        auth = {}
        if p.username is not None:
            pair = f"{unquote(p.username)}:{unquote(p.password or '')}"
            auth = {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        if https:
            return _Route(("http", p.hostname, p.port or 80, f"{host}:{port}"), target, (host, port), auth)
        # Forwarded: a connection to the proxy carries requests for any host.
        return _Route(("http", p.hostname, p.port or 80, "forward"), url.split("#")[0], None, auth)

    def _take(self, route: _Route, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection of ``route``'s pool (and True), else a new one (and False)."""
        with self._lock:
            idle = self._idle.get(route.key)
            conn = idle.pop() if idle else None
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
                return conn, True
            return conn, False  # closed by the server's "Connection: close": opens anew
        scheme, host, port, _ = route.key
        tls = scheme == "https" or route.tunnel is not None
        if tls:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if route.tunnel is not None:
            conn.set_tunnel(*route.tunnel, headers=route.headers)
        return conn, False

    def _give_back(self, route: _Route, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Pool ``conn`` again once ``resp`` is done with: its body read to the end, or
        the connection closed (the next request on it then opens a new one)."""
        if not resp.isclosed():
            if resp.status >= 300:
                # A short body by nature (an error, a redirect, "queued"): read, it frees the connection.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    resp.read(DRAIN_LIMIT)
            if not resp.isclosed():
                conn.close()  # what is left of the body must not be taken for the next answer
        with self._lock:
            idle = self._idle.setdefault(route.key, [])
            if not self._closed and len(idle) < POOL_SIZE:
                idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def request(
        self, method: str, url: str, headers: dict[str, str], timeout: float
    ) -> Iterator[http.client.HTTPResponse]:
        """Send a request; yield the response, its body unread (read it with ``readinto``).
        ``timeout``: for connecting, and for each read. On the way out the connection goes
        back to the pool, to carry the next request. Raises OSError (TimeoutError when the
        server is silent for ``timeout``) or http.client.HTTPException."""
        route = self._route(url)
        if route.headers and route.tunnel is None:
            headers = {**route.headers, **headers}
        for attempt in (1, 2):
            conn, reused = self._take(route, timeout)
            try:
                conn.request(method, route.target, headers=headers)
                resp = conn.getresponse()
                break
            except TimeoutError:
                conn.close()
                raise
            except (OSError, http.client.HTTPException):
                conn.close()
                if not reused or attempt == 2:
                    raise
                # The server closed this kept-alive connection as the request went out: a new one.
        try:
            yield resp
        finally:
            self._give_back(route, conn, resp)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for c in idle:
            c.close()


def _env_proxy(scheme: str, host: str) -> str | None:
    """The proxy the environment names for ``scheme``, unless NO_PROXY exempts ``host``."""
    import urllib.request

    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class UrlSource(Source):
    """Per-blob URLs: ``file://`` (inside ``file_sources``) or http(s), presigned."""

    def __init__(self, urls: dict[str, str], chunk: int = URL_CHUNK, file_sources: Path | bool = True) -> None:
        self.urls = urls
        self.chunk = chunk
        self.file_sources = file_sources
        self.http = HttpClient(shared_ssl_context(), env_proxies=True)
        self._local = threading.local()

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

    def _fetch_http(self, url: str, w: BlobWriter, progress: Progress) -> int:
        """GET the rest of the blob (a Range from the bytes already here), following up to
        MAX_HOPS redirects, into one reused buffer per thread: the same loop as a peer
        transfer, for the same reason (see peers.HttpPeers)."""
        # This thread's buffer, grown to the largest read asked for (a chunk at most).
        need = min(w.size + 1, self.chunk)
        view = getattr(self._local, "view", None)
        if view is None or len(view) < need:
            view = self._local.view = memoryview(bytearray(need))
        where, bearer = _bearer(url)
        origin = urlsplit(where).netloc
        try:
            for hops in range(MAX_HOPS + 1):
                headers = _range(w.have)
                if bearer and urlsplit(where).netloc == origin:
                    # Never after a redirect elsewhere (a registry's storage gets no token).
                    headers = {**headers, "Authorization": f"Bearer {bearer}"}
                with self.http.request("GET", where, headers, URL_TIMEOUT) as resp:
                    location = resp.getheader("Location")
                    if resp.status in REDIRECTS and location and hops < MAX_HOPS:
                        where = urljoin(where, location)
                        continue
                    if resp.status == 200 and w.have:
                        # The server ignored the range: start again rather than append twice.
                        w.restart()
                    elif resp.status not in (200, 206):
                        raise _http_error(resp.status, where)
                    return read_capped(lambda n: view[: resp.readinto(view[:n])], w, self.chunk, progress)
        except (OSError, http.client.HTTPException) as e:
            raise StoreError(f"fetching {redact(where)} failed: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def _bearer(url: str) -> tuple[str, str | None]:
    """Split off a ``#bearer=TOKEN`` fragment: a registry blob URL carries the pull-only
    token a registry takes in a header only (docs/format.md, OCI registries), where no
    client sends a fragment. Returns (the URL without it, the token or None)."""
    base, _, fragment = url.partition("#")
    if fragment.startswith("bearer="):
        return base, fragment[len("bearer=") :]
    return url, None


def _range(have: int) -> dict[str, str]:
    return {"Range": f"bytes={have}-"} if have else {}


def _http_error(status: int, url: str) -> StoreError:
    if status == 404:
        return NotFoundError(f"{redact(url)} returned 404: the blob is missing from the store")
    if status in (401, 403):
        return StoreError(f"{redact(url)} refused the request ({status}): the presigned URL expired or is wrong")
    return StoreError(f"{redact(url)} returned HTTP {status}")


# -- a warm's sources: peers, then the origin ------------------------------------------


class Sources:
    """A warm's sources: for each blob, the peers the plan names for it (in order), then
    the origin (``spec``: URLs or the store).

    Bytes from a peer are appended to the partial file and hashed like any others; the
    whole blob is verified at the end. A peer that fails, stalls or refuses is left for
    the rest of the warm and the next source continues from the bytes already received.
    A peer whose bytes do not verify is reported and left, and the blob is fetched again,
    whole, from the next source. A peer's own verification of what it relays does not
    matter: nothing is kept unless it hashes to the name the signed manifest gives.

    ``transfer`` moves bytes from a peer (default: HttpPeers, the agents' blob endpoint
    over HTTP with the --tls-ca roots); a test passes a scripted one. ``meter`` is told
    every byte appended, by source, and every copy that did not verify (the agent's
    metrics), at the same places that count the warm's own report."""

    def __init__(
        self,
        spec: dict[str, Any],
        peers: dict[str, Any] | None,
        chunk: int = URL_CHUNK,
        on_problem: Callable[[dict[str, Any]], None] | None = None,
        file_sources: Path | bool = True,
        transfer: PeerTransfer | None = None,
        meter: Meter = NO_METER,
    ) -> None:
        self.origin = open_source(spec, chunk, file_sources)
        self.meter = meter
        self.nodes: dict[str, Peer] = {
            name: Peer(name, node["url"], node["token"]) for name, node in ((peers or {}).get("nodes") or {}).items()
        }
        self.blobs: dict[str, list[str]] = dict((peers or {}).get("blobs") or {})
        self.transfer = transfer or HttpPeers(HttpClient(peer_ssl_context(), env_proxies=False), chunk)
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
                except PeerError as e:
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
                # The peer sent the blob to its end and the whole does not hash to its name.
                self.meter.verify_failed("peer")
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
            return got + self._from_origin(hexdigest, dest, size, progress, mixed=bool(senders))
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
                self.transfer.report_corrupt(self.nodes[s], hexdigest)
            else:
                others = ", ".join(x for x in senders if x != s)
                self._problem(s, hexdigest, f"sent part of a copy that did not verify (with {others})", then=then)

    def _from_origin(self, hexdigest: str, dest: Path, size: int, progress: Progress, *, mixed: bool = False) -> int:
        """``mixed``: peers sent the first part of the copy the origin completes, so a copy
        that does not verify is counted against them."""

        def counted(n: int) -> None:
            progress(n)
            with self._lock:
                self.origin_bytes += n
            self.meter.fetched("store", n)

        try:
            return self.origin.fetch(hexdigest, dest, size, counted)
        except IntegrityError:
            self.meter.verify_failed("peer" if mixed else "store")
            raise

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

    def _from_peer(self, name: str, hexdigest: str, w: BlobWriter, progress: Progress) -> int:
        def counted(n: int) -> None:
            if n:
                with self._lock:
                    self.from_peers[name] = self.from_peers.get(name, 0) + n
                self.meter.fetched("peer", n)
            progress(n)

        return self.transfer.fetch(self.nodes[name], hexdigest, w, counted)

    def close(self) -> None:
        try:
            self.origin.close()
        finally:
            self.transfer.close()


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
