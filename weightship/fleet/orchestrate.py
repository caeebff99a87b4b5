"""Fleet orchestration: warm, status and gc over every node of a region, concurrently.

A release is resolved once in the store; every node is handed the same manifest and
signature bytes, and URLs (or the store's address, with ``--credentials node``) to fetch
blobs from: a node never receives the caller's credentials. Each node's own engine does
the rest and reports events, which become one live row per node.

Peer-assisted warms (:func:`plan_warm`): the planner asks every node which blobs it has,
then gives each blob one *root* in the region (an agent that holds it, or else one that
fetches it from the origin, spreading origin bytes evenly over the agents) and arranges
the other nodes that need it in a tree below the root, each fetching from its parent
while the parent is still receiving. So each blob crosses the origin link once, and no
node sends a blob to more than ``PEER_FANOUT`` others. Each node is told its sources per
blob, in order (parent, root, other holders); the origin is always the last resort.
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

from weightship.artifact.manifest import Manifest
from weightship.errors import UsageError, WeightshipError
from weightship.fleet.inventory import Node
from weightship.fleet.transports.base import NodeFailed, NodeUnreachable, Transport
from weightship.node.cache import WarmRequest
from weightship.progress import human_bytes

TransportFor = Callable[[Node], Transport]
RETRY_DELAYS = (1.0, 3.0, 8.0)
PRESIGN_EXPIRES = 6 * 3600
STATUS_TIMEOUT = 30.0
# A node relays a blob to at most this many peers, so that no link carries a blob to the
# whole region; the tree is log(N) deep, and relays stream what they are still receiving.
PEER_FANOUT = 4


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
    hot: bool = False,
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
        hot=hot,
    )


# -- peer-assisted planning --------------------------------------------------------------


@dataclass
class NodePlan:
    """What one node will fetch, and from where, if nothing fails."""

    node: Node
    missing: int | None = None  # bytes it lacks; None when it did not answer
    from_origin: int = 0
    from_peers: dict[str, int] = field(default_factory=dict)
    serves: int = 0  # bytes it relays to peers
    error: str | None = None
    blobs: dict[str, list[str]] = field(default_factory=dict)  # HEX -> peers to try, in order

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node.name,
            "transport": self.node.transport,
            "state": "unreachable" if self.error else "ok",
            "missing": self.missing,
            "from_origin": self.from_origin,
            "from_peers": dict(sorted(self.from_peers.items())),
            "serves": self.serves,
            "error": self.error,
        }


@dataclass
class Plan:
    """Who fetches which blob from where. ``order`` is the order nodes start in: relays
    first, so that nobody waits on a node still queued behind ``--parallel``."""

    nodes: list[NodePlan]
    release_bytes: int
    peers: bool
    order: list[Node]
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # peer -> {url, token}

    @property
    def origin_bytes(self) -> int:
        return sum(n.from_origin for n in self.nodes)

    @property
    def origin_bytes_without_peers(self) -> int:
        return sum(self.release_bytes if n.missing is None else n.missing for n in self.nodes)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.node.name == name)

    def peers_for(self, node: Node) -> dict[str, Any] | None:
        """The ``peers`` part of this node's warm request."""
        np = self.node(node.name)
        if not np.blobs:
            return None
        names = sorted({p for ps in np.blobs.values() for p in ps})
        return {"nodes": {n: self.endpoints[n] for n in names}, "blobs": dict(np.blobs)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "peers": self.peers,
            "release_bytes": self.release_bytes,
            "origin_bytes": self.origin_bytes,
            "origin_bytes_without_peers": self.origin_bytes_without_peers,
            "nodes": [n.to_dict() for n in self.nodes],
        }


