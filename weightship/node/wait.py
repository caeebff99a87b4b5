"""``node wait``: block until a release is ready in a node cache, for a serving pod's init
container (or any script that must not start before the weights are in place).

A release is ready when its record says so, and the warm pipeline writes that record
only after every blob is verified and ``models/NAME/VERSION`` is linked into place, and
switches the tags only after that (:mod:`weightship.node.warm`): waiting on the record
(and, for ``NAME:TAG``, the tag) can never report a release before it is whole. What
"ready" means for a reference is exactly what ``node status`` says
(:func:`weightship.node.cache.status_of`): ``NAME:TAG`` is ready when the tag points at a
ready version on this node.

The cache is watched, not polled: on Linux, inotify (through ctypes: the few calls below
are all it takes, and no dependency) on the directories whose entries change as a warm
progresses (``state/`` for the cache lock, ``state/releases/NAME/*`` for the records,
``models/NAME`` for tags), so the wait ends within milliseconds of the record turning
ready; elsewhere, or when the kernel refuses a watch, a look every second. Every wake-up
re-reads the record: events only say *when* to look, never *what* is there.

When the release is absent (or failed, or evicted) and the caller can ask an agent to
warm it (``request_warm``: ``node wait --agent``), it is asked once, then asked again
only while it cannot be reached; a failure recorded before that request is then an old
one that the new warm replaces, and is not reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightship.artifact import refs
from weightship.errors import ConfigError, UsageError, WeightshipError
from weightship.node.cache import status_of
from weightship.node.layout import CacheLayout
from weightship.node.protocol import ReleaseStatus
from weightship.progress import human_bytes

SCHEMA = "weightship.node-wait/v1"
# Without inotify: how often to look (the wait then ends at most this late).
POLL = 1.0
# With inotify: look anyway this often (a watch of a directory replaced in between).
RECHECK = 5.0
# How soon to ask an agent again that could not be reached.
AGENT_RETRY = 2.0
# States in which an agent is asked to warm the release.
ASK_STATES = ("absent", "failed", "evicted")


class TryLater(WeightshipError):
    """The agent asked to warm the release could not be reached now; ask it again later."""


RequestWarm = Callable[[], dict[str, Any]]


@dataclass
class WaitResult:
    """How a wait ended. ``ok`` exactly when the release is ready; ``state`` is the last
    state seen (``node status``'s states); ``path`` the release directory
    (``models/NAME/VERSION``) when ready. ``to_dict()`` is the ``weightship.node-wait/v1``
    document (docs/json.md)."""

    ref: str
    cache: str
    ok: bool
    state: str
    timed_out: bool
    name: str
    version: str | None = None
    digest: str | None = None
    path: str | None = None
    bytes_present: int = 0
    bytes_total: int | None = None
    seconds: float = 0.0
    error: str | None = None
    # The agent's warm job, when one was asked for (node wait --agent).
    job: str | None = None
    # How the cache was watched: "inotify" or "poll".
    watch: str = "poll"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ref": self.ref,
            "cache": self.cache,
            "ok": self.ok,
            "state": self.state,
            "timed_out": self.timed_out,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "path": self.path,
            "bytes_present": self.bytes_present,
            "bytes_total": self.bytes_total,
            "seconds": self.seconds,
            "error": self.error,
            "job": self.job,
            "watch": self.watch,
        }


def wait_ready(
    cache: CacheLayout | Path | str,
    ref: str,
    timeout: float,
    *,
    request_warm: RequestWarm | None = None,
) -> WaitResult:
    """Wait up to ``timeout`` seconds for ``ref`` (NAME:VERSION, NAME:TAG or
    NAME@sha256:HEX) to be ready in ``cache``. Returns as soon as it is ready (``ok``), as
    soon as its warm failed (the record's error; with ``request_warm``, only a failure of
    the warm asked for), or at the timeout; never raises for those. ``request_warm`` asks
    an agent to warm it (see the module's docstring); it raises :class:`TryLater` when the
    agent cannot be reached, and its other errors end the wait (a configuration error is
    raised)."""
    r = refs.Ref.parse(ref)
    layout = cache if isinstance(cache, CacheLayout) else CacheLayout(Path(cache))
    started = time.monotonic()
    deadline = started + max(0.0, timeout)
    asked_at: float | None = None
    next_ask = started if request_warm is not None else None
    unreachable: str | None = None
    watcher = _open_watcher()
    out = WaitResult(ref, str(layout.root), False, "absent", False, r.name, watch=watcher.kind)
    try:
        while True:
            # Watch first, then look: whatever changes after the look wakes the wait.
            watcher.watch(_watched(layout, r.name))
            st = _look(layout, r)
            now = time.monotonic()
            out.seconds = round(now - started, 3)
            if st is not None:
                out.state, out.digest = st.state, st.digest
                # Absent: status names the label as the version, which may be a tag's name.
                out.version = st.version if st.state != "absent" else None
                out.bytes_present, out.bytes_total = st.bytes_present, st.bytes_total
                target = layout.models / st.name / st.version
                if st.state == "ready" and target.is_dir():
                    out.ok, out.path, out.error = True, str(target), None
                    return out
                # With an agent still to ask, a failure is what its warm is asked to repair.
                if st.state == "failed" and next_ask is None and _failed_since(layout, st, asked_at):
                    out.error = f"{_name(r, st)} failed in {layout.root}: {st.error or 'no reason recorded'}"
                    return out
            state = st.state if st is not None else "absent"
            if next_ask is not None and now >= next_ask and state in ASK_STATES:
                when = time.time()
                try:
                    doc = request_warm()  # type: ignore[misc]
                except TryLater as e:
                    unreachable = str(e)
                    next_ask = now + AGENT_RETRY
                except (ConfigError, UsageError):
                    raise
                except WeightshipError as e:
                    out.error = str(e)
                    return out
                else:
                    asked_at, next_ask, unreachable = when, None, None
                    out.job = doc.get("job")
                    continue
            left = deadline - now
            if left <= 0:
                out.timed_out = True
                out.error = _timeout_message(r, layout, out, timeout, unreachable)
                return out
            pause = min(left, watcher.interval)
            if next_ask is not None and state in ASK_STATES:
                pause = min(pause, max(0.0, next_ask - now))
            watcher.wait(pause)
    finally:
        watcher.close()


def _look(layout: CacheLayout, r: refs.Ref) -> ReleaseStatus | None:
    """The release ``r`` names as ``node status`` sees it; None while a NAME@sha256 has
    no record here."""
    if r.label is not None:
        return status_of(layout, f"{r.name}:{r.label}").release
    version = _version_of(layout, r.name, r.digest or "")
    if version is None:
        return None
    return status_of(layout, f"{r.name}:{version}", digest=r.digest).release


def _version_of(layout: CacheLayout, name: str, digest: str) -> str | None:
    """The version of ``name`` whose record has ``digest``."""
    try:
        versions = sorted(e.name for e in os.scandir(layout.releases / name) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    for v in versions:
        rec = layout.read_record(name, v)
        if rec and rec.get("digest") == digest:
            return v
    return None


def _failed_since(layout: CacheLayout, st: ReleaseStatus, asked_at: float | None) -> bool:
    """Whether a failure counts: any failure, unless a warm was asked for since; then only
    one recorded after the request (the record before it is what the new warm replaces)."""
    if asked_at is None:
        return True
    rec = layout.read_record(st.name, st.version) or {}
    return float(rec.get("updated") or 0) >= asked_at and rec.get("state") == "failed"


def _name(r: refs.Ref, st: ReleaseStatus) -> str:
    return f"{st.name}:{st.version}" if r.label in (None, st.version) else f"{r} ({st.name}:{st.version})"


def _timeout_message(r: refs.Ref, layout: CacheLayout, out: WaitResult, timeout: float, unreachable: str | None) -> str:
    what = f"{r} is not ready in {layout.root} after {timeout:g}s"
    if out.state == "absent":
        where = "it is not there"
    else:
        where = f"it is {out.state}"
        if out.bytes_total:
            where += f", {human_bytes(out.bytes_present)} of {human_bytes(out.bytes_total)} present"
    if unreachable:
        return f"{what} ({where}; the agent could not be reached: {unreachable})"
    if out.job:
        return f"{what} ({where}; the agent's warm, job {out.job}, goes on); wait again, or see its log"
    return f"{what} ({where}); warm it (weightship warm {r} --region R), or pass --agent so that this node's agent does"


def _watched(layout: CacheLayout, name: str) -> list[Path]:
    """The directories whose entries change as a warm of ``name`` progresses. Those not
    there yet are covered by their parent's watch (their creation wakes the wait)."""
    root = layout.root
    dirs = [
        root.parent,
        root,
        layout.state,
        layout.releases,
        layout.releases / name,
        layout.models,
        layout.models / name,
    ]
    with contextlib.suppress(OSError):
        dirs += [Path(e.path) for e in os.scandir(layout.releases / name) if e.is_dir(follow_symlinks=False)]
    return dirs


# -- watching ------------------------------------------------------------------------------


class _Poller:
    """No inotify: look every :data:`POLL` seconds."""

    kind = "poll"
    interval = POLL

    def watch(self, dirs: Iterable[Path]) -> None:
        pass

    def wait(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        pass


# From <sys/inotify.h>: what changes the entries of a watched directory.
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_ONLYDIR = 0x01000000
_MASK = (
    _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
) | _IN_ONLYDIR


class _Inotify:
    """Linux inotify on a set of directories. Only wake-ups matter (the caller re-reads
    the cache each time), so events are drained, never parsed. A directory removed and
    made again is watched again by the next :meth:`watch` (the kernel drops the old one)."""

    kind = "inotify"
    interval = RECHECK

    def __init__(self, libc: Any) -> None:
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        init = libc.inotify_init1
        init.argtypes = [ctypes.c_int]
        init.restype = ctypes.c_int
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def watch(self, dirs: Iterable[Path]) -> None:
        for d in dirs:
            if self._add(self.fd, os.fsencode(d), _MASK) >= 0:
                continue
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                # Out of watches (fs.inotify.max_user_watches) or not allowed to read it:
                # look every second as well, rather than miss the change.
                self.interval = POLL

    def wait(self, seconds: float) -> None:
        if self._poll.poll(max(0, int(seconds * 1000))):
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 64 * 1024):
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _open_watcher() -> _Inotify | _Poller:
    if not sys.platform.startswith("linux"):
        return _Poller()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _Inotify(libc)
    except (OSError, AttributeError):
        return _Poller()


__all__ = ["AGENT_RETRY", "POLL", "SCHEMA", "RequestWarm", "TryLater", "WaitResult", "wait_ready"]
