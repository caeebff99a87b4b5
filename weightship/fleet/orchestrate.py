"""Fleet orchestration: warm, status and gc over every node of a region, concurrently.

Each node's own engine does the work and reports events; here they become one
:class:`Row` per node, and the whole operation a typed report (:class:`WarmReport`,
:class:`StatusReport`, :class:`GcReport`) whose ``to_dict`` is the documented JSON
(docs/json.md). Nothing here prints: live progress goes to a :class:`WarmDisplay` the
caller passes (the command line's draws rows or lines, ``weightship.cli.render``).
What a warm sends, and peer planning, are in :mod:`weightship.fleet.plan`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from weightship.errors import UsageError, WeightshipError
from weightship.fleet.inventory import Node, Region
from weightship.fleet.plan import Plan, TransportFor, plan_warm, wants_plan
from weightship.fleet.transports.base import NodeFailed, NodeUnreachable, Transport
from weightship.node.protocol import WarmRequest

if TYPE_CHECKING:
    from weightship.release import Release

RETRY_DELAYS = (1.0, 3.0, 8.0)
STATUS_TIMEOUT = 30.0
Share = Callable[[int], int]


# -- parsing -----------------------------------------------------------------------------


def parse_share(text: str) -> Share:
    """``all``, ``N%`` or a count ``N`` -> a function of the node count giving how many must be ready."""
    t = text.strip().lower()
    if t == "all":
        return every
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", t)
    if m:
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise UsageError(f"{text!r}: a percentage is between 0% and 100%")
        return lambda n: math.ceil(n * pct / 100 - 1e-9)
    if t.isdigit():
        count = int(t)
        return lambda n: min(count, n)
    raise UsageError(f"{text!r}: write all, a percentage such as 80%, or a node count")


def every(n: int) -> int:
    """The default share: all the nodes."""
    return n


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageError(f"{text!r}: write seconds, or e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


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
            "bytes_from_origin": res.get("bytes_from_origin"),
            "bytes_from_peers": res.get("bytes_from_peers") or {},
            "bad_peers": res.get("bad_peers") or [],
            "hot_bytes": res.get("hot_bytes"),
            "verified": res.get("verified"),
            "signer": res.get("signer"),
            "evicted": res.get("evicted", []),
            "attempts": self.attempts,
            "seconds": self.seconds,
            "error": self.error,
        }


class WarmDisplay(Protocol):
    """Live progress of a warm: ``start`` with every row, ``update`` on each change of a
    row (from the event loop's thread), ``stop`` once every node is done or given up on."""

    def start(self, rows: list[Row]) -> None: ...

    def update(self, row: Row) -> None: ...

    def stop(self) -> None: ...


class NoDisplay:
    """Shows nothing: what a warm reports to when nobody watches."""

    def start(self, rows: list[Row]) -> None:
        pass

    def update(self, row: Row) -> None:
        pass

    def stop(self) -> None:
        pass


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
    display: WarmDisplay | None = None,
    plan: Plan | None = None,
) -> list[Row]:
    """Warm every node concurrently (at most ``parallel`` at once), retrying transient
    failures; return one row per node, in the order given. With a ``plan``, each node is
    told its peers, and nodes start in the plan's order (relays first)."""
    display = display or NoDisplay()
    rows = [Row(n) for n in nodes]
    by_name = {r.node.name: r for r in rows}
    starting = [by_name[n.name] for n in plan.order if n.name in by_name] if plan else rows
    starting += [r for r in rows if r not in starting]
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
                if plan is not None:
                    req = replace(req, peers=plan.peers_for(row.node))
                await _warm_with_retries(row, transport, req, retries, detach, display)
            finally:
                await transport.close()

    display.start(rows)
    try:
        # Created in start order: the semaphore lets them in first come, first served.
        tasks = [asyncio.ensure_future(one(r)) for r in starting]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # a bug: let the caller report it
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
    row: Row, transport: Transport, req: WarmRequest, retries: int, detach: bool, display: WarmDisplay
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


