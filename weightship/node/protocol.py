"""The node protocol: what a caller sends a node and what the node answers, typed.

Every transport (local, ssh, agent) carries these documents, and the client side of a
transport imports this module only, never the engine that produces them. The JSON
(``to_dict()``) is the documented protocol, version ``PROTOCOL`` (docs/format.md, "Node
protocol")::

    request   {"protocol": 1, "op": "warm", "manifest": B64, "signature": B64 | null,
               "source": {"urls": {HEX: URL}} | {"store": URL},
               "peers": {"nodes": {NAME: {"url": URL, "token": T}}, "blobs": {HEX: [NAME…]}} | null,
               "tags": [TAG…], "pin": false, "capacity": BYTES | null, "max_rate": BYTES/S | null,
               "hot": false}
    progress  {"event": "progress", "state", "name", "version", "bytes_done", "bytes_total",
               "file", "message"}
    result    {"event": "result", "state": "ready" | "failed", … "digest", "bytes_fetched",
               "bytes_reused", "bytes_from_origin", "bytes_from_peers": {NAME: N}, "bad_peers": [...],
               "verified", "signer", "tags", "evicted", "hot_bytes", "error", "retryable"}

and the one-document answers of ``have``, ``status``, ``gc``, ``verify``, ``pin`` and the
agent's blob ``check``. ``from_dict()`` reads a document back; for a document this version
of weightship wrote, ``from_dict(d).to_dict() == d`` (keys a newer node adds are kept in
``extra`` and written back last).

``weightship node warm --json`` reads the request on stdin and prints one event per line,
the result last; ``node status|gc|verify|have --json`` print one result document. The agent
serves the same documents over HTTP (see :mod:`weightship.node.serve_http`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from weightship.artifact import refs
from weightship.errors import UsageError
from weightship.version import __version__

PROTOCOL = 1
# The states of a release on a node (status) and of a warm (events).
# ``staged`` is status only: the release is ready but the tag asked about points elsewhere.
STATES = ("absent", "pending", "fetching", "verifying", "ready", "staged", "failed", "evicted")
# States a warm passes through; a record left in one by a killed process is stale.
ACTIVE = ("pending", "fetching", "verifying")
HEX = re.compile(r"^[0-9a-f]{64}$")


# The JSON Schema (weightship/schemas, docs/json.md) a document names when it is printed
# for a person or a script (``node … --json``), by ``op`` (a warm's lines by ``event``).
# The protocol's own readers go by ``event`` and ``op`` and ignore the field, so a caller
# of any version reads a labelled document as it reads an unlabelled one.
SCHEMAS = {
    "status": "weightship.node-status/v1",
    "gc": "weightship.node-gc/v1",
    "verify": "weightship.node-verify/v1",
    "have": "weightship.node-have/v1",
    "pin": "weightship.node-pin/v1",
    "warm": "weightship.node-warm/v1",
    "error": "weightship.node-error/v1",
}


def labelled(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its ``schema`` first: by ``op``, else a warm's event or an error line.
    A document that already names its schema, or that is none of these, is left as it is."""
    if "schema" in doc:
        return dict(doc)
    event = doc.get("event")
    op = doc.get("op") or {"error": "error", "progress": "warm", "result": "warm"}.get(str(event))
    schema = SCHEMAS.get(str(op)) if event in ("progress", "result", "error") else None
    return {"schema": schema, **doc} if schema else dict(doc)


def is_hex(h: object) -> bool:
    """Whether ``h`` is a sha256 hex digest as blobs are named (lower case, 64 digits)."""
    return isinstance(h, str) and HEX.match(h) is not None


