"""Blobs on their way into a node cache, as its peers see them.

A warm announces the blobs it will fetch (:class:`Arrivals`) and an agent serves them to
the peers of its region before they are complete (:class:`PeerBlob`): the peer verifies
the whole sha256 itself before it keeps a byte, so a region's nodes relay a blob that
crossed the origin link once. In memory: only a long-lived agent process serves peers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Arrival:
    size: int
    state: str = "queued"  # queued (a warm will fetch it), fetching
    ticks: int = 0  # bumped on every write and at the end: "something changed"
    wakers: list[Callable[[], None]] = field(default_factory=list)


class Arrivals:
    """The blobs a warm of this cache still has to fetch or is fetching now.

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
    the rename that completes a download, so a reader follows the same bytes throughout.

    ``blobs`` and ``partial`` are the cache's directories of verified blobs and of
    downloads in progress; ``arrivals`` is its record of the blobs on their way in."""

    def __init__(
        self, arrivals: Arrivals, blobs: Path, partial: Path, h: str, fd: int, size: int, complete: bool
    ) -> None:
        self.arrivals = arrivals
        self.blobs = blobs
        self.partial = partial
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
        a = self.arrivals.get(self.hexdigest)
        return a[2] if a else -1

    def state(self) -> str:
        """``complete``, ``fetching``, or ``gone`` (the download failed or started over:
        what was read so far may be worthless, and the reader should stop)."""
        if self.complete:
            return "complete"
        mine = os.fstat(self.fd).st_ino
        if self.arrivals.get(self.hexdigest) is not None:
            try:
                same = os.stat(self.partial / self.hexdigest).st_ino == mine
            except FileNotFoundError:
                same = False
            if same:
                return "fetching"
        try:
            st = os.stat(self.blobs / self.hexdigest)
        except FileNotFoundError:
            return "fetching" if self.arrivals.get(self.hexdigest) is not None else "gone"
        if st.st_ino == mine and st.st_size == self.size:
            self.complete = True
            return "complete"
        return "gone"

    def wait(self, ticks: int, wake: Callable[[], None]) -> bool:
        return self.arrivals.wait(self.hexdigest, ticks, wake)

    def close(self) -> None:
        # Idempotent: closing a reused descriptor number twice would close someone else's file.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    # A response whose body never started (the peer hung up first) never reaches close().
    __del__ = close


def open_peer_blob(arrivals: Arrivals, blobs: Path, partial: Path, h: str) -> PeerBlob | str:
    """A blob for a peer: a :class:`PeerBlob`, ``"queued"`` when a running warm will fetch
    it but has not started, or ``"absent"``. Only verified blobs and blobs that a warm is
    fetching now are served; a partial file left by an interrupted warm is not."""
    for _ in range(3):  # a download may complete (rename) between the looks
        try:
            fd = os.open(blobs / h, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            return PeerBlob(arrivals, blobs, partial, h, fd, os.fstat(fd).st_size, True)
        arriving = arrivals.get(h)
        if arriving is None:
            return "absent"
        state, size, _ = arriving
        if state == "queued":
            return "queued"
        try:
            fd = os.open(partial / h, os.O_RDONLY)
        except FileNotFoundError:
            continue
        return PeerBlob(arrivals, blobs, partial, h, fd, size, False)
    return "queued"


__all__ = ["Arrivals", "PeerBlob", "open_peer_blob"]
