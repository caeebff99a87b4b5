"""``weightship agent serve``: the node engine behind a small HTTP API.

Every endpoint, including unknown paths, answers 401 without the bearer token. The API
(all JSON; events are NDJSON, one engine event per line)::

    GET  /v1/health                      {"ok": true, "weightship": VERSION, "protocol": N}
    POST /v1/warm          request JSON  202 {"job": ID}; 400 if the request is refused
    GET  /v1/jobs/ID                     {"job", "done", "events", "result"}
    GET  /v1/jobs/ID/events?from=N       NDJSON: events N… of the job, live until its result
    GET  /v1/status?ref=&version=&digest=   the engine's status document
    POST /v1/gc            {"keep": 2, "dry_run": false}
    POST /v1/verify        {"ref": "NAME:VERSION"}

The agent applies its own ``--policy`` (a weightship.toml's [policy]) to every warm:
nothing a caller sends can loosen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from weightship import __version__
from weightship.errors import WeightshipError
from weightship.node import PROTOCOL, NodeCache, WarmRequest

MAX_JOBS = 200


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
    """Warm jobs of this agent; the engine's lock serialises them on the cache."""

    def __init__(self, cache: NodeCache) -> None:
        self.cache = cache
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
                self.cache.warm(req, emit)
            except Exception as e:  # a bug: still end the job, or its stream waits forever
                emit({"event": "result", "state": "failed", "error": f"internal error: {e!r}", "retryable": False})

        # The engine blocks (flock, file I/O), so each job has a thread; the result event
        # is emitted by the engine itself, which ends the job.
        threading.Thread(target=run, daemon=True, name=f"warm-{job.id}").start()
        return job


def create_app(cache: NodeCache, token: str):
    """The ASGI app. ``token`` is compared in constant time on every request."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    jobs = Jobs(cache)
    expected = f"Bearer {token}".encode()

    class Auth:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(got, expected):
                    resp = JSONResponse(
                        {"error": "missing or wrong bearer token"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    await resp(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    def error(e: Exception, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "weightship": __version__, "protocol": PROTOCOL, "cache": str(cache.root)})

    async def warm(request: Request) -> JSONResponse:
        from weightship.manifest import Manifest

        body = await request.body()
        try:
            req = WarmRequest.from_json(body)
            # Refuse an unsafe manifest (a '..' path, a bad digest) here, before any job exists.
            Manifest.from_bytes(req.manifest, where="manifest sent to the agent")
        except WeightshipError as e:
            return error(e)
        job = jobs.start(req)
        return JSONResponse({"job": job.id}, status_code=202)

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
                    yield json.dumps(job.events[i], separators=(",", ":")) + "\n"
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
            doc = await asyncio.to_thread(cache.status, q.get("ref"), q.get("version"), q.get("digest"))
        except WeightshipError as e:
            return error(e)
        return JSONResponse(doc)

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
        return JSONResponse(result)

    async def verify(request: Request) -> JSONResponse:
        try:
            doc = await body_json(request)
            result = await asyncio.to_thread(cache.verify, str(doc["ref"]))
        except KeyError:
            return error(ValueError('pass {"ref": "NAME:VERSION"}'))
        except (ValueError, TypeError, WeightshipError) as e:
            return error(e)
        return JSONResponse(result)

    routes = [
        Route("/v1/health", health),
        Route("/v1/warm", warm, methods=["POST"]),
        Route("/v1/jobs/{job}", job_info),
        Route("/v1/jobs/{job}/events", job_events),
        Route("/v1/status", status),
        Route("/v1/gc", gc, methods=["POST"]),
        Route("/v1/verify", verify, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    return Auth(app)


def parse_listen(text: str) -> tuple[str, int]:
    from weightship.errors import UsageError

    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT") from None
    if not 0 < n < 65536:
        raise UsageError(f"--listen {text!r}: port out of range")
    return host, n


def serve(cache: NodeCache, token: str, host: str, port: int, announce=print) -> None:
    import uvicorn

    cache.ensure()
    config = uvicorn.Config(
        create_app(cache, token),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Event streams of long warms are held open; shutdown should not wait on them.
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    announce(f"weightship agent {__version__} serving {cache.root} on http://{host}:{port}")
    server.run()
