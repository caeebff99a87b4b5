"""The typed node protocol: the engine's documents read back exactly, the client side loads
no engine, and the agent client keeps one connection."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleetkit import model, publish
from weightship.node.cache import NodeCache
from weightship.node.protocol import (
    CheckResult,
    GcResult,
    HaveResult,
    PinResult,
    ProgressEvent,
    StatusResult,
    VerifyResult,
    WarmRequest,
    WarmResult,
    parse_event,
)

READY_KEYS = [
    "event",
    "state",
    "name",
    "version",
    "bytes_done",
    "bytes_total",
    "error",
    "retryable",
    "digest",
    "bytes_fetched",
    "bytes_reused",
    "bytes_from_origin",
    "bytes_from_peers",
    "bad_peers",
    "verified",
    "signer",
    "tags",
    "evicted",
    "pinned",
]
RELEASE_KEYS = [
    "name",
    "version",
    "tag",
    "tag_version",
    "tags",
    "digest",
    "state",
    "bytes_present",
    "bytes_total",
    "verified",
    "signer",
    "last_warm",
    "pinned",
    "error",
]
STATUS_KEYS = ["event", "op", "cache", "free_bytes", "capacity", "policy", "weightship", "protocol"]


def _request(
    tmp_path: Path, seed: int, ref: str, tags: list[str] | None = None, hot: bool = False, hidden: int = 256
) -> WarmRequest:
    from weightship import release
    from weightship.store import open_store

    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, seed, hidden), ref, store)
    st = open_store(store)
    try:
        rel = release.resolve(st, ref)
    finally:
        st.close()
    return WarmRequest(rel.manifest_bytes, rel.signature, {"store": store}, tags=tags or [], hot=hot)


def test_engine_documents_read_back_exactly(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache")
    events: list[dict[str, Any]] = []
    result = cache.warm(_request(tmp_path, 1, "p:1.0", ["prod"], hot=True), events.append)

    # The result is the last event, and the return value.
    assert events[-1] == result and result["state"] == "ready"
    assert list(result) == [*READY_KEYS, "hot_bytes", "hot_seconds", "seconds"]
    for ev in events[:-1]:
        assert list(ev) == ["event", "state", "name", "version", "bytes_done", "bytes_total", "file", "message"]
        assert ProgressEvent.from_dict(ev).to_dict() == ev
        assert isinstance(parse_event(ev), ProgressEvent)
    typed = WarmResult.from_dict(result)
    assert typed.ready and typed.to_dict() == result and not typed.extra

    failed = cache.warm(WarmRequest(b"{}", None, {"store": "file:///nowhere"}))
    assert failed["state"] == "failed" and failed["error"]
    assert list(failed) == [*READY_KEYS[:8], "seconds"]
    assert WarmResult.from_dict(failed).to_dict() == failed

    one = cache.status("p:prod")
    assert list(one) == STATUS_KEYS + RELEASE_KEYS and one["state"] == "ready" and one["tag_version"] == "1.0"
    assert StatusResult.from_dict(one).to_dict() == one
    every = cache.status()
    assert list(every) == [*STATUS_KEYS, "releases"] and list(every["releases"][0]) == RELEASE_KEYS
    assert StatusResult.from_dict(every).to_dict() == every

    blobs = sorted(json.loads((cache.state / "releases/p/1.0/manifest.json").read_text())["files"], key=str)
    hexes = [f["sha256"] for f in blobs] + ["0" * 64]
    have = cache.have(hexes)
    assert list(have) == ["event", "op", "blobs", "partial", "free_bytes"] and "0" * 64 not in have["blobs"]
    assert HaveResult.from_dict(have).to_dict() == have

    verified = cache.verify("p:prod")
    assert verified["op"] == "verify" and VerifyResult.from_dict(verified).to_dict() == verified
    pinned = cache.pin("p:1.0")
    assert pinned == {"event": "result", "op": "pin", "name": "p", "version": "1.0", "pinned": True}
    assert PinResult.from_dict(pinned).to_dict() == pinned

    held = cache.check_blob(hexes[0])
    assert held == {"event": "result", "op": "check", "blob": hexes[0], "held": True, "corrupt": False, "withdrawn": []}
    absent = cache.check_blob("0" * 64)
    assert absent == {"event": "result", "op": "check", "blob": "0" * 64, "held": False, "corrupt": False}
    for doc in (held, absent):
        assert CheckResult.from_dict(doc).to_dict() == doc

    cache.warm(_request(tmp_path, 2, "p:2.0", ["prod"]))
    gc = cache.gc(keep=0, dry_run=True)
    assert list(gc) == ["event", "op", "dry_run", "evicted", "kept", "freed_bytes", "free_bytes"]
    assert gc["evicted"] == [] and gc["kept"] == ["p:1.0", "p:2.0"]  # pinned, and tagged
    assert GcResult.from_dict(gc).to_dict() == gc


def test_documents_from_a_newer_node_keep_what_this_version_does_not_know() -> None:
    doc = {"event": "result", "state": "failed", "name": None, "version": None, "bytes_done": 0}
    doc |= {"bytes_total": 0, "error": "x", "retryable": True, "seconds": 0.1, "new_field": [1]}
    typed = WarmResult.from_dict(doc)
    assert typed.extra == {"new_field": [1]} and typed.to_dict() == doc


def test_gc_refuses_a_negative_keep_without_naming_a_flag(tmp_path: Path) -> None:
    from weightship.errors import UsageError

    with pytest.raises(UsageError, match=r"^keep must be 0 or more"):
        NodeCache(tmp_path / "cache").gc(keep=-1)


def test_the_client_side_loads_no_engine() -> None:
    """Transports (and whoever mints peer tokens) import the protocol, never the engine."""
    code = (
        "import sys\n"
        "import weightship.node.protocol, weightship.node.serve_http\n"
        "import weightship.fleet.transports.agent, weightship.fleet.transports.ssh\n"
        "from weightship.fleet.transports import for_node\n"
        "engine = ('cache', 'layout', 'warm', 'space', 'integrity', 'arrivals')\n"
        "print([m for m in engine if 'weightship.node.' + m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


# -- the agent client ------------------------------------------------------------------


class _Server:
    """The agent's app under uvicorn in this process, noting the client address (one per
    TCP connection) of every request."""

    def __init__(self, cache: NodeCache, token: str) -> None:
        import uvicorn

        from weightship.node.serve_http import create_app

        app = create_app(cache, token)
        self.clients: list[tuple[str, int]] = []

        async def noting(scope, receive, send):
            if scope["type"] == "http":
                self.clients.append(tuple(scope["client"]))
            await app(scope, receive, send)

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(noting, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def test_the_agent_client_keeps_one_connection_for_every_call(tmp_path: Path) -> None:
    from weightship.fleet.inventory import Node
    from weightship.fleet.transports.agent import AgentTransport

    req = _request(tmp_path, 3, "a:1.0", ["prod"])
    cache = NodeCache(tmp_path / "agent-cache")
    with _Server(cache, "t0ken") as server:
        node = Node("a", "r", "agent", "agent://127.0.0.1", host="127.0.0.1", port=server.port, token="t0ken")

        async def calls() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            t = AgentTransport(node)
            try:
                docs = [await t.status(), await t.have(["0" * 64])]
                progress: list[dict[str, Any]] = []
                result = await t.warm(req, progress.append)
                docs += [await t.status("a:prod"), await t.gc(2, True), await t.status()]
                return result, docs
            finally:
                await t.close()

        result, docs = asyncio.run(calls())
    assert result["state"] == "ready" and docs[2]["state"] == "ready"
    assert len(server.clients) == 7  # status, have, warm, its events, status, gc, status
    # A client per call opened seven connections. The event stream, left as soon as the
    # result arrives, may cost its connection: two at most.
    assert len(set(server.clients)) <= 2, server.clients


def test_the_blob_endpoint_answers_outside_the_router_as_it_did_inside(tmp_path: Path) -> None:
    import httpx

    from weightship.node.protocol import peer_token
    from weightship.node.serve_http import PEER_CHUNK

    cache = NodeCache(tmp_path / "agent-cache")
    assert cache.warm(_request(tmp_path, 4, "b:1.0", hidden=512))["state"] == "ready"
    files = json.loads((cache.state / "releases/b/1.0/manifest.json").read_text())["files"]
    small = min(files, key=lambda f: f["size"])
    h = max(files, key=lambda f: f["size"])["sha256"]
    size = (cache.blobs / h).stat().st_size
    assert size > PEER_CHUNK > small["size"]  # sent in several messages, and in one
    with _Server(cache, "t0ken") as server:
        base = f"http://127.0.0.1:{server.port}/v1/blobs/sha256"
        auth = {"Authorization": "Bearer t0ken"}
        peer = {"Authorization": f"Bearer {peer_token('t0ken', int(time.time()) + 60)}"}
        with httpx.Client(headers=auth) as c:
            whole = c.get(f"{base}/{h}")
            assert whole.status_code == 200 and len(whole.content) == size
            assert whole.headers["x-weightship-blob"] == "complete" and whole.headers["accept-ranges"] == "bytes"
            assert whole.content == (cache.blobs / h).read_bytes()
            one = c.get(f"{base}/{small['sha256']}")
            assert one.status_code == 200 and one.content == (cache.blobs / small["sha256"]).read_bytes()
            part = c.get(f"{base}/{h}", headers={"Range": "bytes=10-19"})
            assert part.status_code == 206 and part.content == whole.content[10:20]
            assert part.headers["content-range"] == f"bytes 10-19/{size}"
            head = c.head(f"{base}/{h}")
            assert head.status_code == 200 and head.headers["content-length"] == str(size) and not head.content
            assert c.get(f"{base}/{h}", headers={"Range": ""}).status_code == 200
            bad = c.get(f"{base}/{h}", headers={"Range": "bytes=-5"})
            assert bad.status_code == 416 and "only Range" in bad.json()["error"]
            outside = c.get(f"{base}/{h}", headers={"Range": f"bytes={size + 1}-"})
            assert outside.status_code == 416 and outside.headers["content-range"] == f"bytes */{size}"
            assert c.get(f"{base}/{'0' * 64}").status_code == 404
            assert c.get(f"{base}/not-a-digest").json()["error"].startswith("blob not-a-diges")
            assert c.get(f"{base}/{h}", params={"wait": "soon"}).status_code == 400
            assert c.post(f"{base}/{h}").status_code == 405
        # A peer token opens the blob (again and again) and nothing else.
        with httpx.Client(headers=peer) as c:
            assert [c.get(f"{base}/{h}").status_code for _ in range(3)] == [200, 200, 200]
            assert c.get(f"{base}/not-a-digest").status_code == 401
            assert c.get(f"http://127.0.0.1:{server.port}/v1/status").status_code == 401
        expired = {"Authorization": f"Bearer {peer_token('t0ken', int(time.time()) - 1)}"}
        refused = httpx.get(f"{base}/{h}", headers=expired)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