@dataclass
class WarmReport:
    """How a warm of one release onto one region went, node by node. ``to_dict`` is the
    ``weightship.warm/v1`` document (docs/json.md, weightship/schemas/warm.v1.json)."""

    ref: str  # as the caller wrote it
    name: str
    version: str
    digest: str
    region: str
    tags: list[str]
    nodes: list[Row]
    required: int
    # Detached: nodes were only asked to start, so what counts is "accepted", not "ready".
    detached: bool = False

    @property
    def counted(self) -> str:
        """The node state that counts towards ``required``."""
        return "accepted" if self.detached else "ready"

    @property
    def count(self) -> int:
        return sum(1 for row in self.nodes if row.state == self.counted)

    @property
    def ok(self) -> bool:
        return self.count >= self.required

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "weightship.warm/v1",
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "region": self.region,
            "tags": list(self.tags),
            "nodes": [row.to_dict() for row in self.nodes],
            self.counted: self.count,
            "total": len(self.nodes),
            "required": self.required,
            "ok": self.ok,
        }


async def warm_region(
    region: Region,
    release: Release,
    request: WarmRequest,
    transport_for: TransportFor,
    *,
    ref: str | None = None,
    min_ready: Share = every,
    parallel: int = 16,
    timeout: float | None = None,
    retries: int = 2,
    detach: bool = False,
    peers: bool = True,
    display: WarmDisplay | None = None,
) -> WarmReport:
    """Warm ``release`` onto every node of ``region`` with ``request`` (from
    :func:`weightship.fleet.plan.build_request`; its tags are the report's). With
    ``peers`` and at least two agents, a plan first has agents fetch from each other, so
    that each blob crosses the origin link once. ``min_ready`` of the nodes must end ready
    (accepted, when ``detach``) for the report to be ``ok``; failures are rows, not raised."""
    plan = None
    if wants_plan(region.nodes, peers):
        plan = await plan_warm(region.nodes, release.manifest, transport_for, peers=True, parallel=parallel)
    rows = await warm_nodes(
        region.nodes,
        request,
        transport_for,
        parallel=parallel,
        timeout=timeout,
        retries=retries,
        detach=detach,
        display=display,
        plan=plan,
    )
    return WarmReport(
        ref=ref or release.ref,
        name=release.name,
        version=release.version,
        digest=release.digest,
        region=region.name,
        tags=list(request.tags),
        nodes=rows,
        required=min_ready(len(rows)),
        detached=detach,
    )


# -- status ------------------------------------------------------------------------------


@dataclass
class Query:
    """What a status asks each node: a ref as the user wrote it, and what the store says it is."""

    ref: str | None = None
    version: str | None = None
    digest: str | None = None
    # Re-hash what each node holds before answering (status --verify).
    verify: bool = False


def status_queries(
    regions: list[Region],
    ref: str | None,
    store_url_for: Callable[[Region], str | None],
    *,
    verify: bool = False,
) -> dict[str, Query]:
    """What to ask the nodes of each region: ``ref`` resolved in the region's store (each
    store read once), or, without a ref, every release the nodes hold."""
    if ref is None:
        return {reg.name: Query(verify=verify) for reg in regions}
    from weightship import release
    from weightship.artifact import refs
    from weightship.store import open_store

    r = refs.Ref.parse(ref)
    resolved: dict[str | None, Release] = {}
    queries = {}
    for reg in regions:
        url = store_url_for(reg)
        if url not in resolved:
            resolved[url] = release.resolve(open_store(url), r)
        rel = resolved[url]
        queries[reg.name] = Query(f"{r.name}:{r.label or rel.version}", rel.version, rel.digest, verify)
    return queries


async def status_nodes(
    nodes: list[Node],
    query_for: Callable[[Node], Query],
    transport_for: TransportFor,
    *,
    parallel: int = 32,
    timeout: float = STATUS_TIMEOUT,
) -> list[dict[str, Any]]:
    """Each node's status document (``state`` unreachable or failed for a node that could
    not answer), with its name, region and transport."""
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
                doc = await asyncio.wait_for(transport.status(q.ref, q.version, q.digest, verify=q.verify), timeout)
            except NodeUnreachable as e:
                return {**base, **_empty(q), "state": "unreachable", "error": str(e)}
            except asyncio.TimeoutError:
                return {**base, **_empty(q), "state": "unreachable", "error": f"no answer within {timeout:g}s"}
            except WeightshipError as e:
                return {**base, **_empty(q), "state": "failed", "error": str(e)}
            finally:
                await transport.close()
        _unwrap(doc)
        if q.ref is None:
            doc["state"] = "reachable"
        return {**base, **doc}

    return list(await asyncio.gather(*(one(n) for n in nodes)))


def _unwrap(doc: dict[str, Any]) -> None:
    """A node's answer as a row of a fleet document: without what framed it on the way
    (``event``, ``op``, and the node document's own ``schema``, which an ssh node prints)."""
    for key in ("event", "op", "schema"):
        doc.pop(key, None)


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