def _rest(d: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


# -- the request -----------------------------------------------------------------------


@dataclass
class WarmRequest:
    """What every transport carries to a node: the exact manifest and signature bytes
    resolved once by the caller, where to fetch blobs from, and which tags to move."""

    manifest: bytes
    signature: bytes | None
    source: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    pin: bool = False
    capacity: int | None = None
    max_rate: int | None = None
    # Per-node: which peers of the region to try first for which blob (the warm's plan).
    peers: dict[str, Any] | None = None
    # Read the release into the page cache once it is ready.
    hot: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "op": "warm",
            "manifest": base64.b64encode(self.manifest).decode(),
            "signature": base64.b64encode(self.signature).decode() if self.signature is not None else None,
            "source": self.source,
            "peers": self.peers,
            "tags": list(self.tags),
            "pin": self.pin,
            "capacity": self.capacity,
            "max_rate": self.max_rate,
            "hot": self.hot,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Any) -> WarmRequest:
        """The request, checked: it comes from whoever reached the node."""
        if not isinstance(d, dict):
            raise UsageError("warm request must be a JSON object")
        check_protocol(d)
        try:
            manifest = base64.b64decode(d["manifest"], validate=True)
            sig = d.get("signature")
            signature = base64.b64decode(sig, validate=True) if sig is not None else None
            tags = [refs.check_label(str(t), "tag") for t in d.get("tags") or []]
            capacity = d.get("capacity")
            max_rate = d.get("max_rate")
            for v in (capacity, max_rate):
                if v is not None and (not isinstance(v, int) or v <= 0):
                    raise ValueError("capacity and max_rate must be positive integers")
            return cls(
                manifest=manifest,
                signature=signature,
                source=d["source"],
                tags=tags,
                pin=bool(d.get("pin", False)),
                capacity=capacity,
                max_rate=max_rate,
                peers=check_peers(d.get("peers")),
                hot=bool(d.get("hot", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"malformed warm request ({e})") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> WarmRequest:
        try:
            d = json.loads(data)
        except ValueError as e:
            raise UsageError(f"warm request is not JSON ({e})") from None
        return cls.from_dict(d)


def check_peers(peers: Any) -> dict[str, Any] | None:
    """The ``peers`` part of a warm request, checked: it is untrusted input like the rest."""
    if peers is None:
        return None
    if not (isinstance(peers, dict) and isinstance(peers.get("nodes"), dict) and isinstance(peers.get("blobs"), dict)):
        raise ValueError("peers must be {nodes: {NAME: {url, token}}, blobs: {HEX: [NAME…]}}")
    for name, p in peers["nodes"].items():
        if not (isinstance(p, dict) and isinstance(p.get("url"), str) and isinstance(p.get("token"), str)):
            raise ValueError(f"peer {name!r} needs a url and a token")
        if not p["url"].startswith(("http://", "https://")):
            raise ValueError(f"peer {name!r}: url must be http:// or https://")
    for h, names in peers["blobs"].items():
        if not is_hex(h) or not isinstance(names, list) or not all(n in peers["nodes"] for n in names):
            raise ValueError(f"peers.blobs[{h[:12]!r}] must list known peer names")
    return peers


def check_protocol(d: dict[str, Any]) -> None:
    """Refuse a request in another protocol version, naming both versions."""
    proto = d.get("protocol", PROTOCOL)
    if proto != PROTOCOL:
        raise UsageError(
            f"request speaks weightship node protocol {proto}, this node speaks {PROTOCOL} (weightship {__version__})",
            "install the same weightship version on the caller and the nodes",
        )


# -- a warm's events -------------------------------------------------------------------


@dataclass
class ProgressEvent:
    """How far a warm has come; sent as it goes, rate-limited (a state change never is)."""

    state: str
    name: str | None = None
    version: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    file: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "progress",
            "state": self.state,
            "name": self.name,
            "version": self.version,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "file": self.file,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProgressEvent:
        return cls(
            state=d["state"],
            name=d.get("name"),
            version=d.get("version"),
            bytes_done=d.get("bytes_done") or 0,
            bytes_total=d.get("bytes_total") or 0,
            file=d.get("file"),
            message=d.get("message"),
        )


@dataclass
class BadPeer:
    """A peer a warm stopped asking: it failed, or (``corrupt``) sent a copy that did not verify."""

    peer: str
    file: str | None
    blob: str | None
    error: str | None
    corrupt: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "file": self.file, "blob": self.blob, "error": self.error, "corrupt": self.corrupt}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BadPeer:
        return cls(d["peer"], d.get("file"), d.get("blob"), d.get("error"), bool(d.get("corrupt")))


@dataclass
class Eviction:
    """A release evicted to make room (a warm says how much that freed) or by gc."""

    name: str
    version: str
    freed_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.freed_bytes is not None:
            out["freed_bytes"] = self.freed_bytes
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Eviction:
        return cls(d["name"], d["version"], d.get("freed_bytes"))


@dataclass
class WarmResult:
    """The last event of a warm. ``ready`` carries what was fetched from where; ``failed``
    carries ``error`` and whether trying again may help (``retryable``)."""

    state: str
    name: str | None = None
    version: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    retryable: bool = False
    # Written when ``state`` is ready.
    digest: str | None = None
    bytes_fetched: int = 0
    bytes_reused: int = 0
    bytes_from_origin: int = 0
    bytes_from_peers: dict[str, int] = field(default_factory=dict)
    bad_peers: list[BadPeer] = field(default_factory=list)
    verified: bool = False
    signer: dict[str, Any] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    evicted: list[Eviction] = field(default_factory=list)
    pinned: bool = False
    # Written when the request asked for ``hot`` (and the release became ready).
    hot_bytes: int | None = None
    hot_seconds: float | None = None
    hot_note: str | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _BASE = ("event", "state", "name", "version", "bytes_done", "bytes_total", "error", "retryable")
    _READY = (
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
    )
    _TAIL = ("hot_bytes", "hot_seconds", "hot_note", "seconds")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "result",
            "state": self.state,
            "name": self.name,
            "version": self.version,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "error": self.error,
            "retryable": self.retryable,
        }
        if self.ready:
            out.update(
                digest=self.digest,
                bytes_fetched=self.bytes_fetched,
                bytes_reused=self.bytes_reused,
                bytes_from_origin=self.bytes_from_origin,
                bytes_from_peers=dict(self.bytes_from_peers),
                bad_peers=[p.to_dict() for p in self.bad_peers],
                verified=self.verified,
                signer=self.signer,
                tags=dict(self.tags),
                evicted=[e.to_dict() for e in self.evicted],
                pinned=self.pinned,
            )
        if self.hot_bytes is not None:
            out.update(hot_bytes=self.hot_bytes, hot_seconds=self.hot_seconds)
        if self.hot_note is not None:
            out["hot_note"] = self.hot_note
        if self.seconds is not None:
            out["seconds"] = self.seconds
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WarmResult:
        ready = d.get("state") == "ready"
        known = cls._BASE + cls._TAIL + (cls._READY if ready else ())
        r = cls(
            state=d["state"],
            name=d.get("name"),
            version=d.get("version"),
            bytes_done=d.get("bytes_done") or 0,
            bytes_total=d.get("bytes_total") or 0,
            error=d.get("error"),
            retryable=bool(d.get("retryable")),
            hot_bytes=d.get("hot_bytes"),
            hot_seconds=d.get("hot_seconds"),
            hot_note=d.get("hot_note"),
            seconds=d.get("seconds"),
            extra=_rest(d, known),
        )
        if ready:
            r.digest = d.get("digest")
            r.bytes_fetched = d.get("bytes_fetched") or 0
            r.bytes_reused = d.get("bytes_reused") or 0
            r.bytes_from_origin = d.get("bytes_from_origin") or 0
            r.bytes_from_peers = dict(d.get("bytes_from_peers") or {})
            r.bad_peers = [BadPeer.from_dict(p) for p in d.get("bad_peers") or []]
            r.verified = bool(d.get("verified"))
            r.signer = d.get("signer")
            r.tags = dict(d.get("tags") or {})
            r.evicted = [Eviction.from_dict(e) for e in d.get("evicted") or []]
            r.pinned = bool(d.get("pinned"))
        return r


