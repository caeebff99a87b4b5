"""The node engine: one cache directory on a node's NVMe, and the only code that changes it.

Every transport (local, ssh, agent) calls this module; none has cache logic of its own.
Layout (docs/format.md, DESIGN.md)::

    <cache>/blobs/sha256/<hex>                 verified blobs, read-only
    <cache>/models/<name>/<version>/<files…>   hard links into blobs/
    <cache>/models/<name>/<tag> -> <version>   symlink, switched by rename
    <cache>/state/releases/<name>/<version>/   record.json, manifest.json, model.sig
    <cache>/state/partial/<hex>                interrupted downloads, resumed
    <cache>/state/lock                         flock: one warm, gc or verify at a time

A warm validates the manifest, applies the node's own trust policy, makes room, fetches
(hashing while writing), and only then links ``models/NAME/VERSION`` into place and
moves tags; anything that fails before that leaves ``models/`` untouched.

The protocol every transport carries (version ``PROTOCOL``)::

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

``source`` is the origin; ``peers`` (optional) names, per blob, the nodes of the region to
try first (see weightship.sources). A node that is fetching a blob serves what it has of
it to its peers while it arrives (``NodeCache.open_peer_blob``), so a region's nodes relay
a blob that crossed the origin link once; every receiver verifies the whole sha256.

``weightship node warm --json`` reads the request on stdin and prints one event per line,
the result last; ``node status|gc|verify --json`` print one result document. The agent
serves the same documents over HTTP (see weightship.agent).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weightship import __version__
from weightship.artifact import refs
from weightship.artifact.manifest import Manifest
from weightship.artifact.pack import SIGNATURE_FILE
from weightship.errors import (
    IntegrityError,
    NotFoundError,
    SignatureError,
    SpaceError,
    StoreError,
    UsageError,
    WeightshipError,
    write_error,
)
from weightship.progress import human_bytes
from weightship.store.writer import TooLarge
from weightship.trust.policy import TrustPolicy

PROTOCOL = 1
STATES = ("absent", "pending", "fetching", "verifying", "ready", "failed", "evicted")
ACTIVE = ("pending", "fetching", "verifying")
# Room kept free beyond the blobs themselves, for directories, links and records.
RESERVE = 1024 * 1024
# Allocated in state/reserve, and released to record a failure when the disk is full.
RECORD_RESERVE = 256 * 1024
FETCH_WORKERS = 4
# Blobs fetched from peers wait on their senders more than on this node, so more of
# them run at once than origin fetches do.
PEER_WORKERS = 16
EVENT_INTERVAL = 0.25
# --hot reads through one buffer of this size, whatever the release's size.
HOT_CHUNK = 8 * 1024 * 1024
_HEX = re.compile(r"^[0-9a-f]{64}$")

Emit = Callable[[dict[str, Any]], None]


class _Cancelled(Exception):
    """Another fetch of the same warm failed: stop this one, keep its partial file."""


def _now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _noop(event: dict[str, Any]) -> None:
    pass


# -- requests --------------------------------------------------------------------------


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
    # Per-node: which peers of the region to try first for which blob (weightship.warm plans it).
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
        if not _HEX.match(h) or not isinstance(names, list) or not all(n in peers["nodes"] for n in names):
            raise ValueError(f"peers.blobs[{h[:12]!r}] must list known peer names")
    return peers


def check_protocol(d: dict[str, Any]) -> None:
    proto = d.get("protocol", PROTOCOL)
    if proto != PROTOCOL:
        raise UsageError(
            f"request speaks weightship node protocol {proto}, this node speaks {PROTOCOL} (weightship {__version__})",
            "install the same weightship version on the caller and the nodes",
        )


# -- blobs on their way in, as peers see them --------------------------------------------


@dataclass
class _Arrival:
    size: int
    state: str = "queued"  # queued (a warm will fetch it), fetching
    ticks: int = 0  # bumped on every write and at the end: "something changed"
    wakers: list[Callable[[], None]] = field(default_factory=list)


class Arrivals:
    """The blobs a warm of this cache still has to fetch or is fetching now.

    An agent serves them to peers before they are complete (the peer verifies the whole
    sha256 itself before it keeps a byte), so a region's nodes relay a blob that crossed
    the origin link once. In memory: only a long-lived agent process serves peers.
    Readers waiting for more bytes register a one-shot ``wake`` callback, so a writer pays
    nothing when nobody waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, _Arrival] = {}

    def expect(self, blobs: dict[str, int]) -> None:
        with self._lock:
            for h, size in blobs.items():
                self._blobs.setdefault(h, _Arrival(size))

    def begin(self, h: str) -> None:
        self._touch(h, state="fetching")

    def grew(self, h: str) -> None:
        self._touch(h)

    def end(self, h: str) -> None:
        with self._lock:
            a = self._blobs.pop(h, None)
            wakers = a.wakers if a else []
        for w in wakers:
            w()

    def _touch(self, h: str, state: str | None = None) -> None:
        with self._lock:
            a = self._blobs.get(h)
            if a is None:
                return
            if state:
                a.state = state
            a.ticks += 1
            wakers, a.wakers = a.wakers, []
        for w in wakers:
            w()

    def get(self, h: str) -> tuple[str, int, int] | None:
        """(state, size, ticks) of a blob on its way in, or None."""
        with self._lock:
            a = self._blobs.get(h)
            return (a.state, a.size, a.ticks) if a else None

    def wait(self, h: str, ticks: int, wake: Callable[[], None]) -> bool:
        """Call ``wake`` once the blob changes after ``ticks``; False (and no call) when it
        already has, or is no longer on its way in: look again instead of waiting."""
        with self._lock:
            a = self._blobs.get(h)
            if a is None or a.ticks != ticks:
                return False
            a.wakers.append(wake)
            return True


