"""The warm pipeline: make one release ready in a node cache.

A warm validates the manifest, applies the node's own trust policy, makes room, fetches
(hashing while writing, from the peers the request names and then the origin: see
:class:`weightship.node.fetch.Sources`), and only then links ``models/NAME/VERSION`` into
place and moves tags; anything that fails before that leaves ``models/`` untouched. With
``hot`` it then reads the release into the page cache.

Its events (:class:`ProgressEvent`, then one :class:`WarmResult`) go to the caller's
``on_event`` as they happen; the result is also the return value. A failure the pipeline
understands is a ``failed`` result, recorded so that status can say why, never an exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from weightship.artifact import refs
from weightship.artifact.manifest import Manifest
from weightship.artifact.pack import SIGNATURE_FILE
from weightship.errors import (
    IntegrityError,
    NotFoundError,
    StoreError,
    UsageError,
    WeightshipError,
    write_error,
)
from weightship.node.layout import CacheLayout, Record, fsync_dir, now, size_of
from weightship.node.metrics import NO_METER, Meter
from weightship.node.protocol import BadPeer, Eviction, ProgressEvent, WarmRequest, WarmResult
from weightship.node.space import make_room
from weightship.progress import human_bytes, plural
from weightship.store.writer import TooLarge

FETCH_WORKERS = 4
# Blobs fetched from peers wait on their senders more than on this node, so more of
# them run at once than origin fetches do.
PEER_WORKERS = 16
EVENT_INTERVAL = 0.25
# --hot reads through one buffer of this size, whatever the release's size.
HOT_CHUNK = 8 * 1024 * 1024

OnEvent = Callable[[ProgressEvent | WarmResult], None]


class _Cancelled(Exception):
    """Another fetch of the same warm failed: stop this one, keep its partial file."""


def _noop(event: ProgressEvent | WarmResult) -> None:
    pass


class WarmEvents:
    """Builds a warm's events; progress events are rate-limited, state changes are not."""

    def __init__(self, on_event: OnEvent) -> None:
        self.on_event = on_event
        self.name = ""
        self.version = ""
        self.total = 0
        self.done = 0
        self.state = "pending"
        self.file: str | None = None
        self._lock = threading.Lock()
        self._last = 0.0

    def _event(self, message: str | None = None) -> ProgressEvent:
        return ProgressEvent(
            state=self.state,
            name=self.name or None,
            version=self.version or None,
            bytes_done=self.done,
            bytes_total=self.total,
            file=self.file,
            message=message,
        )

    def progress(self, state: str, message: str | None = None) -> None:
        with self._lock:
            self.state = state
            ev = self._event(message)
            self._last = time.monotonic()
        self.on_event(ev)

    def advance(self, n: int, file: str) -> None:
        with self._lock:
            self.done += n
            self.file = file
            now = time.monotonic()
            if now - self._last < EVENT_INTERVAL:
                return
            self._last = now
            ev = self._event()
        self.on_event(ev)

    def result(self, state: str, **fields: Any) -> WarmResult:
        """The result (not sent yet: :meth:`finish` sends it)."""
        self.state = state
        if state == "ready":
            self.done = self.total
        return WarmResult(
            state=state,
            name=self.name or None,
            version=self.version or None,
            bytes_done=self.done,
            bytes_total=self.total,
            **fields,
        )

    def finish(self, result: WarmResult, started: float) -> WarmResult:
        result.seconds = round(time.monotonic() - started, 3)
        self.on_event(result)
        return result


def warm_release(
    cache: CacheLayout, req: WarmRequest, on_event: OnEvent | None = None, *, meter: Meter = NO_METER
) -> WarmResult:
    """Make the release in ``req`` ready in ``cache``; return the result event (never
    raises for a failure it understands: the result says ``failed`` and why). ``meter``
    is told the bytes fetched per source, copies that did not verify, and the warm's
    duration (the agent's metrics)."""
    result = _warm_release(cache, req, on_event, meter)
    meter.warmed(result.state, result.seconds or 0.0)
    return result