def parse_event(d: dict[str, Any]) -> ProgressEvent | WarmResult:
    """One line of a warm's event stream."""
    if d.get("event") == "progress":
        return ProgressEvent.from_dict(d)
    if d.get("event") == "result":
        return WarmResult.from_dict(d)
    raise ValueError(f"not a warm event: {str(d)[:80]}")


# -- one-document answers --------------------------------------------------------------


@dataclass
class HaveResult:
    """Which blobs a cache holds whole (size), and the bytes of partial downloads of others."""

    blobs: dict[str, int] = field(default_factory=dict)
    partial: dict[str, int] = field(default_factory=dict)
    free_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "result",
            "op": "have",
            "blobs": dict(self.blobs),
            "partial": dict(self.partial),
            "free_bytes": self.free_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HaveResult:
        return cls(dict(d.get("blobs") or {}), dict(d.get("partial") or {}), d.get("free_bytes"))


@dataclass
class ReleaseStatus:
    """One release on a node. ``tag`` is the tag asked about (if any) and ``tag_version``
    where it points on the node; ``tags`` are every tag pointing at ``version``."""

    name: str
    version: str
    tag: str | None = None
    tag_version: str | None = None
    tags: list[str] = field(default_factory=list)
    digest: str | None = None
    state: str = "absent"
    bytes_present: int = 0
    bytes_total: int | None = None
    verified: bool = False
    signer: dict[str, Any] | None = None
    last_warm: str | None = None
    pinned: bool = False
    error: str | None = None

    _KEYS = (
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
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "tag": self.tag,
            "tag_version": self.tag_version,
            "tags": list(self.tags),
            "digest": self.digest,
            "state": self.state,
            "bytes_present": self.bytes_present,
            "bytes_total": self.bytes_total,
            "verified": self.verified,
            "signer": self.signer,
            "last_warm": self.last_warm,
            "pinned": self.pinned,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReleaseStatus:
        return cls(
            name=d["name"],
            version=d["version"],
            tag=d.get("tag"),
            tag_version=d.get("tag_version"),
            tags=list(d.get("tags") or []),
            digest=d.get("digest"),
            state=d.get("state") or "absent",
            bytes_present=d.get("bytes_present") or 0,
            bytes_total=d.get("bytes_total"),
            verified=bool(d.get("verified")),
            signer=d.get("signer"),
            last_warm=d.get("last_warm"),
            pinned=bool(d.get("pinned")),
            error=d.get("error"),
        )


@dataclass
class StatusResult:
    """A node's status: of one release (``release``, its fields written at the top level
    of the document) or of every release it has a record of (``releases``)."""

    cache: str
    free_bytes: int | None = None
    capacity: int | None = None
    policy: str | None = None
    weightship: str = __version__
    protocol: int = PROTOCOL
    release: ReleaseStatus | None = None
    releases: list[ReleaseStatus] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _BASE = ("event", "op", "cache", "free_bytes", "capacity", "policy", "weightship", "protocol")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "result",
            "op": "status",
            "cache": self.cache,
            "free_bytes": self.free_bytes,
            "capacity": self.capacity,
            "policy": self.policy,
            "weightship": self.weightship,
            "protocol": self.protocol,
        }
        if self.releases is not None:
            out["releases"] = [r.to_dict() for r in self.releases]
        if self.release is not None:
            out.update(self.release.to_dict())
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatusResult:
        out = cls(
            cache=d["cache"],
            free_bytes=d.get("free_bytes"),
            capacity=d.get("capacity"),
            policy=d.get("policy"),
            weightship=d.get("weightship") or "",
            protocol=d.get("protocol") or PROTOCOL,
        )
        known: tuple[str, ...] = cls._BASE
        if "releases" in d:
            out.releases = [ReleaseStatus.from_dict(r) for r in d["releases"] or []]
            known += ("releases",)
        if "name" in d:
            out.release = ReleaseStatus.from_dict(d)
            known += ReleaseStatus._KEYS
        out.extra = _rest(d, known)
        return out