def is_ready(row: Mapping[str, Any], with_ref: bool) -> bool:
    return row.get("state") == ("ready" if with_ref else "reachable")


@dataclass
class StatusReport:
    """Every node's status, and whether enough are ready. ``to_dict`` is the
    ``weightship.status/v1`` document (docs/json.md, weightship/schemas/status.v1.json).
    Without a ref, a node counts when it answers (``reachable``)."""

    ref: str | None  # as the caller wrote it
    regions: list[str]
    nodes: list[dict[str, Any]]  # each node's own status document, with node, region, transport
    required: int
    version: str | None = None  # what ref resolved to in the store
    digest: str | None = None

    @property
    def counted(self) -> str:
        return "ready" if self.ref is not None else "reachable"

    @property
    def ready(self) -> int:
        return sum(1 for row in self.nodes if is_ready(row, self.ref is not None))

    @property
    def ok(self) -> bool:
        return self.ready >= self.required

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": "weightship.status/v1",
            "ref": self.ref,
            "regions": list(self.regions),
            "nodes": self.nodes,
            "ready": self.ready,
            "total": len(self.nodes),
            "required": self.required,
            "ok": self.ok,
        }
        if self.ref is not None:
            doc.update(version=self.version, digest=self.digest)
        return doc


async def status_regions(
    regions: list[Region],
    queries: Mapping[str, Query],
    transport_for: TransportFor,
    *,
    ref: str | None = None,
    require: Share = every,
    watch: bool = False,
    interval: float = 2.0,
    timeout: float | None = None,
    on_wait: Callable[[StatusReport, float], None] | None = None,
) -> StatusReport:
    """Ask every node of ``regions`` (``queries`` per region, from :func:`status_queries`;
    ``ref`` as the caller wrote it). With ``watch``, ask again every ``interval`` seconds
    until ``require`` of the nodes are ready or ``timeout`` passes, calling ``on_wait``
    with the report before each pause."""
    nodes = [n for reg in regions for n in reg.nodes]
    first = next(iter(queries.values()), Query())
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        rows = await status_nodes(nodes, lambda node: queries[node.region], transport_for)
        report = StatusReport(
            ref=ref,
            regions=[reg.name for reg in regions],
            nodes=rows,
            required=require(len(nodes)),
            version=first.version if ref is not None else None,
            digest=first.digest if ref is not None else None,
        )
        if not watch or report.ok or (deadline and time.monotonic() >= deadline):
            return report
        if on_wait is not None:
            on_wait(report, interval)
        await asyncio.sleep(interval if not deadline else max(0.0, min(interval, deadline - time.monotonic())))


# -- gc ----------------------------------------------------------------------------------


async def gc_nodes(
    nodes: list[Node], transport_for: TransportFor, *, keep: int, dry_run: bool, parallel: int = 16
) -> list[dict[str, Any]]:
    """Each node's gc document (``state`` ok, or unreachable or failed with ``error``)."""
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
        _unwrap(doc)
        return {**base, "state": "ok", "error": None, **doc}

    return list(await asyncio.gather(*(one(n) for n in nodes)))


@dataclass
class GcReport:
    """What gc evicted (or would, ``dry_run``) on each node of a region; ``to_dict`` is
    the ``weightship.gc/v1`` document (docs/json.md, weightship/schemas/gc.v1.json)."""

    region: str
    dry_run: bool
    nodes: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(row["state"] == "ok" for row in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "weightship.gc/v1",
            "region": self.region,
            "dry_run": self.dry_run,
            "nodes": self.nodes,
            "ok": self.ok,
        }


async def gc_region(
    region: Region, transport_for: TransportFor, *, keep: int, dry_run: bool = False, parallel: int = 16
) -> GcReport:
    """Evict old releases on every node of ``region``: keep the ``keep`` most recently
    warmed per model, and never what a tag points at or what is pinned."""
    rows = await gc_nodes(region.nodes, transport_for, keep=keep, dry_run=dry_run, parallel=parallel)
    return GcReport(region.name, dry_run, rows)


__all__ = [
    "GcReport",
    "NoDisplay",
    "Query",
    "Row",
    "StatusReport",
    "WarmDisplay",
    "WarmReport",
    "every",
    "gc_nodes",
    "gc_region",
    "is_ready",
    "parse_duration",
    "parse_share",
    "status_nodes",
    "status_queries",
    "status_regions",
    "warm_nodes",
    "warm_region",
]
