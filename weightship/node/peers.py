"""The receiving side of the peer protocol (docs/format.md, "Peers"): how a node asks a
peer of its region for a blob's bytes and appends them to its partial file.

:class:`PeerTransfer` is what :class:`weightship.node.fetch.Sources` moves a blob from a
peer with; :class:`HttpPeers` speaks the agents' blob endpoint over the warm's HTTP client
(``weightship.node.fetch.HttpClient``, passed in: this module imports no source). Which
peer to ask, when to leave one and whom to blame for a copy that does not verify is
Sources' business, not a transfer's.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from weightship.store.writer import BlobWriter, TooLarge

Progress = Callable[[int], None]

# How long a peer may wait for a blob it does not know yet to be announced by a warm that
# is starting there (the region's warms start at about the same time).
PEER_WAIT = 10
# No byte from a peer for this long: it is slow or stuck, try the next source. (An agent
# ends a stream itself after serve_http.PEER_STALL seconds without a new byte to send.)
PEER_READ_TIMEOUT = 30.0
# How long to sleep while a peer says a blob is queued behind its other downloads.
QUEUED_POLL = (0.1, 1.0)
# Telling a peer its copy did not verify is best effort: not worth holding a warm up for.
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Peer:
    """A peer as a warm request names it (``peers.nodes``): its name in the fleet, the URL
    of its agent and the peer token that opens its blob endpoint."""

    name: str
    url: str
    token: str


class PeerError(Exception):
    """A transfer from a peer ended before the blob's end: ``reason`` says why (for the
    warm's report), ``appended`` how many bytes it did append first (kept: the next
    source goes on from them), ``leave`` whether to stop asking this peer for the rest of
    the warm (a peer that merely does not hold the blob stays)."""

    def __init__(self, reason: str, appended: int, *, leave: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.appended = appended
        self.leave = leave


class PeerTransfer:
    """Moves a blob's bytes from a peer to this node. Implementations must be safe to
    call from the warm's fetch threads at once."""

    def fetch(self, peer: Peer, hexdigest: str, w: BlobWriter, progress: Progress) -> int:
        """Append what ``peer`` has of the blob after ``w.have`` to ``w``; return the bytes
        appended (the blob is then whole, unless verified otherwise by the caller), or
        raise PeerError saying how many were appended before the transfer failed.
        ``progress`` is told every chunk appended."""
        raise NotImplementedError

    def report_corrupt(self, peer: Peer, hexdigest: str) -> None:
        """Tell ``peer`` that the copy it served did not verify. Best effort: never raises."""

    def close(self) -> None:
        pass


class Http(Protocol):
    """What :class:`HttpPeers` needs of an HTTP client (fetch.HttpClient is one)."""

    def request(
        self, method: str, url: str, headers: dict[str, str], timeout: float
    ) -> AbstractContextManager[http.client.HTTPResponse]: ...

    def close(self) -> None: ...


class HttpPeers(PeerTransfer):
    """The peer protocol over HTTP(S): ``GET /v1/blobs/sha256/HEX?wait=…`` with a peer
    token and, to go on from a partial file, a Range (the answer must be the range asked
    for); 503 is a blob queued behind the peer's other downloads (poll again), 404 a blob
    the peer does not hold, a short body a peer that stalled or lost its own source.

    Bytes are read into one reused buffer per thread: measured on loopback, a read loop
    with readinto costs a tenth of the CPU of httpx's (0.44 against 3.7 CPU-s/GiB), and
    in a region every byte of the release passes through this loop on every node."""

    def __init__(self, http: Http, chunk: int) -> None:
        self.http = http
        self.chunk = chunk
        self._local = threading.local()

    def _buffer(self, need: int) -> memoryview:
        """This thread's buffer, at least ``need`` bytes long (up to ``chunk``): a warm of
        small files keeps small buffers, one of large files one chunk per thread."""
        view = getattr(self._local, "view", None)
        if view is None or len(view) < min(need, self.chunk):
            view = self._local.view = memoryview(bytearray(min(need, self.chunk)))
        return view

    def fetch(self, peer: Peer, hexdigest: str, w: BlobWriter, progress: Progress) -> int:
        url = f"{peer.url.rstrip('/')}/v1/blobs/sha256/{hexdigest}?wait={PEER_WAIT}"
        appended = 0
        delay = QUEUED_POLL[0]
        while True:
            pos = w.have
            headers = {"Authorization": f"Bearer {peer.token}"}
            if pos:
                headers["Range"] = f"bytes={pos}-"
            try:
                with self.http.request("GET", url, headers, PEER_READ_TIMEOUT) as resp:
                    if resp.status != 503:
                        return appended + self._receive(resp, w, pos, appended, progress)
            except TimeoutError:
                raise PeerError(f"did not answer within {PEER_READ_TIMEOUT:g}s", appended) from None
            except (OSError, http.client.HTTPException) as e:
                raise PeerError(f"failed ({type(e).__name__}: {e})", appended) from None
            # Queued behind the peer's other downloads: it will come.
            progress(0)
            time.sleep(delay)
            delay = min(QUEUED_POLL[1], delay * 2)

    def _receive(
        self, resp: http.client.HTTPResponse, w: BlobWriter, pos: int, appended: int, progress: Progress
    ) -> int:
        """Append the body of the peer's answer; return the bytes appended. Every failure
        is a PeerError here, counting ``appended`` (bytes of earlier answers) in."""
        status = resp.status
        if status == 404:
            raise PeerError("does not hold the blob", appended, leave=False)
        if status in (401, 403):
            raise PeerError(f"refused the peer token (HTTP {status})", appended)
        if status not in (200, 206) or (pos and status != 206):
            raise PeerError(f"answered HTTP {status}", appended)
        if pos and not (resp.getheader("Content-Range") or "").startswith(f"bytes {pos}-"):
            raise PeerError("answered another range than the one asked for", appended)
        view = self._buffer(w.size + 1)
        got = 0
        while True:
            try:
                # 0 at the end of the body, or where the peer ended it short (it stalled).
                k = resp.readinto(view)
            except TimeoutError:
                raise PeerError(f"sent nothing for {PEER_READ_TIMEOUT:g}s", appended + got) from None
            except (OSError, http.client.HTTPException) as e:
                raise PeerError(f"failed ({type(e).__name__}: {e})", appended + got) from None
            if not k:
                break
            try:
                w.append(view[:k])
            except TooLarge:
                raise PeerError("sent more bytes than the blob has", appended + got) from None
            got += k
            progress(k)
        w.flush()
        if pos + got < w.size:
            raise PeerError("stopped sending before the end of the blob", appended + got)
        return got

    def report_corrupt(self, peer: Peer, hexdigest: str) -> None:
        """The peer answers at once and re-hashes its own copy in the background (and
        quarantines it if the bit rot is there, not on the wire); its answer changes
        nothing here."""
        url = f"{peer.url.rstrip('/')}/v1/blobs/sha256/{hexdigest}/check"
        try:
            with self.http.request("POST", url, {"Authorization": f"Bearer {peer.token}"}, CHECK_TIMEOUT):
                pass
        except (OSError, http.client.HTTPException):
            pass

    def close(self) -> None:
        self.http.close()