def store_request(store_url: str, ref: str, *, pin: bool = False) -> WarmRequest:
    """The request that warms ``ref`` (NAME:VERSION, NAME:TAG or NAME@sha256:HEX) from
    ``store_url`` read with this node's own credentials: what an agent started with
    ``--store`` does when asked to warm a reference by itself (``POST /v1/warm-ref``). A
    tag is moved on the node as ``weightship warm`` would move it; the node's policy is
    applied by the warm, as for any request."""
    from weightship import release as releases
    from weightship.store import open_store

    r = refs.Ref.parse(ref)
    store = open_store(store_url)
    try:
        rel = releases.resolve(store, r)
        # A registry keeps blobs per release: the node reads them from the scoped store.
        source = {"store": store.scoped(rel.name).url}
    finally:
        store.close()
    tags = [r.label] if r.label and r.label != rel.version else []
    return WarmRequest(manifest=rel.manifest_bytes, signature=rel.signature, source=source, tags=tags, pin=pin)


def _warm_release(cache: CacheLayout, req: WarmRequest, on_event: OnEvent | None, meter: Meter) -> WarmResult:
    started = time.monotonic()
    events = WarmEvents(on_event or _noop)
    try:
        manifest = Manifest.from_bytes(req.manifest, where="manifest sent to the node")
        if not manifest.name or not manifest.version:
            raise IntegrityError("manifest sent to the node has no name or version")
        name = refs.check_name(manifest.name)
        version = refs.check_label(manifest.version)
        for t in req.tags:
            if t == version:
                raise UsageError(f"tag {t!r} has the name of the version it would point at")
    except WeightshipError as e:
        return events.finish(events.result("failed", error=str(e), retryable=False), started)
    events.name, events.version, events.total = name, version, manifest.total_size
    run_id = uuid.uuid4().hex[:12]
    try:
        cache.ensure()
        events.progress("pending")
        with cache.lock(lambda msg: events.progress("pending", message=msg), run_id):
            try:
                result = _Warm(cache, req, manifest, events, run_id, meter).run()
            except (WeightshipError, OSError) as e:
                # Still under the lock: the failure is recorded before anyone else runs.
                result = _fail(cache, events, _as_error(e), req.manifest)
    except (WeightshipError, OSError) as e:  # the cache itself is unusable
        result = events.result("failed", error=str(_as_error(e)), retryable=False)
    return events.finish(result, started)


def _fail(cache: CacheLayout, events: WarmEvents, e: WeightshipError, manifest_bytes: bytes) -> WarmResult:
    """Record why a warm failed, so that status can say it. A release that was ready
    stays ready: its files are untouched."""
    from weightship.release import digest_of

    retryable = isinstance(e, StoreError) and not isinstance(e, NotFoundError)
    rec = cache.read_record(events.name, events.version)
    if rec is None:
        rec = {"name": events.name, "version": events.version, "digest": digest_of(manifest_bytes)}
        rec.update(bytes_total=events.total, verified=False, signer=None, warmed=None, pinned=False)
    if rec.get("state") != "ready":
        rec.update(state="failed", error=str(e), pid=None, run=None)
        try:
            cache.write_record(rec)
        except OSError:
            # The disk is full: give back the space held for exactly this, and record.
            cache.reserve.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                cache.write_record(rec)
    return events.result("failed", error=str(e), retryable=retryable)