def make_plan(
    nodes: list[Node],
    blobs: dict[str, int],
    inventory: dict[str, dict[str, Any] | str],
    *,
    peers: bool = True,
    parallel: int = 16,
    servers: set[str] | None = None,
) -> Plan:
    """The plan, from each node's answer to ``have`` (a document, or an error string).
    ``servers`` are the nodes that can serve peers (agents; default: every node)."""
    total = sum(blobs.values())
    plans = {n.name: NodePlan(n) for n in nodes}
    need: dict[str, dict[str, int]] = {}
    whole: dict[str, set[str]] = {}
    for n in nodes:
        inv = inventory.get(n.name)
        if isinstance(inv, dict):
            have = set(inv.get("blobs") or {})
            partial = inv.get("partial") or {}
            need[n.name] = {h: size - min(size, int(partial.get(h, 0))) for h, size in blobs.items() if h not in have}
            whole[n.name] = have & set(blobs)
            plans[n.name].missing = sum(need[n.name].values())
        else:
            plans[n.name].error = inv if isinstance(inv, str) else "no answer"
            need[n.name] = dict(blobs)
            whole[n.name] = set()
    can_serve = [n for n in nodes if isinstance(inventory.get(n.name), dict) and (servers is None or n.name in servers)]
    order = can_serve + [n for n in nodes if n not in can_serve]
    plan = Plan([plans[n.name] for n in nodes], total, peers, order)
    first_wave = {n.name for n in order[: max(1, parallel)]}
    # Only nodes warming from the start relay what they are receiving: one that waits for
    # a --parallel slot would hold its children up.
    relays = [n for n in can_serve if n.name in first_wave]
    if not peers or not can_serve or len(nodes) < 2:
        for n in nodes:
            plans[n.name].from_origin = sum(need[n.name].values())
        return plan
    origin_load = {n.name: 0 for n in nodes}
    for b, (h, size) in enumerate(sorted(blobs.items(), key=lambda kv: (-kv[1], kv[0]))):
        needers = [n for n in order if h in need[n.name]]
        if not needers:
            continue
        holders = [n for n in can_serve if h in whole[n.name]]
        inner = [n for n in needers if n in relays]
        if holders:
            root = min(holders, key=lambda n: plans[n.name].serves)
            others = [x.name for x in holders if x is not root]
        elif inner:
            root = min(inner, key=lambda n: (origin_load[n.name], need[n.name][h]))
            inner.remove(root)
            plans[root.name].from_origin += need[root.name][h]
            origin_load[root.name] += size
            others = []
        else:
            # Nobody here can relay it: each node that needs it fetches it from the origin.
            for n in needers:
                plans[n.name].from_origin += need[n.name][h]
            continue
        # Rotated per blob, so that every relay is near the root of some trees and a leaf
        # of others: the relaying work is spread over the region.
        k = b % len(inner) if inner else 0
        tree = [root, *inner[k:], *inner[:k]]
        leaves = [n for n in needers if n not in tree]
        for i, n in enumerate(tree[1:] + leaves, start=1):
            parent = tree[(i - 1) // PEER_FANOUT] if i < len(tree) else tree[(i - len(tree)) % len(tree)]
            sources = list(dict.fromkeys([parent.name, root.name, *others]))
            plans[n.name].blobs[h] = sources
            plans[n.name].from_peers[parent.name] = plans[n.name].from_peers.get(parent.name, 0) + need[n.name][h]
            plans[parent.name].serves += need[n.name][h]
    return plan


async def plan_warm(
    nodes: list[Node],
    manifest: Manifest,
    transport_for: TransportFor,
    *,
    peers: bool = True,
    parallel: int = 16,
    expires: int = PRESIGN_EXPIRES,
    timeout: float = STATUS_TIMEOUT,
) -> Plan:
    """Ask every node what it has of the release, and plan who fetches what from where.
    Agents serve peers; ssh and local nodes only receive (they run no server)."""
    from weightship.node.serve_http import peer_token

    blobs = manifest.blobs()
    hexes = sorted(blobs)
    sem = asyncio.Semaphore(32)

    async def one(node: Node) -> tuple[str, dict[str, Any] | str]:
        async with sem:
            try:
                transport = transport_for(node)
            except WeightshipError as e:
                return node.name, str(e)
            try:
                return node.name, await asyncio.wait_for(transport.have(hexes), timeout)
            except asyncio.TimeoutError:
                return node.name, f"no answer within {timeout:g}s"
            except WeightshipError as e:
                return node.name, str(e)
            finally:
                await transport.close()

    inventory = dict(await asyncio.gather(*(one(n) for n in nodes)))
    until = int(time.time()) + expires
    endpoints: dict[str, dict[str, str]] = {}
    for n in nodes:
        if n.kind != "agent" or not isinstance(inventory.get(n.name), dict):
            continue
        try:
            token = n.read_token()
        except WeightshipError:
            continue
        # https:// for an agent serving TLS, so that peer transfers between such agents use it too.
        endpoints[n.name] = {"url": n.agent_url, "token": peer_token(token, until)}
    plan = make_plan(nodes, blobs, inventory, peers=peers, parallel=parallel, servers=set(endpoints))
    plan.endpoints = endpoints
    return plan


def render_plan(plan: Plan, title: str) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for col in ("node", "missing", "from origin", "from peers", "relays"):
        table.add_column(col, justify="left" if col in ("node", "from peers") else "right")
    for n in plan.nodes:
        if n.error:
            table.add_row(n.node.name, "?", human_bytes(n.from_origin), "", "", style="red")
            continue
        peers = ", ".join(f"{p} {human_bytes(b)}" for p, b in sorted(n.from_peers.items()))
        table.add_row(
            n.node.name,
            human_bytes(n.missing or 0),
            human_bytes(n.from_origin),
            peers,
            human_bytes(n.serves) if n.serves else "",
        )
    console = _console()
    console.print(table)
    for n in plan.nodes:
        if n.error:
            console.print(f"{n.node.name}: unreachable: {n.error}", markup=False, soft_wrap=True)
    ratio = plan.origin_bytes / plan.release_bytes if plan.release_bytes else 0.0
    without = human_bytes(plan.origin_bytes_without_peers)
    how = "with peers" if plan.peers else "without peers (--no-peers)"
    console.print(
        f"the origin will send {human_bytes(plan.origin_bytes)} ({ratio:.2f} x the release) {how}; "
        f"{without} if every node fetched from it",
        markup=False,
        soft_wrap=True,
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
    plan: Plan | None = None,
) -> list[Row]:
    """Warm every node concurrently (at most ``parallel`` at once), retrying transient
    failures; return one row per node, in the order given. With a ``plan``, each node is
    told its peers, and nodes start in the plan's order (relays first)."""
    display = display or Display()
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
    # Re-hash what each node holds before answering (status --verify).
    verify: bool = False


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
                doc = await asyncio.wait_for(transport.status(q.ref, q.version, q.digest, verify=q.verify), timeout)
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
        for bad in (r.result or {}).get("bad_peers") or []:
            console.print(
                f"{r.node.name}: peer {bad.get('peer')} {bad.get('error')} ({bad.get('file')}); "
                "fetched from another source",
                markup=False,
                soft_wrap=True,
            )
        if (r.result or {}).get("hot_note"):
            console.print(f"{r.node.name}: {r.result['hot_note']}", markup=False, soft_wrap=True)
    results = [r.result for r in rows if r.result]
    if any(res.get("bytes_from_peers") for res in results):
        origin = sum(res.get("bytes_from_origin") or 0 for res in results)
        peers = sum(sum((res.get("bytes_from_peers") or {}).values()) for res in results)
        console.print(f"from the origin {human_bytes(origin)}, from peers {human_bytes(peers)}")


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
    "NodePlan",
    "Plan",
    "Query",
    "Row",
    "build_request",
    "gc_nodes",
    "is_ready",
    "make_display",
    "make_plan",
    "parse_duration",
    "parse_share",
    "plan_warm",
    "render_gc",
    "render_plan",
    "render_status",
    "render_warm",
    "status_nodes",
    "warm_nodes",
]
