"""Planning a warm: the request every node gets, and who fetches which blob from where.

A release is resolved once in the store; every node is handed the same manifest and
signature bytes, and URLs (or the store's address, with node credentials) to fetch blobs
from: a node never receives the caller's credentials (:func:`build_request`).

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightship.artifact import refs
from weightship.errors import UsageError, WeightshipError
from weightship.fleet.inventory import Node, Region
from weightship.fleet.transports.base import Transport
from weightship.node.protocol import WarmRequest

if TYPE_CHECKING:
    from weightship.artifact.manifest import Manifest
    from weightship.release import Release
    from weightship.store.base import Store

TransportFor = Callable[[Node], Transport]
PRESIGN_EXPIRES = 6 * 3600
# How long a node may take to say which blobs it has before the plan counts it unreachable.
HAVE_TIMEOUT = 30.0
# A node relays a blob to at most this many peers, so that no link carries a blob to the
# whole region; the tree is log(N) deep, and relays stream what they are still receiving.
PEER_FANOUT = 4
# How nodes reach the blobs: per-blob URLs the caller signs, or the store itself with the
# node's own credentials.
CREDENTIALS = ("presigned", "node")


class NoBlobUrls(UsageError):
    """The store cannot sign per-blob URLs (a file:// store, say): nodes must read it themselves."""


# -- requests ----------------------------------------------------------------------------


def warm_tags(ref: str | refs.Ref, release: Release, extra: list[str] | None = None) -> list[str]:
    """The tags a warm moves on the nodes: the tag ``ref`` names (not a version), then ``extra``."""
    r = ref if isinstance(ref, refs.Ref) else refs.Ref.parse(ref)
    tags = [r.label] if r.label and r.label != release.version else []
    tags += [refs.check_label(t, "tag") for t in extra or [] if t not in tags]
    return tags


def build_request(
    store: Store,
    release: Release,
    *,
    credentials: str = "presigned",
    tags: list[str] | None = None,
    pin: bool = False,
    max_rate: int | None = None,
    expires: int = PRESIGN_EXPIRES,
    hot: bool = False,
) -> WarmRequest:
    """The one request every node of a region gets (capacity is filled in per node)."""
    # A registry keeps blobs per repository: the scoped store's URL names it for the nodes.
    store = store.scoped(release.name)
    if credentials == "node":
        source: dict[str, Any] = {"store": store.url}
    elif credentials == "presigned":
        urls = {}
        for h in release.manifest.blobs():
            url = store.blob_url(h, expires)
            if url is None:
                raise NoBlobUrls(
                    f"the store {store.url} cannot hand out blob URLs",
                    "let the nodes read it with their own credentials",
                )
            urls[h] = url
        source = {"urls": urls}
    else:
        raise UsageError(f"credentials {credentials!r}: choose {' or '.join(CREDENTIALS)}")
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
    first, so that nobody waits on a node still queued behind the parallelism limit."""

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
    # a parallelism slot would hold its children up.
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


def wants_plan(nodes: list[Node], peers: bool) -> bool:
    """Whether a warm should plan peer transfers first: only agents serve peers, so it
    takes two of them; the plan costs every node a question."""
    return peers and sum(n.kind == "agent" for n in nodes) >= 2


async def plan_warm(
    nodes: list[Node],
    manifest: Manifest,
    transport_for: TransportFor,
    *,
    peers: bool = True,
    parallel: int = 16,
    expires: int = PRESIGN_EXPIRES,
    timeout: float = HAVE_TIMEOUT,
) -> Plan:
    """Ask every node what it has of the release, and plan who fetches what from where.
    Agents serve peers; ssh and local nodes only receive (they run no server)."""
    from weightship.node.protocol import peer_token

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


@dataclass
class PlanReport:
    """A dry run of a warm (``warm --plan``): per node, the bytes it lacks and where they
    would come from. ``to_dict`` is the ``weightship.warm-plan/v1`` document."""

    ref: str  # as the caller wrote it
    name: str
    version: str
    digest: str
    region: str
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        # docs/json.md, weightship/schemas/warm-plan.v1.json
        head = {"schema": "weightship.warm-plan/v1", "ref": self.ref, "digest": self.digest, "region": self.region}
        return head | self.plan.to_dict()


async def plan_region(
    region: Region,
    release: Release,
    transport_for: TransportFor,
    *,
    ref: str | None = None,
    peers: bool = True,
    parallel: int = 16,
) -> PlanReport:
    """What a warm of ``release`` onto ``region`` would fetch, and from where; nothing is fetched."""
    plan = await plan_warm(region.nodes, release.manifest, transport_for, peers=peers, parallel=parallel)
    return PlanReport(ref or release.ref, release.name, release.version, release.digest, region.name, plan)


__all__ = [
    "CREDENTIALS",
    "PEER_FANOUT",
    "NoBlobUrls",
    "NodePlan",
    "Plan",
    "PlanReport",
    "TransportFor",
    "build_request",
    "make_plan",
    "plan_region",
    "plan_warm",
    "wants_plan",
    "warm_tags",
]