class _Warm:
    """One warm, under the cache's lock."""

    def __init__(
        self,
        cache: CacheLayout,
        req: WarmRequest,
        manifest: Manifest,
        events: WarmEvents,
        run_id: str,
        meter: Meter = NO_METER,
    ) -> None:
        self.cache = cache
        self.meter = meter
        self.req = req
        self.manifest = manifest
        self.events = events
        self.run_id = run_id
        self.name = events.name
        self.version = events.version
        self.blobs_dir = str(cache.blobs)
        # Blob -> the paths that use it, for messages that name a file.
        self.paths: dict[str, list[str]] = {}
        for f in manifest.files:
            self.paths.setdefault(f.sha256, []).append(f.path)

    def run(self) -> WarmResult:
        from weightship.release import Release, check_signature, digest_of
        from weightship.store.file import atomic_write

        cache, req, manifest, events = self.cache, self.req, self.manifest, self.events
        name, version = self.name, self.version
        digest = digest_of(req.manifest)
        prev = cache.read_record(name, version)
        if prev and prev.get("digest") != digest and prev.get("state") == "ready":
            raise IntegrityError(
                f"this cache already holds {name}:{version} with digest {prev.get('digest')}, "
                f"not {digest}: versions never change",
                "warm from the store that published it, or evict it with weightship node gc",
            )
        # The node's own policy, checked before any byte is fetched: the signature then
        # covers the manifest's digests, so verifying each blob verifies it against the signature.
        release = Release(name, version, manifest, req.manifest, req.signature)
        signer = check_signature(release, cache.policy)
        verified = signer is not None
        same = bool(prev and prev.get("digest") == digest)
        rec: Record = {
            "name": name,
            "version": version,
            "digest": digest,
            "state": "pending",
            "bytes_total": manifest.total_size,
            "files": len(manifest.files),
            "verified": verified,
            "signer": signer.to_dict() if signer else None,
            "error": None,
            "warmed": prev.get("warmed") if prev and same else None,
            "untagged": prev.get("untagged") if prev else None,
            "pinned": bool(req.pin or (prev and prev.get("pinned"))),
            "pid": os.getpid(),
            "run": self.run_id,
        }
        blobs = manifest.blobs()
        present = {h for h, size in blobs.items() if self._blob_ok(h, size)}
        missing = {h: s for h, s in blobs.items() if h not in present}
        # Already ready here (a re-warm, or one that only moves a tag): it stays ready
        # throughout, rather than passing through fetching for a status to see.
        intact = bool(prev and same and prev.get("state") == "ready" and not missing)
        evicted: list[Eviction] = []
        fetched = 0
        origin_bytes = 0
        peer_report: dict[str, Any] = {"from_peers": {}, "bad_peers": []}
        if not intact:
            rdir = cache.release_dir(name, version)
            atomic_write(rdir / "manifest.json", req.manifest)
            if req.signature is not None:
                atomic_write(rdir / SIGNATURE_FILE, req.signature)
            else:
                (rdir / SIGNATURE_FILE).unlink(missing_ok=True)
            partial = {h: min(size_of(cache.partial / h), size) for h, size in missing.items()}
            need = sum(missing[h] - partial[h] for h in missing)
            # Recorded before making room, so that eviction counts this release's blobs as in use.
            cache.write_record(rec)
            evicted = make_room(cache, name, version, need, req.capacity)
            events.done = sum(blobs[h] for h in present) + sum(partial.values())
            rec["state"] = "fetching"
            cache.write_record(rec)
            if missing:
                events.progress("fetching", message=f"{plural(len(missing), 'blob')}, {human_bytes(need)} to fetch")
                fetched, origin_bytes, peer_report = self._fetch(missing)
            events.progress("verifying", message="checking every file is present and linking the release")
            rec["state"] = "verifying"
            cache.write_record(rec)
            for h, size in blobs.items():
                if not self._blob_ok(h, size):
                    raise IntegrityError(
                        f"{self.paths[h][0]}: blob vanished from the cache while warming", "warm again"
                    )
            self._materialise()
        hot = self._hot("ready" if intact else "verifying") if req.hot else {}
        self._check_tags(req.tags)
        # The record says ready before any tag points here: a reader that follows a tag
        # (status, node wait, the node labeler) never finds a release that is not ready
        # behind it, and a crash in between leaves the tag on the old release, `staged`.
        rec.update(state="ready", error=None, warmed=now(), pid=None, run=None)
        cache.write_record(rec)
        moved = self._switch_tags(req.tags)
        for old in moved:
            orec = cache.read_record(name, old)
            if orec:
                orec["untagged"] = now()
                cache.write_record(orec)
        return events.result(
            "ready",
            digest=digest,
            bytes_fetched=fetched,
            bytes_reused=max(0, manifest.total_size - fetched),
            bytes_from_origin=origin_bytes,
            bytes_from_peers=peer_report["from_peers"],
            bad_peers=[BadPeer.from_dict(p) for p in peer_report["bad_peers"]],
            verified=verified,
            signer=rec["signer"],
            tags=cache.tags(name),
            evicted=evicted,
            pinned=rec["pinned"],
            **hot,
        )

    def _blob_ok(self, h: str, size: int) -> bool:
        # Plain string paths: a release of many small files checks each of its blobs.
        p = os.path.join(self.blobs_dir, h)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return False
        if st.st_size != size:
            # A damaged blob is worth less than none: fetch it again.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            return False
        return True

    def _fetch(self, missing: dict[str, int]) -> tuple[int, int, dict[str, Any]]:
        """Fetch every missing blob; return (bytes fetched, of which from the origin, peer report)."""
        from weightship.node.fetch import URL_CHUNK, RateLimit, Sources

        cache, req, events, paths = self.cache, self.req, self.events, self.paths
        limit = RateLimit(req.max_rate) if req.max_rate else None
        # A rate limit acts between reads: keep each read to a fraction of a second's worth.
        chunk = max(64 * 1024, min(URL_CHUNK, req.max_rate // 8)) if req.max_rate else URL_CHUNK

        def on_problem(p: dict[str, Any]) -> None:
            p["file"] = paths[p["blob"]][0]
            events.progress(events.state, message=f"peer {p['peer']}: {p['error']}; {p['then']}")

        source = Sources(req.source, req.peers, chunk, on_problem, cache.file_sources, meter=self.meter)
        stop = threading.Event()
        fetched = 0
        lock = threading.Lock()
        # Announced before the first byte moves, so that a peer asking for a blob this
        # node will fetch later is told to wait rather than to go elsewhere.
        cache.arrivals.expect(missing)

        def one(h: str) -> int:
            nonlocal fetched
            part = cache.partial / h

            def progress(n: int) -> None:
                nonlocal fetched
                if stop.is_set():
                    raise _Cancelled()
                if not n:
                    return
                with lock:
                    fetched += n
                cache.arrivals.grew(h)
                events.advance(n, paths[h][0])
                if limit:
                    limit.take(n)

            cache.arrivals.begin(h)
            try:
                n = source.fetch(h, part, missing[h], progress)
                os.chmod(part, 0o444)
                os.replace(part, cache.blobs / h)
            except TooLarge as e:
                raise IntegrityError(
                    f"{paths[h][0]}: {e.message}", "the source serves other bytes; nothing was changed on this node"
                ) from None
            except IntegrityError:
                raise IntegrityError(
                    f"{paths[h][0]}: sha256 mismatch, the copy in the store is corrupt (blob {h[:12]}…)",
                    "re-publish the release; nothing was changed on this node",
                ) from None
            except NotFoundError as e:
                raise NotFoundError(f"{paths[h][0]}: {e}") from None
            finally:
                cache.arrivals.end(h)
            return n

        # Blobs this node fetches from the origin first: peers may be waiting for them, and
        # they never wait on anybody, so fetching them cannot deadlock.
        by_size = sorted(missing, key=lambda h: -missing[h])
        from_origin = [h for h in by_size if not source.peers_for(h)]
        from_peers = [h for h in by_size if source.peers_for(h)]
        try:
            with (
                ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool,
                ThreadPoolExecutor(max_workers=max(1, min(PEER_WORKERS, len(from_peers)))) as peer_pool,
            ):
                futures = [pool.submit(one, h) for h in from_origin] + [peer_pool.submit(one, h) for h in from_peers]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                errors = [f.exception() for f in done if f.exception() and not isinstance(f.exception(), _Cancelled)]
                if errors:
                    stop.set()
                    wait(futures)
                    raise errors[0]
        finally:
            source.close()
            for h in missing:
                cache.arrivals.end(h)
        return fetched, source.origin_bytes, source.report()

    def _hot(self, state: str) -> dict[str, Any]:
        """Read the release into the page cache (``--hot``), so that the serving process
        loads it at memory speed. One reused buffer: bounded memory whatever the size.
        Reading stops short of what the machine can keep cached, or it would evict itself."""
        started = time.monotonic()
        manifest = self.manifest
        blobs = manifest.blobs()
        total = sum(blobs.values())
        budget = _mem_available()
        limit = total if budget is None else min(total, int(budget * 0.9))
        self.events.progress(state, message=f"reading {human_bytes(limit)} into the page cache")
        buf = bytearray(HOT_CHUNK)
        done = 0
        for h in dict.fromkeys(f.sha256 for f in manifest.files):
            if done >= limit:
                break
            with open(self.cache.blobs / h, "rb", buffering=0) as fh:
                # WILLNEED starts readahead of the whole file; the reads make sure it lands.
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
                while done < limit and (n := fh.readinto(buf)):
                    done += n
        out: dict[str, Any] = {"hot_bytes": done, "hot_seconds": round(time.monotonic() - started, 3)}
        if done < total:
            out["hot_note"] = (
                f"read {human_bytes(done)} of {human_bytes(total)} into the page cache: "
                "the rest would not fit in available memory"
            )
        return out

    def _materialise(self) -> None:
        from weightship.store.file import write_new_file

        cache, signature = self.cache, self.req.signature
        # Staging names carry no release name: NAME-VERSION could pass 255 bytes.
        target = cache.models / self.name / self.version
        stage = cache.staging / f"release-{uuid.uuid4().hex}"
        tree = stage / "tree"
        # Each directory made once and each link made with plain strings: a release may
        # have thousands of files.
        made: set[str] = set()
        root = str(tree)
        for f in self.manifest.files:
            dst = os.path.join(root, f.path)
            parent = os.path.dirname(dst)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            os.link(os.path.join(self.blobs_dir, f.sha256), dst)
        tree.mkdir(parents=True, exist_ok=True)
        if signature is not None:
            write_new_file(tree / SIGNATURE_FILE, signature)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            raise UsageError(f"{target} is a tag; a version may not share its name with a tag")
        if target.exists():
            # Only when repairing a damaged release: its old tree goes, the new one comes.
            os.replace(target, stage / "old")
        os.replace(tree, target)
        fsync_dir(target.parent)
        shutil.rmtree(stage, ignore_errors=True)

    def _check_tags(self, tags: list[str]) -> None:
        """Refuse, before the release is recorded ready, a tag the cache holds as a version."""
        d = self.cache.models / self.name
        for t in tags:
            link = d / t
            if link.exists() and not link.is_symlink():
                raise UsageError(f"{link} is a directory, not a tag", "a tag may not share its name with a version")

    def _switch_tags(self, tags: list[str]) -> list[str]:
        """Point each tag at the version by renaming a new symlink over the old one, so a
        reader sees the old release or the new one, never neither. Returns the versions
        tags moved away from."""
        moved = []
        d = self.cache.models / self.name
        for t in tags:
            link = d / t
            old = os.readlink(link) if link.is_symlink() else None
            if old == self.version:
                continue
            tmp = self.cache.staging / f"tag-{uuid.uuid4().hex}"
            os.symlink(self.version, tmp)
            os.replace(tmp, link)
            if old:
                moved.append(old)
        if tags:
            fsync_dir(d)
        return moved


def _as_error(e: Exception) -> WeightshipError:
    if isinstance(e, WeightshipError):
        return e
    assert isinstance(e, OSError)
    name = str(e.filename or "node cache")
    if len(name) > 160:
        name = f"{name[:100]}…{name[-40:]}"
    what = f"{name}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return write_error(e, "node cache")
    # A read-only or forbidden disk stays so on a retry, and so does a name or a file the
    # file system cannot hold; other I/O errors may not.
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EFBIG):
        return WeightshipError(what)
    return StoreError(what)


def _mem_available() -> int | None:
    """Linux MemAvailable in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


__all__ = ["FETCH_WORKERS", "HOT_CHUNK", "PEER_WORKERS", "OnEvent", "WarmEvents", "store_request", "warm_release"]
