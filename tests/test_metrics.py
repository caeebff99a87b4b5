"""Prometheus metrics of real agents: scraped after a real warm of a region of two agents
from a real S3 store (SeaweedFS), parsed with prometheus_client's own parser, and checked
against the bytes the warm's report says moved, per source and per peer."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleetkit import Agent, cli_json, corrupt_largest_blob, fleet_toml, model, node_toml, publish, start_agent
from tests.helpers import run_cli
from tests.servers import free_port
from weightship.errors import IntegrityError
from weightship.node.fetch import Sources
from weightship.node.metrics import Meter
from weightship.node.peers import Peer, PeerError, PeerTransfer
from weightship.node.protocol import peer_token
from weightship.store.writer import BlobWriter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(agent: Agent) -> Samples:
    r = httpx.get(f"{agent.url}/metrics", headers={"Authorization": f"Bearer {agent.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def blob_bytes(src: Path) -> int:
    """Bytes of the model's distinct blobs (files with equal contents are one blob)."""
    sizes = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in src.rglob("*") if p.is_file()}
    return sum(sizes.values())


def test_metrics_count_the_bytes_a_region_warm_moved(tmp_path: Path, keypair, s3_store_url: str) -> None:
    key, pub = keypair
    # Several shards, so that each agent fetches some from the store and some from its peer.
    src = model(tmp_path, 71, hidden=512)
    for i in range(4):
        (src / f"extra-{i}.bin").write_bytes(os.urandom(300_000 + i))
    publish(src, "m:1.0", s3_store_url, key, tags=["prod"])
    policy = node_toml(tmp_path / "node.toml", pub)
    mport = free_port()
    agents = [
        start_agent(tmp_path / "a0", policy, {"WEIGHTSHIP_METRICS_LISTEN": f"127.0.0.1:{mport}"}),
        start_agent(tmp_path / "a1", policy, {}),
    ]
    try:
        before = [scrape(a) for a in agents]
        for s in before:
            assert value(s, "weightship_bytes_fetched_total", source="store") == 0
            assert value(s, "weightship_bytes_fetched_total", source="peer") == 0
            assert value(s, "weightship_bytes_served_total") == 0
            assert not any(name == "weightship_release_ready" for name, _ in s)

        work = tmp_path / "work"
        work.mkdir()
        (work / "weightship.toml").write_text(
            fleet_toml({"r": [agents[0].node("a0"), agents[1].node("a1")]}, None, pub)
        )
        proc = run_cli("warm", "m:prod", "--region", "r", "--json", "--store", s3_store_url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = {n["node"]: n for n in cli_json(proc)["nodes"]}
        assert sum(sum(n["bytes_from_peers"].values()) for n in rows.values()) > 0, rows

        total = blob_bytes(src)
        for name, agent in zip(("a0", "a1"), agents, strict=True):
            s = scrape(agent)
            row = rows[name]
            # What this agent appended, by source: exactly the warm's own report.
            assert value(s, "weightship_bytes_fetched_total", source="store") == row["bytes_from_origin"]
            assert value(s, "weightship_bytes_fetched_total", source="peer") == sum(row["bytes_from_peers"].values())
            assert row["bytes_from_origin"] + sum(row["bytes_from_peers"].values()) == total
            # What it served: what the other node says it got from this one.
            got_from_me = sum(n["bytes_from_peers"].get(name, 0) for other, n in rows.items() if other != name)
            assert value(s, "weightship_bytes_served_total") == got_from_me
            assert value(s, "weightship_release_ready", name="m", version="1.0") == 1
            assert value(s, "weightship_cache_used_bytes") == total
            free = value(s, "weightship_cache_free_bytes")
            # Others share the disk: the same figure, give or take what they wrote meanwhile.
            assert abs(free - shutil.disk_usage(agent.cache).free) < 256 * 1024 * 1024
            assert value(s, "weightship_warm_duration_seconds_count", state="ready") == 1
            assert value(s, "weightship_warm_duration_seconds_count", state="failed") == 0
            assert 0 < value(s, "weightship_warm_duration_seconds_sum", state="ready") <= row["seconds"] + 1
            for source in ("store", "peer", "cache"):
                assert value(s, "weightship_verify_failures_total", source=source) == 0

        # The metrics port: /metrics without a token, the same numbers, and nothing else.
        metrics_url = f"http://127.0.0.1:{mport}"
        r = httpx.get(f"{metrics_url}/metrics", timeout=10)
        assert r.status_code == 200
        open_samples = parse(r.text)
        assert value(open_samples, "weightship_bytes_served_total") == value(
            scrape(agents[0]), "weightship_bytes_served_total"
        )
        auth = {"Authorization": f"Bearer {agents[0].token}"}
        for path in ("/v1/health", "/v1/status", "/", "/metrics/", "/v1/blobs/sha256/" + "0" * 64):
            assert httpx.get(f"{metrics_url}{path}", headers=auth, timeout=10).status_code == 404, path
        assert httpx.post(f"{metrics_url}/v1/warm", content=b"{}", headers=auth, timeout=10).status_code == 404
        assert httpx.post(f"{metrics_url}/metrics", timeout=10).status_code == 405

        # The API port: /metrics takes the agent's token, and not a peer token.
        api = agents[0].url
        assert httpx.get(f"{api}/metrics", timeout=10).status_code == 401
        peer = peer_token(agents[0].token, int(time.time()) + 600)
        assert httpx.get(f"{api}/metrics", headers={"Authorization": f"Bearer {peer}"}, timeout=10).status_code == 401
        # Agent a1 has no metrics port.
        assert "metrics on" not in (agents[1].dir / "agent.log").read_text()
        assert f"metrics on http://127.0.0.1:{mport}/metrics" in (agents[0].dir / "agent.log").read_text()
    finally:
        for a in agents:
            a.stop()


def test_a_copy_that_does_not_verify_is_counted(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store_root = tmp_path / "store"
    store = f"file://{store_root}"
    src = model(tmp_path, 72)
    publish(src, "m:1.0", store, key)
    largest = src / corrupt_largest_blob(store_root, src)
    agent = start_agent(tmp_path / "agent", node_toml(tmp_path / "node.toml", pub), {}, store=store)
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "weightship.toml").write_text(fleet_toml({"r": [agent.node("a0")]}, store, pub))
        proc = run_cli("warm", "m:1.0", "--region", "r", "--credentials", "node", "--json", cwd=work)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        s = scrape(agent)
        assert value(s, "weightship_verify_failures_total", source="store") == 1
        assert value(s, "weightship_verify_failures_total", source="peer") == 0
        assert value(s, "weightship_release_ready", name="m", version="1.0") == 0
        assert value(s, "weightship_warm_duration_seconds_count", state="failed") == 1
        assert value(s, "weightship_warm_duration_seconds_count", state="ready") == 0
        # The corrupt copy's bytes did move: they are counted, though nothing was kept.
        assert value(s, "weightship_bytes_fetched_total", source="store") >= largest.stat().st_size
        assert not (agent.cache / "blobs" / "sha256" / hashlib.sha256(largest.read_bytes()).hexdigest()).exists()
    finally:
        agent.stop()


def test_a_taken_metrics_port_is_one_usage_error(tmp_path: Path) -> None:
    import socket

    (tmp_path / "token").write_text("a-token-of-some-length\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args: list[Any] = ["agent", "serve", "--cache", tmp_path / "cache", "--token-file", tmp_path / "token"]
        args += ["--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{port}"]
        proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--metrics-listen" in proc.stderr and "in use" in proc.stderr
    proc = run_cli("agent", "serve", "--cache", tmp_path / "cache", "--token-file", tmp_path / "token",
                   "--listen", "127.0.0.1:7071", "--metrics-listen", "127.0.0.1:7071")  # fmt: skip
    assert proc.returncode == 2 and "must differ" in proc.stderr


class _Recorder(Meter):
    """A meter that notes what the engine tells it."""

    def __init__(self) -> None:
        self.fetched_bytes: dict[str, int] = {}
        self.failures: list[str] = []

    def fetched(self, source: str, n: int) -> None:
        self.fetched_bytes[source] = self.fetched_bytes.get(source, 0) + n

    def verify_failed(self, source: str) -> None:
        self.failures.append(source)


class _Peers(PeerTransfer):
    """Each peer sends its scripted bytes (maybe altered), all of them or up to a point."""

    def __init__(self, script: dict[str, tuple[bytes, int | None]]) -> None:
        self.script = script

    def fetch(self, peer: Peer, hexdigest: str, w: BlobWriter, progress) -> int:
        data, stop = self.script[peer.name]
        end = w.size if stop is None else min(w.size, stop)
        chunk = data[w.have : end]
        w.append(chunk)
        progress(len(chunk))
        if end < w.size:
            raise PeerError("failed (connection reset)", len(chunk))
        return len(chunk)


def test_the_meter_hears_each_byte_and_each_copy_that_did_not_verify(tmp_path: Path) -> None:
    """Where the bytes come from, as the warm's own report counts them: a lying peer, a
    peer that dies halfway, and the origin (a real file:// URL) completing the blob."""
    data = os.urandom(300_000)
    h = hashlib.sha256(data).hexdigest()
    origin = tmp_path / "origin.bin"
    origin.write_bytes(data)
    bad = data[:5] + bytes([data[5] ^ 1]) + data[6:]
    meter = _Recorder()
    peers = {"liar": (bad, None), "dies": (data, 100_000)}
    nodes = {n: {"url": "http://x", "token": "t"} for n in peers}
    src = Sources(
        {"urls": {h: f"file://{origin}"}},
        {"nodes": nodes, "blobs": {h: list(peers)}},
        transfer=_Peers(peers),
        meter=meter,
    )
    dest = tmp_path / "partial"
    src.fetch(h, dest, len(data), lambda n: None)
    assert dest.read_bytes() == data
    assert meter.failures == ["peer"]
    assert meter.fetched_bytes == {"peer": sum(src.from_peers.values()), "store": src.origin_bytes}
    assert meter.fetched_bytes == {"peer": len(data) + 100_000, "store": len(data) - 100_000}
    src.close()

    # A corrupt origin: counted against the store.
    origin.write_bytes(bad)
    meter = _Recorder()
    src = Sources({"urls": {h: f"file://{origin}"}}, None, meter=meter)
    with pytest.raises(IntegrityError):
        src.fetch(h, tmp_path / "partial2", len(data), lambda n: None)
    src.close()
    assert meter.failures == ["store"] and meter.fetched_bytes == {"store": len(data)}