@dataclass
class GcResult:
    """What gc evicted (or, ``dry_run``, would), what it kept, and the bytes freed."""

    dry_run: bool
    evicted: list[Eviction] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    free_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "result",
            "op": "gc",
            "dry_run": self.dry_run,
            "evicted": [e.to_dict() for e in self.evicted],
            "kept": list(self.kept),
            "freed_bytes": self.freed_bytes,
            "free_bytes": self.free_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GcResult:
        return cls(
            dry_run=bool(d.get("dry_run")),
            evicted=[Eviction.from_dict(e) for e in d.get("evicted") or []],
            kept=list(d.get("kept") or []),
            freed_bytes=d.get("freed_bytes") or 0,
            free_bytes=d.get("free_bytes"),
        )


@dataclass
class VerifyResult:
    """A release re-hashed and found whole (a damaged one is an error, not a result)."""

    name: str
    version: str
    files: int
    verified: bool
    signer: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "result",
            "op": "verify",
            "name": self.name,
            "version": self.version,
            "files": self.files,
            "verified": self.verified,
            "signer": self.signer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifyResult:
        return cls(d["name"], d["version"], d.get("files") or 0, bool(d.get("verified")), d.get("signer"))


@dataclass
class CheckResult:
    """One blob re-hashed after a peer reported a bad copy of it: whether this node holds
    it, whether it is corrupt, and (when held) the releases withdrawn because it is."""

    blob: str
    held: bool
    corrupt: bool = False
    withdrawn: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "result",
            "op": "check",
            "blob": self.blob,
            "held": self.held,
            "corrupt": self.corrupt,
        }
        if self.withdrawn is not None:
            out["withdrawn"] = list(self.withdrawn)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        w = d.get("withdrawn")
        return cls(d["blob"], bool(d.get("held")), bool(d.get("corrupt")), list(w) if w is not None else None)


