"""``weightship agent serve``: the node engine behind a small HTTP API.

Every endpoint, including unknown paths, answers 401 without the bearer token. The API
(all JSON; events are NDJSON, one engine event per line)::

    GET  /v1/health                      {"ok": true, "weightship": VERSION, "protocol": N}
    POST /v1/warm          request JSON  202 {"job": ID}; 400 if the request is refused
    POST /v1/warm-ref      {"ref": REF}  202 {"job": ID, "name", "version", "digest"}: warm REF
                                         from the agent's own --store (400 without one, 404
                                         when the store has no such release)
    GET  /metrics                        Prometheus text format (weightship.node.metrics)
    GET  /v1/jobs/ID                     {"job", "done", "events", "result"}
    GET  /v1/jobs/ID/events?from=N       NDJSON: events N… of the job, live until its result
    GET  /v1/status?ref=&version=&digest=   the engine's status document
    POST /v1/gc            {"keep": 2, "dry_run": false}
    POST /v1/verify        {"ref": "NAME:VERSION"}
    POST /v1/have          {"blobs": [HEX…]}  {"blobs": {HEX: SIZE}, "partial": {HEX: BYTES}}
    GET  /v1/blobs/sha256/HEX?wait=S     a blob's bytes for a peer (Range: bytes=N-)
    POST /v1/blobs/sha256/HEX/check      202: a peer got a copy of HEX from here that did not
                                         verify; the agent re-hashes its own in the background
                                         (NodeCache.check_blob) and quarantines it if corrupt

With ``--metrics-listen HOST:PORT`` the agent also serves ``GET /metrics`` there, over
plain HTTP and without a token, and nothing else (404), for a Prometheus scraper that
holds no agent token.

With ``--tls-cert``/``--tls-key`` the agent serves HTTPS only (and every peer of a region
reaches it at an https:// URL); ``--tls-ca`` is the CA its peers' certificates chain to.

The agent applies its own ``--policy`` (a weightship.toml's [policy]) to every warm:
nothing a caller sends can loosen it.

Peers: ``GET /v1/blobs/sha256/HEX`` also accepts a *peer token*, ``peer.EXPIRES.HMAC``
(HMAC-SHA256 keyed with the agent's token, see :func:`peer_token`), which ``weightship
warm`` mints for the other nodes of the region: it reads blobs until it expires and does
nothing else, so a node never holds another node's agent token. The answer is 200 or 206
with the bytes of a verified blob, or of a blob a warm is fetching now (streamed as they
arrive: the receiver verifies the whole sha256, as it does for any source); 503 with
Retry-After when a running warm will fetch the blob but has not started it; 404 when the
agent neither holds nor expects it after ``wait`` seconds (at most 30).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from weightship.errors import UsageError, WeightshipError
from weightship.node.metrics import CONTENT_TYPE, NO_METER, AgentMetrics, Meter
from weightship.node.protocol import PROTOCOL, WarmRequest, check_peer_token, labelled
from weightship.version import __version__

if TYPE_CHECKING:
    # Only the app's caller (``agent serve``) builds the engine: importing this module
    # does not load it.
    from weightship.node.arrivals import PeerBlob
    from weightship.node.cache import NodeCache

MAX_JOBS = 200
# Bytes per body message of a peer stream.
PEER_CHUNK = 1024 * 1024
# A blob being fetched here that has not grown for this long: end the peer's stream, so
# that it goes on from another source.
PEER_STALL = 20.0
# A peer asking for a blob queued here is held this long for its first byte, then told 503.
PEER_HOLD = 10.0
_BLOB_PATH = re.compile(r"^/v1/blobs/sha256/[0-9a-f]{64}$")
_CHECK_PATH = re.compile(r"^/v1/blobs/sha256/[0-9a-f]{64}/check$")
# What the blob handler answers (a name that is no digest: 404, as for any blob not here).
_BLOB_ROUTE = re.compile(r"^/v1/blobs/sha256/[^/]+$")
# A blob found sound is not re-hashed on another report within this long: a peer token
# holder could otherwise keep the node's disk and CPU busy re-reading a large shard.
CHECK_QUIET = 600.0
# At most 20 digits: int() refuses more than 4300, which would answer 500.
_RANGE = re.compile(r"bytes=([0-9]{1,20})-([0-9]{0,20})")


async def _send_json(send, status: int, doc: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A JSON answer in plain ASGI, as Starlette's JSONResponse writes it."""
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    start = [*headers, (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Job:
    id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        if ev.get("event") == "result":
            self.done = True
        self.changed.set()


class Jobs:
    """Warm jobs of this agent; the engine's lock serialises them on the cache.
    ``meter`` is told what each warm moves (bytes per source, failed copies, duration)."""

    def __init__(self, cache: NodeCache, meter: Meter = NO_METER) -> None:
        self.cache = cache
        self.meter = meter
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def start(self, req: WarmRequest) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(uuid.uuid4().hex[:16])
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            oldest = next(iter(self.jobs))
            if not self.jobs[oldest].done:
                break
            self.jobs.popitem(last=False)

        def emit(ev: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the agent is shutting down
                loop.call_soon_threadsafe(job.push, ev)

        def run() -> None:
            try:
                self.cache.warm(req, emit, meter=self.meter)
            except Exception as e:  # a bug: still end the job, or its stream waits forever
                emit({"event": "result", "state": "failed", "error": f"internal error: {e!r}", "retryable": False})

        # The engine blocks (flock, file I/O), so each job has a thread; the result event
        # is emitted by the engine itself, which ends the job.
        threading.Thread(target=run, daemon=True, name=f"warm-{job.id}").start()
        return job


def create_app(cache: NodeCache, token: str, *, store: str | None = None, metrics: AgentMetrics | None = None):
    """The ASGI app. ``token`` is compared in constant time on every request. ``store``:
    the agent's --store, which ``/v1/warm-ref`` warms from; ``metrics``: the counters that
    ``/metrics`` serves (a registry of this app's own when None)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if metrics is None:
        metrics = AgentMetrics(cache)
    jobs = Jobs(cache, metrics)
    expected = f"Bearer {token}".encode()

    class Auth:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                if not hmac.compare_digest(got, expected) and not _peer_read(scope, got):
                    await _send_json(
                        send, 401, {"error": "missing or wrong bearer token"}, [(b"www-authenticate", b"Bearer")]
                    )
                    return
                if scope["method"] in ("GET", "HEAD") and _BLOB_ROUTE.match(scope["path"]):
                    # Straight to the handler: a warm of many small files asks a peer for
                    # each of them, and the router, middleware and response classes cost
                    # more CPU than the blob.
                    await blob(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    # Peer tokens already checked, with their expiry: a warm's peers present the same
    # token for every blob, and one HMAC each is enough.
    peer_tokens: dict[bytes, int] = {}

    def _peer_read(scope, got: bytes) -> bool:
        # A peer token opens the blob endpoint (and the report that a blob from it was
        # corrupt), and nothing else.
        if scope["method"] in ("GET", "HEAD"):
            if not _BLOB_PATH.match(scope["path"]):
                return False
        elif scope["method"] != "POST" or not _CHECK_PATH.match(scope["path"]):
            return False
        if not got.startswith(b"Bearer peer."):
            return False
        expires = peer_tokens.get(got)
        if expires is not None:
            return expires >= time.time()
        presented = got[len(b"Bearer ") :].decode(errors="replace")
        if not check_peer_token(token, presented):
            return False
        if len(peer_tokens) >= 1024:
            peer_tokens.clear()
        peer_tokens[got] = int(presented.split(".")[1])
        return True

    def error(e: Exception, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "weightship": __version__, "protocol": PROTOCOL, "cache": str(cache.root)})

    async def warm(request: Request) -> JSONResponse:
        from weightship.artifact.manifest import Manifest

        body = await request.body()
        try:
            req = WarmRequest.from_json(body)
            # Refuse an unsafe manifest (a '..' path, a bad digest) here, before any job exists.
            Manifest.from_bytes(req.manifest, where="manifest sent to the agent")
        except WeightshipError as e:
            return error(e)
        job = jobs.start(req)
        return JSONResponse({"job": job.id}, status_code=202)

    async def warm_ref(request: Request) -> JSONResponse:
        """Warm a reference from the agent's own store: what ``node wait --agent`` asks for
        on a node that joined after its region was warmed."""
        from weightship.errors import NotFoundError
        from weightship.node.warm import store_request
        from weightship.release import digest_of

        try:
            doc = await body_json(request)
            ref = doc.get("ref")
            if not isinstance(ref, str):
                raise ValueError('pass {"ref": "NAME:TAG"}')
            if store is None:
                raise UsageError("this agent knows no store to warm from", "start it with agent serve --store URL")
            req = await asyncio.to_thread(store_request, store, ref, pin=bool(doc.get("pin", False)))
        except NotFoundError as e:
            return error(e, 404)
        except (ValueError, TypeError, WeightshipError) as e:
            return error(e)
        job = jobs.start(req)
        m = json.loads(req.manifest)
        return JSONResponse(
            {"job": job.id, "name": m["name"], "version": m["version"], "digest": digest_of(req.manifest)},
            status_code=202,
        )

    async def metrics_page(request: Request) -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    def find(request: Request) -> Job | None:
        return jobs.jobs.get(request.path_params["job"])

    async def job_info(request: Request) -> JSONResponse:
        job = find(request)
        if job is None:
            return error(LookupError("no such job"), 404)
        result = job.events[-1] if job.done else None
        return JSONResponse({"job": job.id, "done": job.done, "events": len(job.events), "result": result})

    async def job_events(request: Request):
        job = find(request)
        if job is None:
            return error(LookupError("no such job"), 404)
        try:
            start = max(0, int(request.query_params.get("from", "0")))
        except ValueError:
            return error(ValueError("from must be an integer"))

        async def lines():
            i = start
            while True:
                while i < len(job.events):
                    yield json.dumps(labelled(job.events[i]), separators=(",", ":")) + "\n"
                    i += 1
                if job.done:
                    return
                job.changed.clear()
                if i < len(job.events):
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(job.changed.wait(), 15)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def status(request: Request) -> JSONResponse:
        q = request.query_params
        try:
            verify = q.get("verify") in ("1", "true")
            doc = await asyncio.to_thread(cache.status, q.get("ref"), q.get("version"), q.get("digest"), verify=verify)
        except WeightshipError as e:
            return error(e)
        return JSONResponse(labelled(doc))

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("body must be a JSON object")
        return doc

    async def gc(request: Request) -> JSONResponse:
        try:
            doc = await body_json(request)
            keep = int(doc.get("keep", 2))
            result = await asyncio.to_thread(cache.gc, keep, bool(doc.get("dry_run", False)))
        except (ValueError, TypeError, WeightshipError) as e:
            return error(e)
        return JSONResponse(labelled(result))

    async def verify(request: Request) -> JSONResponse:
        from weightship.errors import IntegrityError

        try:
            doc = await body_json(request)
            result = await asyncio.to_thread(cache.verify, str(doc["ref"]))
        except KeyError:
            return error(ValueError('pass {"ref": "NAME:VERSION"}'))
        except IntegrityError as e:
            metrics.verify_failed("cache")
            return error(e)
        except (ValueError, TypeError, WeightshipError) as e:
            return error(e)
        return JSONResponse(labelled(result))

    checked: dict[str, float] = {}
    checking: set[str] = set()

    async def check(request: Request) -> JSONResponse:
        h = request.path_params["hex"]
        now = time.monotonic()
        if h in checking or now - checked.get(h, -CHECK_QUIET) < CHECK_QUIET:
            return JSONResponse({"blob": h, "checking": h in checking, "recent": True}, status_code=202)
        checking.add(h)

        def run() -> None:
            try:
                result = cache.check_blob(h)
                if result.get("corrupt"):
                    metrics.verify_failed("cache")
                else:
                    checked[h] = time.monotonic()
            except (OSError, WeightshipError):
                pass
            finally:
                checking.discard(h)

        threading.Thread(target=run, daemon=True, name=f"check-{h[:12]}").start()
        return JSONResponse({"blob": h, "checking": True}, status_code=202)

    async def have(request: Request) -> JSONResponse:
        try:
            doc = await body_json(request)
            hexes = doc.get("blobs")
            if not isinstance(hexes, list):
                raise ValueError('pass {"blobs": [HEX…]}')
            result = await asyncio.to_thread(cache.have, hexes)
        except (ValueError, TypeError, WeightshipError) as e:
            return error(e)
        return JSONResponse(labelled(result))

    async def blob(scope, receive, send) -> None:
        """``GET /v1/blobs/sha256/HEX``, in plain ASGI (see Auth)."""
        h = scope["path"].rsplit("/", 1)[1]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            wait = min(30.0, max(0.0, float(query.get("wait", ["0"])[-1])))
        except ValueError:
            await _send_json(send, 400, {"error": "wait must be a number of seconds"})
            return
        now = time.monotonic()
        deadline, hold = now + wait, now + PEER_HOLD
        loop = asyncio.get_running_loop()
        while True:
            arriving = cache.arrivals.get(h)
            found = cache.open_peer_blob(h)
            now = time.monotonic()
            if found == "absent" and now < deadline:
                # A warm starting here may announce it any moment.
                await asyncio.sleep(0.05)
                continue
            if found == "queued" and arriving is not None and now < hold:
                # Hold the request until its first byte is here: a relay chain then moves as
                # soon as its head does, rather than at the pace of its receivers' polling.
                ready = asyncio.Event()
                if cache.arrivals.wait(h, arriving[2], lambda ev=ready: loop.call_soon_threadsafe(ev.set)):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(ready.wait(), hold - now)
                continue
            break
        if found == "absent":
            await _send_json(send, 404, {"error": f"blob {h[:12]}… is not on this node"})
            return
        if found == "queued":
            doc = {"state": "queued", "error": f"blob {h[:12]}… is queued behind this node's other downloads"}
            await _send_json(send, 503, doc, [(b"retry-after", b"1")])
            return
        assert not isinstance(found, str)
        blob = found
        try:
            await _send_blob(scope, receive, send, blob, loop)
        finally:
            blob.close()

    async def blob_elsewhere(request: Request) -> JSONResponse:
        raise AssertionError("GET and HEAD of a blob are answered before routing")

    async def _send_blob(scope, receive, send, blob: PeerBlob, loop: asyncio.AbstractEventLoop) -> None:
        start, end = 0, blob.size
        # An empty Range header asks for no range: the whole blob.
        rng = next((v for k, v in scope["headers"] if k == b"range"), None) or None
        if rng is not None:
            m = _RANGE.fullmatch(rng.decode("latin-1").strip())
            if not m:
                await _send_json(send, 416, {"error": "only Range: bytes=START- or bytes=START-END is served"})
                return
            start = int(m.group(1))
            if m.group(2):
                end = min(blob.size, int(m.group(2)) + 1)
            if start > end or (start == end and blob.size):
                headers = [(b"content-range", f"bytes */{blob.size}".encode())]
                await _send_json(send, 416, {"error": "range outside the blob"}, headers)
                return
        headers = [
            (b"content-length", str(end - start).encode()),
            (b"accept-ranges", b"bytes"),
            (b"x-weightship-blob", b"complete" if blob.complete else b"arriving"),
        ]
        if rng is not None:
            headers.append((b"content-range", f"bytes {start}-{end - 1}/{blob.size}".encode()))
        headers.append((b"content-type", b"application/octet-stream"))
        await send({"type": "http.response.start", "status": 206 if rng is not None else 200, "headers": headers})
        if blob.complete and end - start <= PEER_CHUNK:
            # The common case of a small file: one message, nothing to wait for.
            data = blob.read(start, end - start) if scope["method"] != "HEAD" else b""
            await send({"type": "http.response.body", "body": data})
            metrics.served(len(data))
            return
        # A longer body, or one still arriving: stop when the receiver hangs up (the
        # server drops what is sent after that, which would read the rest for nothing).
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            pos = start
            while pos < end and not gone.is_set():
                avail = blob.available()
                if avail > pos:
                    # Read in the event loop: what peers ask for was just written or
                    # verified here and is in the page cache; a thread hop per MiB costs more.
                    data = blob.read(pos, min(PEER_CHUNK, end - pos, avail - pos))
                    if not data:
                        break
                    pos += len(data)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    metrics.served(len(data))
                    continue
                ticks = blob.ticks()
                state = blob.state()
                if state == "gone":
                    break  # the download failed or started over: the receiver goes elsewhere
                if state == "complete" or blob.available() > pos:
                    continue
                more = asyncio.Event()
                if not blob.wait(ticks, lambda ev=more: loop.call_soon_threadsafe(ev.set)):
                    continue
                try:
                    await asyncio.wait_for(more.wait(), PEER_STALL)
                except asyncio.TimeoutError:
                    break  # stalled: a short body tells the receiver to go on elsewhere
            if pos == end:
                await send({"type": "http.response.body", "body": b""})
            # Otherwise the response stays short of its Content-Length and the server closes
            # the connection: what tells the receiver to go on from another source.
        finally:
            watcher.cancel()

    routes = [
        Route("/v1/health", health),
        Route("/v1/warm", warm, methods=["POST"]),
        Route("/v1/warm-ref", warm_ref, methods=["POST"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/v1/jobs/{job}", job_info),
        Route("/v1/jobs/{job}/events", job_events),
        Route("/v1/status", status),
        Route("/v1/gc", gc, methods=["POST"]),
        Route("/v1/verify", verify, methods=["POST"]),
        Route("/v1/have", have, methods=["POST"]),
        # GET and HEAD never get here (see Auth): the route answers other methods 405.
        Route("/v1/blobs/sha256/{hex:str}", blob_elsewhere, methods=["GET"]),
        Route("/v1/blobs/sha256/{hex:str}/check", check, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    return Auth(app)


def metrics_app(metrics: AgentMetrics):
    """The ASGI app of ``--metrics-listen``: ``GET /metrics`` without a token, and 404 for
    everything else, so that a scraper reaching that port reaches nothing of the API."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await _send_json(send, 404, {"error": "this port serves /metrics only"})
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _send_json(send, 405, {"error": "GET /metrics"}, [(b"allow", b"GET, HEAD")])
            return
        body = await asyncio.to_thread(metrics.render)
        headers = [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})

    return app


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT") from None
    if not 0 < n < 65536:
        raise UsageError(f"{flag} {text!r}: port out of range")
    return host, n


def _preload() -> None:
    """Import what a warm needs before saying we serve: a fleet's agents are often
    started together and warmed at once, and fifty first warms each importing the
    verification and HTTP stacks on a small machine queue behind each other's CPU."""
    import httpx  # noqa: F401

    import weightship.release  # noqa: F401
    from weightship.node.tls import shared_ssl_context

    shared_ssl_context()


def bind(host: str, port: int, flag: str = "--listen") -> list[socket.socket]:
    """Listening sockets for ``host``:``port`` (every address the name resolves to, as
    asyncio would bind), made before the agent says it serves: a taken port is then one
    error line and exit 2, not a "serving" line followed by uvicorn's own error and exit 3."""
    where = _hostport(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"{flag} {where}: cannot resolve {host!r} ({e.strerror})") from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in {(i[0], i[1], i[2], "", i[4]): None for i in infos}:
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            # As uvicorn does: a restarted agent binds at once, whatever connections of the
            # one before are still in TIME_WAIT. (Linux still refuses a port someone listens on.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(2048)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(
                f"{flag} {where}: port {port} is in use by another process", "stop it or choose another port"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(
                f"{flag} {where}: {host} is not an address of this machine", "name one of its addresses"
            ) from None
        if e.errno == errno.EACCES:
            raise UsageError(
                f"{flag} {where}: not allowed to bind port {port}", "ports below 1024 need privileges"
            ) from None
        raise UsageError(f"{flag} {where}: cannot listen ({e.strerror or e})") from None
    return socks


def _encrypted_key() -> str:
    # Called by OpenSSL only for an encrypted key: refuse it rather than prompt on a tty
    # that an agent started by systemd does not have.
    raise UsageError("--tls-key is encrypted", "give the agent an unencrypted key file readable only by its user")


def check_tls(cert: Path, key: Path) -> None:
    """Load the certificate and key once, to refuse a bad pair with one line naming it."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_encrypted_key)
    except ssl.SSLError as e:  # an OSError too: caught first
        raise UsageError(
            f"cannot use --tls-cert {cert} with --tls-key {key} ({e.reason or e})",
            "pass a PEM certificate (chain) and its unencrypted PEM private key",
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read --tls-cert {cert} or --tls-key {key}: {e.strerror or e}") from None


def serve(
    cache: NodeCache,
    token: str,
    host: str,
    port: int,
    announce: Callable[[str], None] = print,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    warnings: Iterable[str] = (),
    store: str | None = None,
    metrics_listen: tuple[str, int] | None = None,
) -> None:
    """Serve until interrupted: HTTPS only when given ``tls_cert`` and ``tls_key``.
    ``announce`` gets the "serving" line, once the port is bound, then ``warnings``.
    ``store``: what ``/v1/warm-ref`` warms from. ``metrics_listen``: also serve
    ``/metrics`` (only) there, over HTTP and without a token."""
    import uvicorn

    cache.ensure()
    tls = tls_cert is not None and tls_key is not None
    if tls:
        check_tls(tls_cert, tls_key)
    _preload()
    metrics = AgentMetrics(cache)
    config = uvicorn.Config(
        create_app(cache, token, store=store, metrics=metrics),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Nothing here uses the client's address: no middleware rewriting it per request.
        proxy_headers=False,
        # Event streams of long warms are held open; shutdown should not wait on them.
        timeout_graceful_shutdown=2,
        ssl_certfile=tls_cert if tls else None,
        ssl_keyfile=tls_key if tls else None,
    )
    config.load()
    socks = bind(host, port)
    extra = None
    if metrics_listen is not None:
        mhost, mport = metrics_listen
        try:
            msocks = bind(mhost, mport, "--metrics-listen")
        except UsageError:
            for sock in socks:
                sock.close()
            raise
        mconfig = uvicorn.Config(
            metrics_app(metrics), log_level="warning", access_log=False, lifespan="off", proxy_headers=False
        )
        mconfig.load()
        extra = (uvicorn.Server(mconfig), msocks)
    where = _hostport(host, port)
    announce(f"weightship agent {__version__} serving {cache.root} on {'https' if tls else 'http'}://{where}")
    if metrics_listen is not None:
        announce(f"weightship agent metrics on http://{_hostport(*metrics_listen)}/metrics (no token)")
    if not tls and not all(_loopback(s) for s in socks):
        announce(
            f"warning: listening on {where} without TLS: the bearer token, peer tokens and blobs travel in"
            " clear text; pass --tls-cert and --tls-key"
        )
    for line in warnings:
        announce(f"warning: {line}")
    server = uvicorn.Server(config)
    if extra is None:
        server.run(sockets=socks)
        return
    asyncio.run(_serve_both(server, socks, *extra))


async def _serve_both(api: Any, socks: list[socket.socket], metrics: Any, msocks: list[socket.socket]) -> None:
    """The API and the metrics port in one event loop. Each uvicorn server handles the
    signals while it serves (the one started last gets them), so whichever is asked to
    stop, both stop."""

    async def linked() -> None:
        while not (api.should_exit or metrics.should_exit):
            await asyncio.sleep(0.1)
        api.should_exit = metrics.should_exit = True

    await asyncio.gather(api.serve(sockets=socks), metrics.serve(sockets=msocks), linked())


def _hostport(host: str, port: int) -> str:
    """HOST:PORT as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loopback(sock: socket.socket) -> bool:
    try:
        return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback
    except ValueError:
        return False
