"""Space in a node cache: making room for a warm, and gc.

A release may be evicted only when no tag points at it and nobody pinned it; the least
recently used go first. A blob is deleted once no release that is not evicted uses it.
"""

from __future__ import annotations

import os
import shutil
import uuid

from weightship.errors import SpaceError, UsageError
from weightship.node.layout import CacheLayout, Record, now
from weightship.node.protocol import ACTIVE, Eviction, GcResult
from weightship.progress import human_bytes

# Room kept free beyond the blobs themselves, for directories, links and records.
RESERVE = 1024 * 1024

Key = tuple[str, str]


def make_room(cache: CacheLayout, name: str, version: str, need: int, capacity: int | None) -> list[Eviction]:
    """Evict least-recently-used releases that no tag points at and nobody pinned, only
    if that is enough for ``need`` bytes; otherwise fail before a byte is moved."""
    free = cache.free_bytes(capacity)
    if need + RESERVE <= free:
        return []
    plan, freed = eviction_plan(cache, skip={(name, version)}, want=need + RESERVE - free)
    if need + RESERVE > free + freed:
        short = need + RESERVE - free - freed
        extra = f" (evicting every untagged, unpinned release would free {human_bytes(freed)})" if freed else ""
        raise SpaceError(
            f"not enough space for {name}:{version} in {cache.root}: {human_bytes(need)} to fetch, "
            f"{human_bytes(max(0, free - RESERVE))} free{extra}; {human_bytes(short)} missing",
            "free disk space, raise the node's capacity, or move tags off old releases; nothing was fetched",
        )
    return [evict(cache, rec) for rec in plan]


def eviction_plan(cache: CacheLayout, skip: set[Key], want: int | None) -> tuple[list[Record], int]:
    """The releases to evict, least recently used first, until ``want`` bytes would be
    freed (every candidate when None), and the bytes that would free."""
    records = cache.records()
    protected = _protected(cache, records) | skip
    candidates = [
        r for r in records if r["state"] in ("ready", "failed") and (r["name"], r["version"]) not in protected
    ]
    candidates.sort(key=_last_used)
    live = {(r["name"], r["version"]) for r in records if r["state"] != "evicted"}
    plan: list[Record] = []
    freed = 0
    for rec in candidates:
        if want is not None and freed >= want:
            break
        plan.append(rec)
        live.discard((rec["name"], rec["version"]))
        freed = _unreferenced_bytes(cache, live, {(r["name"], r["version"]) for r in plan})
    return plan, freed


def evict(cache: CacheLayout, rec: Record) -> Eviction:
    """Evict one release: its tree leaves ``models/``, and so do the blobs it alone used."""
    name, version = rec["name"], rec["version"]
    target = cache.models / name / version
    if target.is_dir():
        trash = cache.staging / f"evict-{uuid.uuid4().hex}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    # Recorded first: the blobs it alone used are then unreferenced and go too.
    rec.update(state="evicted", evicted=now(), error=None)
    cache.write_record(rec)
    freed = delete_unreferenced(cache)
    return Eviction(name, version, freed)


def delete_unreferenced(cache: CacheLayout) -> int:
    """Delete every blob and partial download no release that is not evicted uses; return the bytes freed."""
    live = {(r["name"], r["version"]) for r in cache.records() if r["state"] != "evicted"}
    keep = _blob_refs(cache, live)
    freed = 0
    for d in (cache.blobs, cache.partial):
        for e in list(os.scandir(d)):
            if e.name not in keep:
                freed += e.stat().st_size
                os.unlink(e.path)
    return freed


def gc(cache: CacheLayout, keep: int = 2, dry_run: bool = False) -> GcResult:
    """Evict per policy: keep each model's ``keep`` most recently warmed releases and
    whatever a tag points at or is pinned; drop failed releases and orphan blobs."""
    if keep < 0:
        raise UsageError("keep must be 0 or more")
    cache.ensure()
    with cache.lock():
        records = cache.records()
        protected = _protected(cache, records)
        victims = []
        by_name: dict[str, list[Record]] = {}
        for r in records:
            if r["state"] == "ready":
                by_name.setdefault(r["name"], []).append(r)
            elif r["state"] in ("failed", *ACTIVE) and (r["name"], r["version"]) not in protected:
                # Under the lock no warm runs: an active state is one a killed warm left.
                victims.append(r)
        kept = []
        for rs in by_name.values():
            rs.sort(key=_last_used, reverse=True)
            for i, r in enumerate(rs):
                if (r["name"], r["version"]) in protected or i < keep:
                    kept.append(f"{r['name']}:{r['version']}")
                else:
                    victims.append(r)
        live = {(r["name"], r["version"]) for r in records if r["state"] != "evicted"}
        gone = {(r["name"], r["version"]) for r in victims}
        freed = _unreferenced_bytes(cache, live - gone, gone)
        evicted = [Eviction(r["name"], r["version"]) for r in victims]
        if not dry_run:
            freed = sum(evict(cache, r).freed_bytes or 0 for r in victims) + delete_unreferenced(cache)
            # Left by a process killed while linking; nothing else uses them under the lock.
            shutil.rmtree(cache.staging, ignore_errors=True)
            shutil.rmtree(cache.quarantine, ignore_errors=True)
            cache.staging.mkdir(parents=True, exist_ok=True)
            # Logs of detached warms (a running one holds the lock, so none is running).
            for log in (cache.state / "requests").glob("*.log"):
                log.unlink(missing_ok=True)
        return GcResult(
            dry_run=dry_run, evicted=evicted, kept=sorted(kept), freed_bytes=freed, free_bytes=cache.free_bytes()
        )


def _last_used(rec: Record) -> float:
    # A release is "used" when warmed and until a tag moves off it; a failed one never
    # was, so its last attempt stands in.
    return max(rec.get("warmed") or rec.get("updated") or 0, rec.get("untagged") or 0)


def _protected(cache: CacheLayout, records: list[Record]) -> set[Key]:
    out = {(r["name"], r["version"]) for r in records if r.get("pinned")}
    for name in {r["name"] for r in records}:
        out |= {(name, v) for v in cache.tags(name).values()}
    return out


def _blob_refs(cache: CacheLayout, keys: set[Key]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, version in keys:
        m = cache.manifest(name, version)
        if m:
            out.update(m.blobs())
    return out


def _unreferenced_bytes(cache: CacheLayout, live: set[Key], gone: set[Key]) -> int:
    keep = _blob_refs(cache, live)
    return sum(size for h, size in _blob_refs(cache, gone).items() if h not in keep and (cache.blobs / h).exists())


__all__ = ["RESERVE", "delete_unreferenced", "evict", "eviction_plan", "gc", "make_room"]
