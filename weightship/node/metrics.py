"""What a node tells Prometheus: bytes moved per source, bytes served to peers, copies
that did not verify, warm durations, and (computed when scraped) which releases are
ready and how full the cache is.

The warm pipeline and the agent report to a :class:`Meter`; the default one tells no one,
so that ``node warm`` over ssh and the local transport pay nothing. The agent
(``weightship agent serve``) gives its warms an :class:`AgentMetrics`, which keeps the
counts in a Prometheus ``CollectorRegistry`` of its own (never the process-global one: a
test or an embedding program may run several agents in one process, each with its own
numbers), served at ``GET /metrics`` in the Prometheus text format.

Metrics (docs/format.md, "Metrics")::

    weightship_bytes_fetched_total{source="store"|"peer"}   bytes appended to this cache's
                                                            partial files, by where they came from
    weightship_bytes_served_total                           blob bytes sent to peers
    weightship_verify_failures_total{source="store"|"peer"|"cache"}
                                                            copies whose sha256 did not match
    weightship_warm_duration_seconds{state="ready"|"failed"}   histogram of warm jobs
    weightship_release_ready{name,version}                  1 when ready here, else 0
    weightship_cache_used_bytes, weightship_cache_free_bytes   blobs + partial files; free space

This module imports prometheus_client only when an :class:`AgentMetrics` is made, and no
part of the engine: the cache a scrape reads is handed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightship.node.layout import CacheLayout

# Where fetched bytes come from: the origin (a store, or URLs it signed) or a peer agent.
SOURCES = ("store", "peer")
# Where a copy that did not verify came from; "cache" is a blob found damaged on this node.
VERIFY_SOURCES = ("store", "peer", "cache")
# Warms take from seconds (a release already here) to hours (a large one over a slow link).
WARM_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Meter:
    """Told by the engine as bytes move; this base tells no one. Implementations are
    called from a warm's fetch threads at once and must be thread-safe."""

    def fetched(self, source: str, n: int) -> None:
        """``n`` bytes of a blob arrived from ``source`` (one of :data:`SOURCES`)."""

    def served(self, n: int) -> None:
        """``n`` bytes of a blob were sent to a peer."""

    def verify_failed(self, source: str) -> None:
        """A copy of a blob from ``source`` (one of :data:`VERIFY_SOURCES`) did not hash to its name."""

    def warmed(self, state: str, seconds: float) -> None:
        """A warm ended in ``state`` (``ready`` or ``failed``) after ``seconds``."""


NO_METER = Meter()


class AgentMetrics(Meter):
    """The counters of one agent, in a registry of its own; the gauges are read from
    ``cache`` at each scrape (records and a directory listing: cheap next to a scrape
    interval, and never stale)."""

    def __init__(self, cache: CacheLayout) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.cache = cache
        self.registry = CollectorRegistry(auto_describe=True)
        self._fetched = Counter(
            "weightship_bytes_fetched",
            "Blob bytes this node fetched, by source (the store or a peer).",
            ["source"],
            registry=self.registry,
        )
        self._served = Counter(
            "weightship_bytes_served", "Blob bytes this node served to its peers.", registry=self.registry
        )
        self._verify = Counter(
            "weightship_verify_failures",
            "Copies of blobs whose sha256 did not match their name, by where they came from.",
            ["source"],
            registry=self.registry,
        )
        self._warm = Histogram(
            "weightship_warm_duration_seconds",
            "How long the warms of this agent took, by how they ended.",
            ["state"],
            buckets=WARM_BUCKETS,
            registry=self.registry,
        )
        # Every label value shown from the start, at 0: a rate() over a series that appears
        # only with its first byte misses that byte.
        for s in SOURCES:
            self._fetched.labels(source=s)
        for s in VERIFY_SOURCES:
            self._verify.labels(source=s)
        for s in ("ready", "failed"):
            self._warm.labels(state=s)
        self.registry.register(_CacheCollector(cache))

    def fetched(self, source: str, n: int) -> None:
        if n:
            self._fetched.labels(source=source).inc(n)

    def served(self, n: int) -> None:
        if n:
            self._served.inc(n)

    def verify_failed(self, source: str) -> None:
        self._verify.labels(source=source).inc()

    def warmed(self, state: str, seconds: float) -> None:
        self._warm.labels(state="ready" if state == "ready" else "failed").observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The registry in the Prometheus text format (reads the cache: call off the event loop)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _CacheCollector:
    """The gauges, computed from the cache directory when scraped."""

    def __init__(self, cache: CacheLayout) -> None:
        self.cache = cache

    def describe(self) -> list[Any]:
        # Described without reading the cache (the registry asks once, on register).
        return list(self._families(read=False))

    def collect(self) -> Iterator[Any]:
        return self._families(read=True)

    def _families(self, *, read: bool) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        ready = GaugeMetricFamily(
            "weightship_release_ready",
            "1 when the release is ready (whole and verified) in this cache, else 0.",
            labels=["name", "version"],
        )
        used = GaugeMetricFamily("weightship_cache_used_bytes", "Bytes of blobs and partial downloads in the cache.")
        free = GaugeMetricFamily(
            "weightship_cache_free_bytes", "Free bytes for the cache (the disk's, less what --capacity leaves others)."
        )
        if read:
            cache = self.cache
            for rec in cache.records():
                ready.add_metric([rec["name"], rec["version"]], 1.0 if rec.get("state") == "ready" else 0.0)
            used.add_metric([], float(cache.used_bytes()))
            if cache.root.exists():
                free.add_metric([], float(cache.free_bytes()))
        yield ready
        yield used
        yield free


__all__ = ["CONTENT_TYPE", "NO_METER", "SOURCES", "VERIFY_SOURCES", "AgentMetrics", "Meter"]
