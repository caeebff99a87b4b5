"""Fleet orchestration: warm, status and gc over every node of a region, concurrently.

A release is resolved once in the store; every node is handed the same manifest and
signature bytes, and URLs (or the store's address, with ``--credentials node``) to fetch
blobs from: a node never receives the caller's credentials. Each node's own engine does
the rest and reports events, which become one live row per node.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from weightship.errors import UsageError, WeightshipError
from weightship.fleet import Node
from weightship.node import WarmRequest
from weightship.progress import human_bytes
from weightship.transports.base import NodeFailed, NodeUnreachable, Transport

TransportFor = Callable[[Node], Transport]
RETRY_DELAYS = (1.0, 3.0, 8.0)
PRESIGN_EXPIRES = 6 * 3600
STATUS_TIMEOUT = 30.0


# -- parsing -----------------------------------------------------------------------------


def parse_share(text: str, what: str = "--min-ready") -> Callable[[int], int]:
    """``all``, ``N%`` or a count ``N`` -> a function of the node count giving how many must be ready."""
    t = text.strip().lower()
    if t == "all":
        return lambda n: n
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", t)
    if m:
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise UsageError(f"{what} {text!r}: a percentage is between 0% and 100%")
        return lambda n: math.ceil(n * pct / 100 - 1e-9)
    if t.isdigit():
        count = int(t)
        return lambda n: min(count, n)
    raise UsageError(f"{what} {text!r}: write all, a percentage such as 80%, or a node count")


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageError(f"--timeout {text!r}: write seconds, or e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# -- requests ----------------------------------------------------------------------------


def build_request(
    store: Any,
    release: Any,
    *,
    credentials: str = "presigned",
    tags: list[str] | None = None,
    pin: bool = False,
    max_rate: int | None = None,
    expires: int = PRESIGN_EXPIRES,
) -> WarmRequest:
    """The one request every node of a region gets (capacity is filled in per node)."""
    if credentials == "node":
        source: dict[str, Any] = {"store": store.url}
    elif credentials == "presigned":
        urls = {}
        for h in release.manifest.blobs():
            url = store.blob_url(h, expires)
            if url is None:
                raise UsageError(
                    f"the store {store.url} cannot hand out blob URLs", "pass --credentials node to let nodes read it"
                )
            urls[h] = url
        source = {"urls": urls}
    else:
        raise UsageError(f"--credentials {credentials!r}: choose presigned or node")
    return WarmRequest(
        manifest=release.manifest_bytes,
        signature=release.signature,
        source=source,
        tags=list(tags or []),
        pin=pin,
        max_rate=max_rate,
    )


# -- rows and displays -------------------------------------------------------------------


@dataclass
class Row:
    """One node's part in a warm, as the live display and the summary show it."""

    node: Node
    state: str = "pending"
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_fetched: int | None = None
    file: str | None = None
    message: str | None = None
    error: str | None = None
    attempts: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    result: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def to_dict(self) -> dict[str, Any]:
        res = self.result or {}
        return {
            "node": self.node.name,
            "region": self.node.region,
            "transport": self.node.transport,
            "state": self.state,
            "version": res.get("version"),
            "digest": res.get("digest"),
            "bytes_total": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "bytes_reused": res.get("bytes_reused"),
            "verified": res.get("verified"),
            "signer": res.get("signer"),
            "evicted": res.get("evicted", []),
            "attempts": self.attempts,
            "seconds": self.seconds,
            "error": self.error,
        }


class Display:
    """No output (``--json``, ``--quiet``)."""

    def start(self, rows: list[Row]) -> None:
        pass

    def update(self, row: Row) -> None:
        pass

    def stop(self) -> None:
        pass