@dataclass
class PinResult:
    """A release pinned (never evicted) or unpinned."""

    name: str
    version: str
    pinned: bool

    def to_dict(self) -> dict[str, Any]:
        return {"event": "result", "op": "pin", "name": self.name, "version": self.version, "pinned": self.pinned}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PinResult:
        return cls(d["name"], d["version"], bool(d.get("pinned")))


# -- peer tokens ------------------------------------------------------------------------

_EXPIRES = re.compile(r"[0-9]{1,20}")


def peer_token(token: str, expires: int) -> str:
    """A read-only credential for this agent's blob endpoint, valid until ``expires``
    (Unix time), derived from the agent's token: whoever holds the agent token can mint
    one, and one reveals nothing about the agent token."""
    mac = hmac.new(token.encode(), f"weightship-peer-read:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"peer.{expires}.{mac}"


def check_peer_token(token: str, presented: str, now: float | None = None) -> bool:
    """Whether ``presented`` is a peer token minted with ``token`` that has not expired.
    Anything malformed is False, never an exception: the header comes from anyone."""
    parts = presented.split(".")
    # ASCII digits only, and few of them: str.isdigit() accepts '²', which int() refuses,
    # and int() refuses more than 4300 digits; either would answer 500 instead of 401.
    if len(parts) != 3 or parts[0] != "peer" or not _EXPIRES.fullmatch(parts[1]):
        return False
    expires = int(parts[1])
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(peer_token(token, expires).encode(), presented.encode())


__all__ = [
    "ACTIVE",
    "PROTOCOL",
    "SCHEMAS",
    "STATES",
    "BadPeer",
    "CheckResult",
    "Eviction",
    "GcResult",
    "HaveResult",
    "PinResult",
    "ProgressEvent",
    "ReleaseStatus",
    "StatusResult",
    "VerifyResult",
    "WarmRequest",
    "WarmResult",
    "check_peer_token",
    "check_peers",
    "check_protocol",
    "is_hex",
    "labelled",
    "parse_event",
    "peer_token",
]
