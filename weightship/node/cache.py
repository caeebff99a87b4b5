"""The node engine's entry point: :class:`NodeCache`, one cache directory on a node's NVMe,
and the only code that changes it.

Every transport (local, ssh, agent) calls it; none has cache logic of its own. It stands
on these parts of :mod:`weightship.node`, none of which imports it:

    protocol   the typed requests, events and results, and their JSON
    layout     the directory, its records, lock and tags (:class:`CacheLayout`)
    arrivals   blobs on their way in, as peers read them
    warm       the warm pipeline
    space      making room, eviction, gc
    integrity  re-hashing (verify, a peer's report of a bad blob), quarantine, withdrawal
    fetch      where blob bytes come from (the origin, the peers of a region)
    metrics    what a warm tells as bytes move (a no-op :class:`Meter`, or the agent's)

What is here: status (what a node holds, and in which state), ``have`` (for a warm's
planner), pins, and blobs opened for peers. The methods answer with the protocol's JSON
documents (``to_dict()`` of the typed results); the typed results themselves come from
:func:`status_of`, :func:`have_of`, :func:`pin_release`, :func:`weightship.node.warm.warm_release`,
:func:`weightship.node.space.gc`, :func:`weightship.node.integrity.verify_release` and
:func:`weightship.node.integrity.check_blob`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from weightship.artifact import refs
from weightship.errors import IntegrityError, SignatureError, SpaceError, UsageError
from weightship.node import integrity, space
from weightship.node.arrivals import Arrivals, PeerBlob, open_peer_blob
from weightship.node.layout import CacheLayout, Record, size_of
from weightship.node.metrics import NO_METER, Meter
from weightship.node.protocol import (
    ACTIVE,
    PROTOCOL,
    STATES,
    HaveResult,
    PinResult,
    ProgressEvent,
    ReleaseStatus,
    StatusResult,
    WarmRequest,
    WarmResult,
    is_hex,
)
from weightship.node.warm import warm_release
from weightship.version import __version__

# What NodeCache.warm hands each event to: the protocol's JSON document of it.
Emit = Callable[[dict[str, Any]], None]


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeCache(CacheLayout):
    """One node cache. ``policy`` is the node's own trust policy: it is applied to every
    warm whatever the caller asked for, and a caller cannot weaken it."""

    # -- entry points (JSON documents of the protocol) ------------------------------

    def warm(self, req: WarmRequest, emit: Emit | None = None, *, meter: Meter = NO_METER) -> dict[str, Any]:
        """Make the release in ``req`` ready here; return the result event (never raises
        for a failure it understands: the result says ``failed`` and why). ``emit`` gets
        every event, the result last. ``meter`` is told the bytes fetched per source,
        copies that did not verify and the warm's duration (the agent passes its metrics)."""

        def on_event(ev: ProgressEvent | WarmResult) -> None:
            if emit is not None:
                emit(ev.to_dict())

        return warm_release(self, req, on_event, meter=meter).to_dict()

    def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        """Readiness of one release (``ref`` NAME:TAG or NAME:VERSION; ``version`` and
        ``digest`` say what the store expects), or of every release when ``ref`` is None.
        ``verify`` re-hashes what is ready first (:meth:`verify`): a release whose bytes
        changed on disk is then reported ``failed`` and no longer served."""
        return status_of(self, ref, version, digest, verify=verify).to_dict()

    def have(self, hexdigests: list[str]) -> dict[str, Any]:
        """Which of these blobs the cache holds whole (verified), and how much of the others
        an interrupted download kept: what a warm's planner needs to move each byte once."""
        return have_of(self, hexdigests).to_dict()

    def gc(self, keep: int = 2, dry_run: bool = False) -> dict[str, Any]:
        """Evict per policy: keep each model's ``keep`` most recently warmed releases and
        whatever a tag points at or is pinned; drop failed releases and orphan blobs."""
        return space.gc(self, keep, dry_run).to_dict()

    def verify(self, ref: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Re-hash a materialised release against its manifest (and the node's policy).
        A damaged one is withdrawn (see :mod:`weightship.node.integrity`) and raises."""
        return integrity.verify_release(self, ref, progress).to_dict()

    def check_blob(self, h: str) -> dict[str, Any]:
        """Re-hash one blob after a peer reported that the copy it got from here did not
        verify; a corrupt one is quarantined and the releases using it withdrawn."""
        return integrity.check_blob(self, h).to_dict()

    def pin(self, ref: str, pinned: bool = True) -> dict[str, Any]:
        """Pin a release (gc and eviction never take it) or unpin it."""
        return pin_release(self, ref, pinned).to_dict()

    def open_peer_blob(self, h: str) -> PeerBlob | str:
        """A blob for a peer: a :class:`PeerBlob`, ``"queued"`` when a running warm will
        fetch it but has not started, or ``"absent"``. Only verified blobs and blobs that a
        warm is fetching now are served; a partial file left by an interrupted warm is not."""
        if not is_hex(h):
            return "absent"
        return open_peer_blob(self.arrivals, self.blobs, self.partial, h)


# -- status, have, pin -----------------------------------------------------------------


def status_of(
    cache: CacheLayout,
    ref: str | None = None,
    version: str | None = None,
    digest: str | None = None,
    *,
    verify: bool = False,
) -> StatusResult:
    """The typed status of one release or of every release (see :meth:`NodeCache.status`)."""
    if verify:
        _verify_ready(cache, ref, version)
    out = StatusResult(
        cache=str(cache.root),
        free_bytes=cache.free_bytes() if cache.root.exists() else None,
        capacity=cache.capacity,
        policy=cache.policy.describe() if cache.policy.required else None,
        weightship=__version__,
        protocol=PROTOCOL,
    )
    if ref is None:
        out.releases = [_release_status(cache, r["name"], r["version"], None, None) for r in cache.records()]
        return out
    r = refs.Ref.parse(ref)
    if r.label is None:
        raise UsageError("node status takes NAME:TAG or NAME:VERSION", "pass the digest with --digest")
    out.release = _release_status(cache, r.name, version, r.label, digest)
    return out


def _verify_ready(cache: CacheLayout, ref: str | None, version: str | None) -> None:
    if ref is None:
        targets = [(r["name"], r["version"]) for r in cache.records() if r["state"] == "ready"]
    else:
        r = refs.Ref.parse(ref)
        if r.label is None:
            return
        targets = [(r.name, version or cache.tags(r.name).get(r.label, r.label))]
    for name, v in targets:
        rec = cache.read_record(name, v)
        if rec and rec.get("state") == "ready":
            # The damage is recorded, and reported by the status that follows.
            with contextlib.suppress(IntegrityError, SignatureError):
                integrity.verify_release(cache, f"{name}:{v}")


def _release_status(
    cache: CacheLayout, name: str, version: str | None, label: str | None, digest: str | None
) -> ReleaseStatus:
    tags = cache.tags(name)
    tag = label if label is not None and (label in tags or (version is not None and label != version)) else None
    tag_version = tags.get(tag) if tag else None
    version = version or tag_version or label
    assert version is not None
    rec = cache.read_record(name, version)
    out = ReleaseStatus(
        name=name,
        version=version,
        tag=tag,
        tag_version=tag_version,
        tags=sorted(t for t, v in tags.items() if v == version),
    )
    if rec is None:
        if tag and tag_version is None:
            out.error = f"no tag {tag} and no {name}:{version} on this node"
        return out
    state = rec["state"]
    error = rec.get("error")
    if state in ACTIVE and cache.holder_run() != rec.get("run"):
        state, error = "failed", "the warm was interrupted (its process ended); run warm again to resume"
    out.digest = rec.get("digest")
    out.state = state
    out.bytes_present = _bytes_present(cache, name, version, rec)
    out.bytes_total = rec.get("bytes_total")
    out.verified = bool(rec.get("verified")) and state == "ready"
    out.signer = rec.get("signer")
    out.last_warm = iso(rec.get("warmed"))
    out.pinned = bool(rec.get("pinned"))
    out.error = error
    if digest and rec.get("digest") != digest and state != "evicted":
        out.state = "failed"
        out.error = f"this node holds {name}:{version} with another digest ({rec.get('digest')})"
    elif state == "ready" and tag and tag_version != version:
        # Every byte is here and verified, but what serves from models/NAME/TAG still
        # reads another version (or nothing): not ready for traffic, and not pending
        # either, since nothing is being fetched. Only the tag switch is missing.
        where = f"still points at {tag_version}" if tag_version else "is not set"
        out.state = "staged"
        out.error = f"{name}:{tag} {where} on this node; run warm {name}:{tag} to switch it"
    return out


def _bytes_present(cache: CacheLayout, name: str, version: str, rec: Record) -> int:
    if rec["state"] == "ready":
        return int(rec.get("bytes_total") or 0)
    if rec["state"] == "evicted":
        return 0
    m = cache.manifest(name, version)
    if m is None:
        return 0
    total = 0
    for h, size in m.blobs().items():
        if (cache.blobs / h).exists():
            total += size
        else:
            total += min(size, size_of(cache.partial / h))
    return total


def have_of(cache: CacheLayout, hexdigests: list[str]) -> HaveResult:
    """The typed answer to ``have`` (see :meth:`NodeCache.have`)."""
    out = HaveResult()
    for h in hexdigests:
        if not is_hex(h):
            raise UsageError(f"{str(h)[:80]!r} is not a sha256 hex digest")
        try:
            out.blobs[h] = (cache.blobs / h).stat().st_size
        except FileNotFoundError:
            if n := size_of(cache.partial / h):
                out.partial[h] = n
    out.free_bytes = cache.free_bytes() if cache.root.exists() else None
    return out


def pin_release(cache: CacheLayout, ref: str, pinned: bool = True) -> PinResult:
    """Pin a release (or unpin it): a pinned release is never evicted."""
    name, version = cache.locate(ref)
    with cache.lock():
        rec = cache.read_record(name, version) or {}
        rec["pinned"] = pinned
        cache.write_record(rec)
    return PinResult(name, version, pinned)


__all__ = [
    "PROTOCOL",
    "STATES",
    "Arrivals",
    "Emit",
    "NodeCache",
    "PeerBlob",
    "SpaceError",
    "WarmRequest",
    "have_of",
    "iso",
    "pin_release",
    "status_of",
]