class PlainDisplay(Display):
    """A line per node state change: readable in CI logs."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self._last: dict[str, tuple[str, str | None]] = {}

    def update(self, row: Row) -> None:
        key = (row.state, row.message if row.state in ("pending", "failed", "unreachable") else None)
        if self._last.get(row.node.name) == key:
            return
        self._last[row.node.name] = key
        text = f"{row.node.name}: {row.state}"
        if row.state == "fetching" and row.bytes_total:
            text += f" ({human_bytes(row.bytes_done)} of {human_bytes(row.bytes_total)} present)"
        if row.state == "ready" and row.bytes_fetched is not None:
            text += f" (fetched {human_bytes(row.bytes_fetched)}, {row.seconds or 0:.1f}s)"
        note = row.error if row.state in ("failed", "unreachable") else row.message
        if note:
            text += f": {note}"
        print(text, file=self.stream, flush=True)


class RichDisplay(Display):
    """One live progress row per node on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def start(self, rows: list[Row]) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        width = max((len(r.node.name) for r in rows), default=8)
        self.progress = Progress(
            TextColumn(f"{{task.fields[node]:<{width}}}"),
            TextColumn("{task.fields[state]}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[note]}", style="dim"),
            console=self.console,
        )
        self.progress.start()
        for r in rows:
            self.tasks[r.node.name] = self.progress.add_task("", total=None, node=r.node.name, state=r.state, note="")

    def update(self, row: Row) -> None:
        if self.progress is None:
            return
        if row.state in ("failed", "unreachable"):
            note = row.error
        elif row.state == "ready":
            note = f"fetched {human_bytes(row.bytes_fetched or 0)}"
        else:
            note = row.message or row.file or ""
        style = {"ready": "green", "failed": "red", "unreachable": "red"}.get(row.state)
        # Padded before styling, so that markup does not count towards the width.
        state = f"{row.state:<11}"
        state = f"[{style}]{state}[/]" if style else state
        self.progress.update(
            self.tasks[row.node.name],
            total=row.bytes_total or None,
            completed=row.bytes_done,
            state=state,
            note=(note or "")[:80],
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def make_display(quiet: bool, json_mode: bool) -> Display:
    if quiet or json_mode:
        return Display()
    if sys.stderr.isatty():
        return RichDisplay()
    return PlainDisplay()


# -- warm --------------------------------------------------------------------------------


async def warm_nodes(
    nodes: list[Node],
    request: WarmRequest,
    transport_for: TransportFor,
    *,
    parallel: int = 16,
    timeout: float | None = None,
    retries: int = 2,
    detach: bool = False,
    display: Display | None = None,
) -> list[Row]:
    """Warm every node concurrently (at most ``parallel`` at once), retrying transient
    failures; return one row per node, in the order given."""
    display = display or Display()
    rows = [Row(n) for n in nodes]
    sem = asyncio.Semaphore(max(1, parallel))

    async def one(row: Row) -> None:
        async with sem:
            row.started = time.monotonic()
            try:
                transport = transport_for(row.node)
            except WeightshipError as e:
                _finish(row, "failed", str(e))
                display.update(row)
                return
            try:
                req = replace(request, capacity=row.node.capacity)
                await _warm_with_retries(row, transport, req, retries, detach, display)
            finally:
                await transport.close()

    display.start(rows)
    try:
        tasks = [asyncio.ensure_future(one(r)) for r in rows]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # a bug: let the CLI report it
        for r in rows:
            if r.seconds is None:
                _finish(r, r.state, f"timed out after {timeout:g}s while {r.state}; the node goes on in the background")
                display.update(r)
    finally:
        display.stop()
    return rows


def _finish(row: Row, state: str, error: str | None) -> None:
    row.state = state
    row.error = error
    row.message = None
    row.seconds = round(time.monotonic() - row.started, 3)


async def _warm_with_retries(
    row: Row, transport: Transport, req: WarmRequest, retries: int, detach: bool, display: Display
) -> None:
    def on_event(ev: dict[str, Any]) -> None:
        row.state = ev.get("state") or row.state
        row.bytes_done = int(ev.get("bytes_done") or 0)
        row.bytes_total = int(ev.get("bytes_total") or row.bytes_total)
        row.file = ev.get("file")
        row.message = ev.get("message")
        display.update(row)

    for attempt in range(retries + 1):
        row.attempts = attempt + 1
        retryable = False
        try:
            res = await transport.warm(req, on_event, detach=detach)
        except NodeUnreachable as e:
            state, error, retryable = "unreachable", str(e), e.retryable
        except NodeFailed as e:
            state, error, retryable = "failed", str(e), e.retryable
        except WeightshipError as e:
            state, error = "failed", str(e)
        else:
            row.result = res
            state, error = res.get("state", "failed"), res.get("error")
            retryable = state == "failed" and bool(res.get("retryable"))
            row.bytes_total = int(res.get("bytes_total") or row.bytes_total)
            row.bytes_done = int(res.get("bytes_done") or row.bytes_done)
            row.bytes_fetched = res.get("bytes_fetched")
        if not retryable or attempt == retries:
            _finish(row, state, error)
            display.update(row)
            return
        delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
        row.state, row.error = state, error
        row.message = f"retrying in {delay:g}s (attempt {attempt + 2} of {retries + 1})"
        display.update(row)
        await asyncio.sleep(delay)


# -- status ------------------------------------------------------------------------------


@dataclass
class Query:
    """What a status asks each node: a ref as the user wrote it, and what the store says it is."""

    ref: str | None = None
    version: str | None = None
    digest: str | None = None


async def status_nodes(
    nodes: list[Node],
    query_for: Callable[[Node], Query],
    transport_for: TransportFor,
    *,
    parallel: int = 32,
    timeout: float = STATUS_TIMEOUT,
) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(max(1, parallel))

    async def one(node: Node) -> dict[str, Any]:
        q = query_for(node)
        base = {"node": node.name, "region": node.region, "transport": node.transport}
        async with sem:
            try:
                transport = transport_for(node)
            except WeightshipError as e:
                return {**base, **_empty(q), "state": "failed", "error": str(e)}
            try:
                doc = await asyncio.wait_for(transport.status(q.ref, q.version, q.digest), timeout)
            except NodeUnreachable as e:
                return {**base, **_empty(q), "state": "unreachable", "error": str(e)}
            except asyncio.TimeoutError:
                return {**base, **_empty(q), "state": "unreachable", "error": f"no answer within {timeout:g}s"}
            except WeightshipError as e:
                return {**base, **_empty(q), "state": "failed", "error": str(e)}
            finally:
                await transport.close()
        doc.pop("event", None)
        doc.pop("op", None)
        if q.ref is None:
            doc["state"] = "reachable"
        return {**base, **doc}

    return list(await asyncio.gather(*(one(n) for n in nodes)))


def _empty(q: Query) -> dict[str, Any]:
    return {
        "version": q.version,
        "tag_version": None,
        "digest": None,
        "bytes_present": None,
        "bytes_total": None,
        "verified": False,
        "signer": None,
        "free_bytes": None,
        "last_warm": None,
    }


def is_ready(row: dict[str, Any], with_ref: bool) -> bool:
    return row.get("state") == ("ready" if with_ref else "reachable")


# -- gc ----------------------------------------------------------------------------------


async def gc_nodes(
    nodes: list[Node], transport_for: TransportFor, *, keep: int, dry_run: bool, parallel: int = 16
) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(max(1, parallel))

    async def one(node: Node) -> dict[str, Any]:
        base = {"node": node.name, "region": node.region}
        async with sem:
            try:
                transport = transport_for(node)
            except WeightshipError as e:
                return {**base, "state": "failed", "error": str(e)}
            try:
                doc = await transport.gc(keep, dry_run)
            except NodeUnreachable as e:
                return {**base, "state": "unreachable", "error": str(e)}
            except WeightshipError as e:
                return {**base, "state": "failed", "error": str(e)}
            finally:
                await transport.close()
        doc.pop("event", None)
        doc.pop("op", None)
        return {**base, "state": "ok", "error": None, **doc}

    return list(await asyncio.gather(*(one(n) for n in nodes)))


# -- rendering ---------------------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal, never wrap: CI logs are read with grep.
    return Console(file=stream, width=None if stream.isatty() else 240, highlight=False)


def _signer_text(signer: dict[str, Any] | None) -> str:
    if not signer:
        return ""
    if signer.get("method") == "key":
        return f"key {str(signer.get('fingerprint', '?'))[:16]}"
    if signer.get("method") == "certificate":
        return f"cert {signer.get('subject')}"
    return str(signer.get("identity") or signer.get("method"))


def render_warm(rows: list[Row], title: str) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for col in ("node", "state", "version", "fetched", "reused", "verified", "time"):
        table.add_column(col, justify="right" if col in ("fetched", "reused", "time") else "left")
    for r in rows:
        res = r.result or {}
        verified = "yes " + _signer_text(res.get("signer")) if res.get("verified") else ("no" if res else "")
        table.add_row(
            r.node.name,
            _styled(r.state),
            res.get("version") or "",
            human_bytes(r.bytes_fetched) if r.bytes_fetched is not None else "",
            human_bytes(res["bytes_reused"]) if res.get("bytes_reused") is not None else "",
            verified.strip(),
            f"{r.seconds:.1f}s" if r.seconds is not None else "",
        )
    console = _console()
    console.print(table)
    for r in rows:
        if r.error:
            console.print(f"{r.node.name}: {r.error}", markup=False, soft_wrap=True)
        for ev in (r.result or {}).get("evicted") or []:
            freed = human_bytes(ev.get("freed_bytes", 0))
            console.print(f"{r.node.name}: evicted {ev['name']}:{ev['version']} (freed {freed})")


def render_status(rows: list[dict[str, Any]], title: str, with_ref: bool) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    if with_ref:
        cols = ("node", "state", "version", "tag ->", "bytes", "verified", "free", "last warm")
    else:
        cols = ("node", "state", "releases", "free")
    for col in cols:
        table.add_column(col)
    for r in rows:
        free = human_bytes(r["free_bytes"]) if r.get("free_bytes") is not None else ""
        if with_ref:
            total = r.get("bytes_total")
            present = r.get("bytes_present")
            size = f"{human_bytes(present or 0)} / {human_bytes(total)}" if total is not None else ""
            verified = ("yes " + _signer_text(r.get("signer"))).strip() if r.get("verified") else "no"
            table.add_row(
                r["node"],
                _styled(r["state"]),
                r.get("version") or "",
                r.get("tag_version") or "" if r.get("tag") else "",
                size,
                verified if r["state"] not in ("unreachable",) else "",
                free,
                r.get("last_warm") or "",
            )
        else:
            rels = ", ".join(
                f"{x['name']}:{x['version']} {x['state']}" + (f" ({','.join(x['tags'])})" if x.get("tags") else "")
                for x in r.get("releases") or []
            )
            table.add_row(r["node"], _styled(r["state"]), rels, free)
    console = _console()
    console.print(table)
    for r in rows:
        if r.get("error"):
            console.print(f"{r['node']}: {r['error']}", markup=False, soft_wrap=True)


def render_gc(rows: list[dict[str, Any]], dry_run: bool) -> None:
    console = _console()
    verb = "would evict" if dry_run else "evicted"
    for r in rows:
        if r.get("error"):
            console.print(f"{r['node']}: {r['state']}: {r['error']}", markup=False, soft_wrap=True)
            continue
        names = ", ".join(f"{e['name']}:{e['version']}" for e in r.get("evicted") or []) or "nothing"
        freed = human_bytes(r.get("freed_bytes") or 0)
        free = human_bytes(r.get("free_bytes") or 0)
        console.print(f"{r['node']}: {verb} {names}; {'would free' if dry_run else 'freed'} {freed}, {free} free")


def _styled(state: str) -> str:
    style = {"ready": "green", "reachable": "green", "ok": "green", "failed": "red", "unreachable": "red"}.get(state)
    return f"[{style}]{state}[/]" if style else state


__all__ = [
    "Display",
    "Query",
    "Row",
    "build_request",
    "gc_nodes",
    "is_ready",
    "make_display",
    "parse_duration",
    "parse_share",
    "render_gc",
    "render_status",
    "render_warm",
    "status_nodes",
    "warm_nodes",
]