class PeerBlob:
    """A blob as a peer may read it: whole and verified, or still arriving (``size`` is then
    what it will be, and ``available()`` what is on disk so far). Open files are kept across
    the rename that completes a download, so a reader follows the same bytes throughout."""

    def __init__(self, cache: NodeCache, h: str, fd: int, size: int, complete: bool) -> None:
        self.cache = cache
        self.hexdigest = h
        self.fd = fd
        self.size = size
        self.complete = complete

    def available(self) -> int:
        if self.complete:
            return self.size
        return min(self.size, os.fstat(self.fd).st_size)

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def ticks(self) -> int:
        a = self.cache.arrivals.get(self.hexdigest)
        return a[2] if a else -1

    def state(self) -> str:
        """``complete``, ``fetching``, or ``gone`` (the download failed or started over:
        what was read so far may be worthless, and the reader should stop)."""
        if self.complete:
            return "complete"
        mine = os.fstat(self.fd).st_ino
        if self.cache.arrivals.get(self.hexdigest) is not None:
            try:
                same = os.stat(self.cache.partial / self.hexdigest).st_ino == mine
            except FileNotFoundError:
                same = False
            if same:
                return "fetching"
        try:
            st = os.stat(self.cache.blobs / self.hexdigest)
        except FileNotFoundError:
            return "fetching" if self.cache.arrivals.get(self.hexdigest) is not None else "gone"
        if st.st_ino == mine and st.st_size == self.size:
            self.complete = True
            return "complete"
        return "gone"

    def wait(self, ticks: int, wake: Callable[[], None]) -> bool:
        return self.cache.arrivals.wait(self.hexdigest, ticks, wake)

    def close(self) -> None:
        # Idempotent: closing a reused descriptor number twice would close someone else's file.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    # A response whose body never started (the peer hung up first) never reaches close().
    __del__ = close


# -- the cache -------------------------------------------------------------------------


class NodeCache:
    """One node cache. ``policy`` is the node's own trust policy: it is applied to every
    warm whatever the caller asked for, and a caller cannot weaken it."""

    def __init__(
        self,
        root: Path | str,
        *,
        policy: TrustPolicy | None = None,
        capacity: int | None = None,
        file_sources: Path | bool = True,
    ) -> None:
        self.root = Path(root)
        self.policy = policy or TrustPolicy()
        self.capacity = capacity
        # Which file:// sources a warm request may name: any (ssh and local nodes, whose
        # caller already runs code as this user), none, or only files below one directory
        # (an agent, whose callers hold only its token: its own store).
        self.file_sources = file_sources
        self.blobs = self.root / "blobs" / "sha256"
        self.models = self.root / "models"
        self.state = self.root / "state"
        self.releases = self.state / "releases"
        self.partial = self.state / "partial"
        self.staging = self.state / "staging"
        self.quarantine = self.state / "quarantine"
        # Space held back so that a warm that fills the disk can still record why it failed.
        self.reserve = self.state / "reserve"
        self.lock_path = self.state / "lock"
        self.arrivals = Arrivals()

    # -- small helpers -------------------------------------------------------------

    def ensure(self) -> None:
        try:
            for d in (self.blobs, self.models, self.releases, self.partial, self.staging):
                d.mkdir(parents=True, exist_ok=True)
            self._hold_reserve()
        except OSError as e:
            raise UsageError(
                f"cannot create the cache in {self.root}: {e.strerror}", "check --cache and its permissions"
            ) from None

    def _hold_reserve(self) -> None:
        """Keep ``state/reserve`` allocated: when a warm fills the disk, it is given back so
        that the failure (and the records of a repair) can still be written."""
        try:
            if _size(self.reserve) >= RECORD_RESERVE:
                return
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RECORD_RESERVE)
            finally:
                os.close(fd)
        except OSError:
            # No room for it now (the disk is full): the next warm or gc tries again.
            self.reserve.unlink(missing_ok=True)

    def _rel_dir(self, name: str, version: str) -> Path:
        return self.releases / name / version

    def _read_record(self, name: str, version: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._rel_dir(name, version) / "record.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            return None

    def _write_record(self, rec: dict[str, Any]) -> None:
        from weightship.store.file import atomic_write

        rec["updated"] = _now()
        atomic_write(self._rel_dir(rec["name"], rec["version"]) / "record.json", json.dumps(rec, indent=1).encode())

    def _records(self) -> list[dict[str, Any]]:
        out = []
        if not self.releases.is_dir():
            return out
        for ndir in sorted(self.releases.iterdir()):
            for vdir in sorted(ndir.iterdir()) if ndir.is_dir() else []:
                rec = self._read_record(ndir.name, vdir.name)
                if rec:
                    out.append(rec)
        return out

    def _manifest(self, name: str, version: str) -> Manifest | None:
        try:
            data = (self._rel_dir(name, version) / "manifest.json").read_bytes()
        except OSError:
            return None
        try:
            return Manifest.from_bytes(data)
        except WeightshipError:
            return None

    def tags(self, name: str) -> dict[str, str]:
        """Tag -> version, as the symlinks under models/NAME say."""
        d = self.models / name
        out = {}
        if d.is_dir():
            for p in d.iterdir():
                if p.is_symlink():
                    out[p.name] = os.readlink(p)
        return out

    def used_bytes(self) -> int:
        total = 0
        for d in (self.blobs, self.partial):
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(d):
                    with contextlib.suppress(FileNotFoundError):
                        total += e.stat(follow_symlinks=False).st_size
        return total

    def free_bytes(self, capacity: int | None = None) -> int:
        capacity = capacity or self.capacity
        probe = self.root if self.root.exists() else self.root.parent
        free = shutil.disk_usage(probe).free
        if capacity:
            free = min(free, max(0, capacity - self.used_bytes()))
        return free

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[str], None] | None = None, run_id: str = "") -> Iterator[None]:
        """Exclusive per-cache lock. flock is per open file, so two threads of one agent
        exclude each other as two processes do; a killed holder releases it at once."""
        self.ensure()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                who = f" (pid {holder[0]})" if holder else ""
                if on_wait:
                    on_wait(f"waiting for another warm, gc or verify of this cache to finish{who}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {run_id}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def _holder_run(self) -> str | None:
        """The run id holding the lock now, or None when nobody holds it."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                parts = os.pread(fd, 200, 0).decode(errors="replace").split()
                return parts[1] if len(parts) > 1 else ""
            return None
        finally:
            os.close(fd)

    # -- peers ---------------------------------------------------------------------

    def have(self, hexdigests: list[str]) -> dict[str, Any]:
        """Which of these blobs the cache holds whole (verified), and how much of the others
        an interrupted download kept: what a warm's planner needs to move each byte once."""
        whole: dict[str, int] = {}
        partial: dict[str, int] = {}
        for h in hexdigests:
            if not isinstance(h, str) or not _HEX.match(h):
                raise UsageError(f"{str(h)[:80]!r} is not a sha256 hex digest")
            try:
                whole[h] = (self.blobs / h).stat().st_size
            except FileNotFoundError:
                if n := _size(self.partial / h):
                    partial[h] = n
        return {
            "event": "result",
            "op": "have",
            "blobs": whole,
            "partial": partial,
            "free_bytes": self.free_bytes() if self.root.exists() else None,
        }

    def open_peer_blob(self, h: str) -> PeerBlob | str:
        """A blob for a peer: a :class:`PeerBlob`, ``"queued"`` when a running warm will
        fetch it but has not started, or ``"absent"``. Only verified blobs and blobs that a
        warm is fetching now are served; a partial file left by an interrupted warm is not."""
        if not _HEX.match(h):
            return "absent"
        for _ in range(3):  # a download may complete (rename) between the looks
            try:
                fd = os.open(self.blobs / h, os.O_RDONLY)
            except FileNotFoundError:
                pass
            else:
                return PeerBlob(self, h, fd, os.fstat(fd).st_size, True)
            arriving = self.arrivals.get(h)
            if arriving is None:
                return "absent"
            state, size, _ = arriving
            if state == "queued":
                return "queued"
            try:
                fd = os.open(self.partial / h, os.O_RDONLY)
            except FileNotFoundError:
                continue
            return PeerBlob(self, h, fd, size, False)
        return "queued"

    # -- warm ----------------------------------------------------------------------

    def warm(self, req: WarmRequest, emit: Emit | None = None) -> dict[str, Any]:
        """Make the release in ``req`` ready here; return the result event (never raises
        for a failure it understands: the result says ``failed`` and why)."""
        emit = emit or _noop
        started = time.monotonic()
        run = _Run(emit)
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
            return run.result("failed", error=str(e), retryable=False, seconds=time.monotonic() - started)
        run.name, run.version, run.total = name, version, manifest.total_size
        run_id = uuid.uuid4().hex[:12]
        try:
            self.ensure()
            run.progress("pending")
            with self.lock(lambda msg: run.progress("pending", message=msg), run_id):
                try:
                    result = self._warm_locked(req, manifest, run, run_id)
                except (WeightshipError, OSError) as e:
                    # Still under the lock: the failure is recorded before anyone else runs.
                    result = self._fail(run, _as_error(e), req.manifest)
        except (WeightshipError, OSError) as e:  # the cache itself is unusable
            result = run.result("failed", error=str(_as_error(e)), retryable=False)
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    def _fail(self, run: _Run, e: WeightshipError, manifest_bytes: bytes) -> dict[str, Any]:
        """Record why a warm failed, so that status can say it. A release that was ready
        stays ready: its files are untouched."""
        from weightship.release import digest_of

        retryable = isinstance(e, StoreError) and not isinstance(e, NotFoundError)
        rec = self._read_record(run.name, run.version)
        if rec is None:
            rec = {"name": run.name, "version": run.version, "digest": digest_of(manifest_bytes)}
            rec.update(bytes_total=run.total, verified=False, signer=None, warmed=None, pinned=False)
        if rec.get("state") != "ready":
            rec.update(state="failed", error=str(e), pid=None, run=None)
            try:
                self._write_record(rec)
            except OSError:
                # The disk is full: give back the space held for exactly this, and record.
                self.reserve.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self._write_record(rec)
        return run.result("failed", error=str(e), retryable=retryable)

    def _warm_locked(self, req: WarmRequest, manifest: Manifest, run: _Run, run_id: str) -> dict[str, Any]:
        from weightship.release import Release, check_signature, digest_of
        from weightship.store.file import atomic_write

        name, version = run.name, run.version
        digest = digest_of(req.manifest)
        prev = self._read_record(name, version)
        if prev and prev.get("digest") != digest and prev.get("state") == "ready":
            raise IntegrityError(
                f"this cache already holds {name}:{version} with digest {prev.get('digest')}, "
                f"not {digest}: versions never change",
                "warm from the store that published it, or evict it with weightship node gc",
            )
        # The node's own policy, checked before any byte is fetched: the signature then
        # covers the manifest's digests, so verifying each blob verifies it against the signature.
        release = Release(name, version, manifest, req.manifest, req.signature)
        signer = check_signature(release, self.policy)
        verified = signer is not None
        same = bool(prev and prev.get("digest") == digest)
        rec = {
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
            "run": run_id,
        }
        blobs = manifest.blobs()
        paths: dict[str, list[str]] = {}
        for f in manifest.files:
            paths.setdefault(f.sha256, []).append(f.path)
        present = {h for h, size in blobs.items() if self._blob_ok(h, size)}
        missing = {h: s for h, s in blobs.items() if h not in present}
        # Already ready here (a re-warm, or one that only moves a tag): it stays ready
        # throughout, rather than passing through fetching for a status to see.
        intact = bool(prev and same and prev.get("state") == "ready" and not missing)
        evicted: list[dict[str, Any]] = []
        fetched = 0
        origin_bytes = 0
        peer_report: dict[str, Any] = {"from_peers": {}, "bad_peers": []}
        if not intact:
            rdir = self._rel_dir(name, version)
            atomic_write(rdir / "manifest.json", req.manifest)
            if req.signature is not None:
                atomic_write(rdir / SIGNATURE_FILE, req.signature)
            else:
                (rdir / SIGNATURE_FILE).unlink(missing_ok=True)
            partial = {h: min(_size(self.partial / h), size) for h, size in missing.items()}
            need = sum(missing[h] - partial[h] for h in missing)
            # Recorded before making room, so that eviction counts this release's blobs as in use.
            self._write_record(rec)
            evicted = self._make_room(name, version, need, req.capacity)
            run.done = sum(blobs[h] for h in present) + sum(partial.values())
            rec["state"] = "fetching"
            self._write_record(rec)
            if missing:
                run.progress("fetching", message=f"{len(missing)} blobs, {human_bytes(need)} to fetch")
                fetched, origin_bytes, peer_report = self._fetch(req, missing, paths, run)
            run.progress("verifying", message="checking every file is present and linking the release")
            rec["state"] = "verifying"
            self._write_record(rec)
            for h, size in blobs.items():
                if not self._blob_ok(h, size):
                    raise IntegrityError(f"{paths[h][0]}: blob vanished from the cache while warming", "warm again")
            self._materialise(name, version, manifest, req.signature)
        hot = self._hot(manifest, run, "ready" if intact else "verifying") if req.hot else {}
        moved = self._switch_tags(name, version, req.tags)
        rec.update(state="ready", error=None, warmed=_now(), pid=None, run=None)
        self._write_record(rec)
        for old in moved:
            orec = self._read_record(name, old)
            if orec:
                orec["untagged"] = _now()
                self._write_record(orec)
        return run.result(
            "ready",
            digest=digest,
            bytes_fetched=fetched,
            bytes_reused=max(0, manifest.total_size - fetched),
            bytes_from_origin=origin_bytes,
            bytes_from_peers=peer_report["from_peers"],
            bad_peers=peer_report["bad_peers"],
            verified=verified,
            signer=rec["signer"],
            tags=self.tags(name),
            evicted=evicted,
            pinned=rec["pinned"],
            **hot,
        )

    def _blob_ok(self, h: str, size: int) -> bool:
        p = self.blobs / h
        try:
            st = p.stat()
        except FileNotFoundError:
            return False
        if st.st_size != size:
            # A damaged blob is worth less than none: fetch it again.
            p.unlink(missing_ok=True)
            return False
        return True

    def _fetch(
        self, req: WarmRequest, missing: dict[str, int], paths: dict[str, list[str]], run: _Run
    ) -> tuple[int, int, dict[str, Any]]:
        """Fetch every missing blob; return (bytes fetched, of which from the origin, peer report)."""
        from weightship.node.fetch import URL_CHUNK, RateLimit, Sources

        limit = RateLimit(req.max_rate) if req.max_rate else None
        # A rate limit acts between reads: keep each read to a fraction of a second's worth.
        chunk = max(64 * 1024, min(URL_CHUNK, req.max_rate // 8)) if req.max_rate else URL_CHUNK

        def on_problem(p: dict[str, Any]) -> None:
            p["file"] = paths[p["blob"]][0]
            run.progress(run.state, message=f"peer {p['peer']}: {p['error']}; {p['then']}")

        source = Sources(req.source, req.peers, chunk, on_problem, self.file_sources)
        stop = threading.Event()
        fetched = 0
        lock = threading.Lock()
        # Announced before the first byte moves, so that a peer asking for a blob this
        # node will fetch later is told to wait rather than to go elsewhere.
        self.arrivals.expect(missing)

        def one(h: str) -> int:
            nonlocal fetched
            part = self.partial / h

            def progress(n: int) -> None:
                nonlocal fetched
                if stop.is_set():
                    raise _Cancelled()
                if not n:
                    return
                with lock:
                    fetched += n
                self.arrivals.grew(h)
                run.advance(n, paths[h][0])
                if limit:
                    limit.take(n)

            self.arrivals.begin(h)
            try:
                n = source.fetch(h, part, missing[h], progress)
                os.chmod(part, 0o444)
                os.replace(part, self.blobs / h)
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
                self.arrivals.end(h)
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
                self.arrivals.end(h)
        return fetched, source.origin_bytes, source.report()

    def _hot(self, manifest: Manifest, run: _Run, state: str) -> dict[str, Any]:
        """Read the release into the page cache (``--hot``), so that the serving process
        loads it at memory speed. One reused buffer: bounded memory whatever the size.
        Reading stops short of what the machine can keep cached, or it would evict itself."""
        started = time.monotonic()
        blobs = manifest.blobs()
        total = sum(blobs.values())
        budget = _mem_available()
        limit = total if budget is None else min(total, int(budget * 0.9))
        run.progress(state, message=f"reading {human_bytes(limit)} into the page cache")
        buf = bytearray(HOT_CHUNK)
        done = 0
        for h in dict.fromkeys(f.sha256 for f in manifest.files):
            if done >= limit:
                break
            with open(self.blobs / h, "rb", buffering=0) as fh:
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

    def _materialise(self, name: str, version: str, manifest: Manifest, signature: bytes | None) -> None:
        from weightship.store.file import write_new_file

        # Staging names carry no release name: NAME-VERSION could pass 255 bytes.
        target = self.models / name / version
        stage = self.staging / f"release-{uuid.uuid4().hex}"
        tree = stage / "tree"
        for f in manifest.files:
            dst = tree / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.blobs / f.sha256, dst)
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
        _fsync_dir(target.parent)
        shutil.rmtree(stage, ignore_errors=True)

    def _switch_tags(self, name: str, version: str, tags: list[str]) -> list[str]:
        """Point each tag at version by renaming a new symlink over the old one, so a
        reader sees the old release or the new one, never neither. Returns the versions
        tags moved away from."""
        moved = []
        d = self.models / name
        for t in tags:
            link = d / t
            if link.exists() and not link.is_symlink():
                raise UsageError(f"{link} is a directory, not a tag", "a tag may not share its name with a version")
            old = os.readlink(link) if link.is_symlink() else None
            if old == version:
                continue
            tmp = self.staging / f"tag-{uuid.uuid4().hex}"
            os.symlink(version, tmp)
            os.replace(tmp, link)
            if old:
                moved.append(old)
        if tags:
            _fsync_dir(d)
        return moved

    # -- space ---------------------------------------------------------------------

    def _make_room(self, name: str, version: str, need: int, capacity: int | None) -> list[dict[str, Any]]:
        """Evict least-recently-used releases that no tag points at and nobody pinned,
        only if that is enough; otherwise fail before a byte is moved."""
        free = self.free_bytes(capacity)
        if need + RESERVE <= free:
            return []
        plan, freed = self._eviction_plan(skip={(name, version)}, want=need + RESERVE - free)
        if need + RESERVE > free + freed:
            short = need + RESERVE - free - freed
            extra = f" (evicting every untagged, unpinned release would free {human_bytes(freed)})" if freed else ""
            raise SpaceError(
                f"not enough space for {name}:{version} in {self.root}: {human_bytes(need)} to fetch, "
                f"{human_bytes(max(0, free - RESERVE))} free{extra}; {human_bytes(short)} missing",
                "free disk space, raise the node's capacity, or move tags off old releases; nothing was fetched",
            )
        return [self._evict(rec) for rec in plan]

    def _eviction_plan(self, skip: set[tuple[str, str]], want: int | None) -> tuple[list[dict[str, Any]], int]:
        records = self._records()
        protected = self._protected(records) | skip
        candidates = [
            r for r in records if r["state"] in ("ready", "failed") and (r["name"], r["version"]) not in protected
        ]
        candidates.sort(key=_last_used)
        live = {(r["name"], r["version"]) for r in records if r["state"] != "evicted"}
        plan: list[dict[str, Any]] = []
        freed = 0
        for rec in candidates:
            if want is not None and freed >= want:
                break
            plan.append(rec)
            live.discard((rec["name"], rec["version"]))
            freed = self._unreferenced_bytes(live, {(r["name"], r["version"]) for r in plan})
        return plan, freed

    def _protected(self, records: list[dict[str, Any]]) -> set[tuple[str, str]]:
        out = {(r["name"], r["version"]) for r in records if r.get("pinned")}
        for name in {r["name"] for r in records}:
            out |= {(name, v) for v in self.tags(name).values()}
        return out

    def _blob_refs(self, keys: set[tuple[str, str]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, version in keys:
            m = self._manifest(name, version)
            if m:
                out.update(m.blobs())
        return out

    def _unreferenced_bytes(self, live: set[tuple[str, str]], gone: set[tuple[str, str]]) -> int:
        keep = self._blob_refs(live)
        return sum(size for h, size in self._blob_refs(gone).items() if h not in keep and (self.blobs / h).exists())

    def _evict(self, rec: dict[str, Any]) -> dict[str, Any]:
        name, version = rec["name"], rec["version"]
        target = self.models / name / version
        if target.is_dir():
            trash = self.staging / f"evict-{uuid.uuid4().hex}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        # Recorded first: the blobs it alone used are then unreferenced and go too.
        rec.update(state="evicted", evicted=_now(), error=None)
        self._write_record(rec)
        freed = self._delete_unreferenced()
        return {"name": name, "version": version, "freed_bytes": freed}

    def _delete_unreferenced(self) -> int:
        live = {(r["name"], r["version"]) for r in self._records() if r["state"] != "evicted"}
        keep = self._blob_refs(live)
        freed = 0
        for e in list(os.scandir(self.blobs)):
            if e.name not in keep:
                freed += e.stat().st_size
                os.unlink(e.path)
        for e in list(os.scandir(self.partial)):
            if e.name not in keep:
                freed += e.stat().st_size
                os.unlink(e.path)
        return freed

    # -- gc ------------------------------------------------------------------------

    def gc(self, keep: int = 2, dry_run: bool = False) -> dict[str, Any]:
        """Evict per policy: keep each model's ``keep`` most recently warmed releases and
        whatever a tag points at or is pinned; drop failed releases and orphan blobs."""
        if keep < 0:
            raise UsageError("--keep must be 0 or more")
        self.ensure()
        with self.lock():
            records = self._records()
            protected = self._protected(records)
            victims = []
            by_name: dict[str, list[dict[str, Any]]] = {}
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
            freed = self._unreferenced_bytes(live - gone, gone)
            evicted = [{"name": r["name"], "version": r["version"]} for r in victims]
            if not dry_run:
                freed = sum(self._evict(r)["freed_bytes"] for r in victims) + self._delete_unreferenced()
                # Left by a process killed while linking; nothing else uses them under the lock.
                shutil.rmtree(self.staging, ignore_errors=True)
                shutil.rmtree(self.quarantine, ignore_errors=True)
                self.staging.mkdir(parents=True, exist_ok=True)
                # Logs of detached warms (a running one holds the lock, so none is running).
                for log in (self.state / "requests").glob("*.log"):
                    log.unlink(missing_ok=True)
            return {
                "event": "result",
                "op": "gc",
                "dry_run": dry_run,
                "evicted": evicted,
                "kept": sorted(kept),
                "freed_bytes": freed,
                "free_bytes": self.free_bytes(),
            }

    # -- status --------------------------------------------------------------------

    def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        """Readiness of one release (``ref`` NAME:TAG or NAME:VERSION; ``version`` and
        ``digest`` say what the store expects), or of every release when ``ref`` is None.
        ``verify`` re-hashes what is ready first (:meth:`verify`): a release whose bytes
        changed on disk is then reported ``failed`` and no longer served."""
        if verify:
            self._verify_ready(ref, version)
        base = {
            "event": "result",
            "op": "status",
            "cache": str(self.root),
            "free_bytes": self.free_bytes() if self.root.exists() else None,
            "capacity": self.capacity,
            "policy": self.policy.describe() if self.policy.required else None,
            "weightship": __version__,
            "protocol": PROTOCOL,
        }
        if ref is None:
            releases = [self._release_status(r["name"], r["version"], None, None) for r in self._records()]
            return {**base, "releases": releases}
        r = refs.Ref.parse(ref)
        if r.label is None:
            raise UsageError("node status takes NAME:TAG or NAME:VERSION", "pass the digest with --digest")
        return {**base, **self._release_status(r.name, version, r.label, digest)}

    def _verify_ready(self, ref: str | None, version: str | None) -> None:
        if ref is None:
            targets = [(r["name"], r["version"]) for r in self._records() if r["state"] == "ready"]
        else:
            r = refs.Ref.parse(ref)
            if r.label is None:
                return
            targets = [(r.name, version or self.tags(r.name).get(r.label, r.label))]
        for name, v in targets:
            rec = self._read_record(name, v)
            if rec and rec.get("state") == "ready":
                # The damage is recorded, and reported by the status that follows.
                with contextlib.suppress(IntegrityError, SignatureError):
                    self.verify(f"{name}:{v}")

    def _release_status(self, name: str, version: str | None, label: str | None, digest: str | None) -> dict[str, Any]:
        tags = self.tags(name)
        tag = label if label is not None and (label in tags or (version is not None and label != version)) else None
        tag_version = tags.get(tag) if tag else None
        version = version or tag_version or label
        assert version is not None
        rec = self._read_record(name, version)
        out: dict[str, Any] = {
            "name": name,
            "version": version,
            "tag": tag,
            "tag_version": tag_version,
            "tags": sorted(t for t, v in tags.items() if v == version),
            "digest": None,
            "state": "absent",
            "bytes_present": 0,
            "bytes_total": None,
            "verified": False,
            "signer": None,
            "last_warm": None,
            "pinned": False,
            "error": None,
        }
        if rec is None:
            if tag and tag_version is None:
                out["error"] = f"no tag {tag} and no {name}:{version} on this node"
            return out
        state = rec["state"]
        error = rec.get("error")
        if state in ACTIVE and self._holder_run() != rec.get("run"):
            state, error = "failed", "the warm was interrupted (its process ended); run warm again to resume"
        present = self._bytes_present(name, version, rec)
        out.update(
            digest=rec.get("digest"),
            state=state,
            bytes_present=present,
            bytes_total=rec.get("bytes_total"),
            verified=bool(rec.get("verified")) and state == "ready",
            signer=rec.get("signer"),
            last_warm=iso(rec.get("warmed")),
            pinned=bool(rec.get("pinned")),
            error=error,
        )
        if digest and rec.get("digest") != digest and state != "evicted":
            out.update(
                state="failed", error=f"this node holds {name}:{version} with another digest ({rec.get('digest')})"
            )
        elif state == "ready" and tag and tag_version != version:
            where = f"points at {tag_version}" if tag_version else "is not set"
            out.update(
                state="pending", error=f"{name}:{tag} {where} on this node, not {version}; run warm {name}:{tag}"
            )
        return out

    def _bytes_present(self, name: str, version: str, rec: dict[str, Any]) -> int:
        if rec["state"] == "ready":
            return int(rec.get("bytes_total") or 0)
        if rec["state"] == "evicted":
            return 0
        m = self._manifest(name, version)
        if m is None:
            return 0
        total = 0
        for h, size in m.blobs().items():
            if (self.blobs / h).exists():
                total += size
            else:
                total += min(size, _size(self.partial / h))
        return total

    # -- verify and pin ------------------------------------------------------------

    def _locate(self, ref: str) -> tuple[str, str]:
        r = refs.Ref.parse(ref)
        if r.label is None:
            raise UsageError("pass NAME:VERSION or NAME:TAG")
        version = self.tags(r.name).get(r.label, r.label)
        if self._read_record(r.name, version) is None:
            raise NotFoundError(f"{r} is not in the cache {self.root}", "warm it first")
        return r.name, version

    def verify(self, ref: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Re-hash a materialised release against its manifest (and the node's policy).

        Damage is never left serving: a blob that no longer hashes to its name is moved to
        ``state/quarantine/``, every release that uses it leaves ``models/`` (its tags then
        lead nowhere rather than to wrong bytes) and is recorded ``failed`` naming the file,
        and the next warm fetches exactly the blobs that went."""
        from weightship.artifact import hashing
        from weightship.release import Release, check_signature

        name, version = self._locate(ref)
        with self.lock():
            rec = self._read_record(name, version) or {}
            if rec.get("state") != "ready":
                raise UsageError(f"{name}:{version} is {rec.get('state')}, not ready", "warm it first")
            rdir = self._rel_dir(name, version)
            data = (rdir / "manifest.json").read_bytes()
            manifest = Manifest.from_bytes(data)
            sig_path = rdir / SIGNATURE_FILE
            signature = sig_path.read_bytes() if sig_path.exists() else None
            try:
                signer = check_signature(Release(name, version, manifest, data, signature), self.policy)
            except SignatureError as e:
                # The node's policy no longer admits it (a key was revoked, say): not served.
                self._withdraw({(name, version)}, f"signature: {e}")
                raise
            tree = self.models / name / version
            problems = []
            files = {f.path: f for f in manifest.files}
            on_disk = {
                p.relative_to(tree).as_posix(): p
                for p in tree.rglob("*")
                if (p.is_file() or p.is_symlink()) and p.name != SIGNATURE_FILE
            }
            for rel in sorted(set(on_disk) - set(files)):
                problems.append(f"{rel}: not part of the release")
            for rel in sorted(set(files) - set(on_disk)):
                problems.append(f"{rel}: missing")
            # The blobs themselves are hashed (each once): a tree file is a hard link to one.
            blobs = manifest.blobs()
            hashed = hashing.sha256_files([self.blobs / h for h in blobs if (self.blobs / h).exists()], progress)
            bad = {h for h in blobs if hashed.get(self.blobs / h, ("",))[0] != h}
            for rel, f in files.items():
                if f.sha256 in bad:
                    problems.append(f"{rel}: corrupt (its bytes no longer match the signed sha256)")
            if problems:
                for h in bad:
                    self._quarantine(h)
                why = f"corrupt: {problems[0]}"
                self._withdraw({(name, version)}, why)
                raise IntegrityError(
                    f"{name}:{version} in {self.root}: {'; '.join(problems[:3])}",
                    "it is no longer served; run warm again to repair it (only the damaged files are fetched)",
                )
            return {
                "event": "result",
                "op": "verify",
                "name": name,
                "version": version,
                "files": len(files),
                "verified": signer is not None,
                "signer": signer.to_dict() if signer else None,
            }

    def check_blob(self, h: str) -> dict[str, Any]:
        """Re-hash one blob this node holds, after a peer reported that the copy it got
        from here did not verify. A blob that is corrupt is quarantined and the releases
        that use it stop being served (see :meth:`verify`); a sound one is left alone, so a
        lying reporter costs one re-hash and changes nothing."""
        from weightship.artifact import hashing

        if not _HEX.match(h):
            raise UsageError(f"{h[:80]!r} is not a sha256 hex digest")
        with self.lock():
            path = self.blobs / h
            if not path.exists():
                return {"event": "result", "op": "check", "blob": h, "held": False, "corrupt": False}
            corrupt = hashing.sha256_files([path])[path][0] != h
            withdrawn: list[str] = []
            if corrupt:
                self._quarantine(h)
                users = {
                    (r["name"], r["version"])
                    for r in self._records()
                    if r["state"] == "ready" and h in (self._manifest(r["name"], r["version"]) or _EMPTY).blobs()
                }
                withdrawn = [f"{n}:{v}" for n, v in sorted(users)]
                self._withdraw(users, f"corrupt: blob {h[:12]}… no longer matches its sha256 (a peer caught it)")
            return {
                "event": "result",
                "op": "check",
                "blob": h,
                "held": True,
                "corrupt": corrupt,
                "withdrawn": withdrawn,
            }

    def _quarantine(self, h: str) -> None:
        """Move a corrupt blob out of ``blobs/`` (kept for a post-mortem, removed by gc)."""
        self.quarantine.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.blobs / h, self.quarantine / h)

    def _withdraw(self, releases: set[tuple[str, str]], why: str) -> None:
        """Stop serving releases found damaged: their trees leave ``models/`` (a tag pointing
        at one then leads nowhere, which a serving process notices, instead of to wrong
        bytes) and their records say ``failed`` and why. A warm re-materialises them."""
        for name, version in releases:
            target = self.models / name / version
            if target.is_dir() and not target.is_symlink():
                trash = self.staging / f"withdrawn-{uuid.uuid4().hex}"
                os.replace(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
                _fsync_dir(target.parent)
            rec = self._read_record(name, version)
            if rec:
                rec.update(state="failed", error=why, verified=False)
                self._write_record(rec)

    def pin(self, ref: str, pinned: bool = True) -> dict[str, Any]:
        name, version = self._locate(ref)
        with self.lock():
            rec = self._read_record(name, version) or {}
            rec["pinned"] = pinned
            self._write_record(rec)
        return {"event": "result", "op": "pin", "name": name, "version": version, "pinned": pinned}


_EMPTY = Manifest(files=[])


def _last_used(rec: dict[str, Any]) -> float:
    # A release is "used" when warmed and until a tag moves off it; a failed one never
    # was, so its last attempt stands in.
    return max(rec.get("warmed") or rec.get("updated") or 0, rec.get("untagged") or 0)


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


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(path: Path) -> None:
    from weightship.store.file import fsync_dir

    with contextlib.suppress(OSError):
        fsync_dir(path)


class _Run:
    """Builds a warm's events; progress events are rate-limited, state changes are not."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.name = ""
        self.version = ""
        self.total = 0
        self.done = 0
        self.state = "pending"
        self.file: str | None = None
        self._lock = threading.Lock()
        self._last = 0.0

    def _event(self, **extra: Any) -> dict[str, Any]:
        return {
            "event": "progress",
            "state": self.state,
            "name": self.name or None,
            "version": self.version or None,
            "bytes_done": self.done,
            "bytes_total": self.total,
            "file": self.file,
            "message": None,
            **extra,
        }

    def progress(self, state: str, message: str | None = None) -> None:
        with self._lock:
            self.state = state
            ev = self._event(message=message)
            self._last = time.monotonic()
        self.emit(ev)

    def advance(self, n: int, file: str) -> None:
        with self._lock:
            self.done += n
            self.file = file
            now = time.monotonic()
            if now - self._last < EVENT_INTERVAL:
                return
            self._last = now
            ev = self._event()
        self.emit(ev)

    def result(self, state: str, **extra: Any) -> dict[str, Any]:
        self.state = state
        if state == "ready":
            self.done = self.total
        ev = self._event(event="result", error=None, retryable=False)
        ev.pop("message")
        ev.pop("file")
        ev.update(extra)
        self.emit(ev)
        return ev


__all__ = ["PROTOCOL", "STATES", "Arrivals", "Emit", "NodeCache", "PeerBlob", "SpaceError", "WarmRequest", "iso"]
