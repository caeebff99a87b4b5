"""The node engine through local regions and `weightship node`: layout, tags, space, gc, verify."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fleetkit import (
    cli_json,
    fleet_toml,
    model,
    on_disk,
    publish,
    record,
    source_files,
    tree,
    unsafe_warm_request,
)
from tests.helpers import error_line, run_cli
from weightship.node.cache import NodeCache
from weightship.node.protocol import WarmRequest


@pytest.fixture
def lab(tmp_path: Path, keypair):
    """A signed store and a weightship.toml with a region of three local nodes."""
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    nodes = [{"name": f"n{i}", "transport": "local", "cache": f"caches/n{i}"} for i in (1, 2, 3)]
    (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": nodes}, store=store, pub=pub))
    return tmp_path, store, key, pub


def test_local_region_layout_tags_and_rewarm(lab) -> None:
    root, store, key, pub = lab
    m1 = model(root, 1)
    publish(m1, "m:1.0", store, key, tags=["prod"])
    proc = run_cli("warm", "m:prod", "--region", "lab", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    doc = cli_json(proc)
    assert doc["ok"] and doc["ready"] == 3 and doc["version"] == "1.0" and doc["tags"] == ["prod"]
    for n in doc["nodes"]:
        assert n["state"] == "ready" and n["verified"] is True and n["signer"]["method"] == "key"
        assert n["bytes_fetched"] == n["bytes_total"]

    cache = root / "caches" / "n1"
    prod = cache / "models" / "m" / "prod"
    assert prod.is_symlink() and os.readlink(prod) == "1.0"
    assert {k: v for k, v in tree(prod).items() if k != "model.sig"} == source_files(m1)
    manifest = json.loads((cache / "state/releases/m/1.0/manifest.json").read_text())
    for f in manifest["files"]:
        blob = cache / "blobs" / "sha256" / f["sha256"]
        linked = cache / "models" / "m" / "1.0" / f["path"]
        # Hard links into read-only verified blobs: no copy, and a server cannot scribble on them.
        assert linked.stat().st_ino == blob.stat().st_ino
        assert blob.stat().st_mode & 0o777 == 0o444
    assert run_cli("verify", prod, "--key", pub).returncode == 0

    # A second version moves the tag; the first stays materialised, untagged.
    m2 = model(root, 2)
    publish(m2, "m:2.0", store, key, tags=["prod"])
    proc = run_cli("warm", "m:prod", "--region", "lab", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(prod) == "2.0"
    assert (cache / "models" / "m" / "1.0").is_dir()
    assert {k: v for k, v in tree(prod).items() if k != "model.sig"} == source_files(m2)

    # Warming what is already there moves no bytes.
    again = cli_json(run_cli("warm", "m:prod", "--region", "lab", "--json", cwd=root))
    assert [n["bytes_fetched"] for n in again["nodes"]] == [0, 0, 0]

    status = cli_json(run_cli("status", "m:prod", "--region", "lab", "--json", cwd=root))
    assert status["ok"] and status["version"] == "2.0"
    row = status["nodes"][0]
    assert row["state"] == "ready" and row["tag_version"] == "2.0" and row["verified"]
    assert row["bytes_present"] == row["bytes_total"] and row["free_bytes"] > 0 and row["last_warm"]

    # Without a ref: every release on every node.
    everything = cli_json(run_cli("status", "--json", cwd=root))
    assert everything["ok"] and everything["ready"] == 3
    releases = {(r["version"], tuple(r["tags"]), r["state"]) for r in everything["nodes"][0]["releases"]}
    assert releases == {("1.0", (), "ready"), ("2.0", ("prod",), "ready")}

    # The store moves prod back; until the nodes are warmed again, status says so.
    assert run_cli("tag", "m:1.0", "prod", "--store", store).returncode == 0
    proc = run_cli("status", "m:prod", "--region", "lab", "--json", cwd=root)
    assert proc.returncode == 1
    row = cli_json(proc)["nodes"][0]
    assert row["state"] == "staged" and row["tag_version"] == "2.0" and "warm m:prod" in row["error"]


def test_node_refuses_unsafe_manifest_and_foreign_protocol(tmp_path: Path) -> None:
    req = unsafe_warm_request("../../etc/cron.d/x")
    cache = tmp_path / "cache"
    proc = run_cli("node", "warm", "--cache", cache, "--json", input=json.dumps(req))
    assert proc.returncode == 1
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["state"] == "failed" and "'..'" in result["error"]
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())

    req["protocol"] = 99
    proc = run_cli("node", "warm", "--cache", cache, input=json.dumps(req))
    assert proc.returncode == 2 and "protocol 99" in error_line(proc)


def _small_tmpfs(path: Path, size_mib: int) -> bool:
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_disk_too_small_evicts_untagged_then_fails_before_fetching(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    # Three distinct ~4 MiB releases; the cache holds one and a half of them.
    models = [model(tmp_path, seed, hidden=512) for seed in (11, 12, 13)]
    for i, m in enumerate(models, 1):
        publish(m, f"big:{i}.0", store, key)
    size = sum(p.stat().st_size for p in models[0].rglob("*") if p.is_file())
    cache = tmp_path / "small"
    mounted = _small_tmpfs(cache, 7)
    node: dict = {"name": "small", "transport": "local", "cache": str(cache)}
    if not mounted:
        node["capacity"] = 7 * 1024 * 1024
    (tmp_path / "weightship.toml").write_text(fleet_toml({"tiny": [node]}, store=store, pub=pub))
    try:
        first = run_cli("warm", "big:1.0", "--region", "tiny", "--json", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        # big:1.0 is untagged, so it may go to make room for big:2.0 (which becomes prod).
        proc = run_cli("warm", "big:2.0", "--tag", "prod", "--region", "tiny", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        node_doc = cli_json(proc)["nodes"][0]
        assert [e["version"] for e in node_doc["evicted"]] == ["1.0"]
        # The tokenizer is the same in every seed's model: that blob is shared, and stays.
        assert size * 0.9 < node_doc["evicted"][0]["freed_bytes"] < size
        assert record(cache, "big", "1.0")["state"] == "evicted"
        assert not (cache / "models" / "big" / "1.0").exists()
        assert (cache / "models" / "big" / "prod").resolve().name == "2.0"

        # big:3.0 does not fit and nothing may be evicted (prod points at 2.0): refuse first.
        before = on_disk(cache)
        proc = run_cli("warm", "big:3.0", "--region", "tiny", cwd=tmp_path)
        assert proc.returncode == 1
        assert "not enough space for big:3.0" in proc.stdout and "missing" in proc.stdout, proc.stdout
        assert "nothing was fetched" in proc.stdout
        assert on_disk(cache) == before
        assert not list((cache / "state" / "partial").iterdir())
        assert record(cache, "big", "3.0")["state"] == "failed"
        assert (cache / "models" / "big" / "prod").resolve().name == "2.0"
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=False)


def test_gc_keeps_newest_tagged_and_pinned(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    for i in (1, 2, 3):
        publish(model(tmp_path, 20 + i), f"g:{i}.0", store)
    from weightship import release
    from weightship.fleet.plan import build_request
    from weightship.store import open_store

    st = open_store(store)
    cache = NodeCache(tmp_path / "cache")
    for i in (1, 2, 3):
        req = build_request(st, release.resolve(st, f"g:{i}.0"), tags=["prod"] if i == 3 else [])
        assert cache.warm(req)["state"] == "ready"
    cache.pin("g:1.0")

    def blobs(version: str) -> set[str]:
        doc = json.loads((cache.state / "releases" / "g" / version / "manifest.json").read_text())
        return {f["sha256"] for f in doc["files"]}

    only_v2 = blobs("2.0") - blobs("1.0") - blobs("3.0")
    assert only_v2 and all((cache.blobs / h).exists() for h in only_v2)

    (tmp_path / "weightship.toml").write_text(
        fleet_toml({"one": [{"name": "n", "transport": "local", "cache": str(cache.root)}]})
    )
    before = tree(cache.root / "models")
    dry = run_cli("gc", "--region", "one", "--keep", "1", "--dry-run", "--json", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    row = cli_json(dry)["nodes"][0]
    assert [e["version"] for e in row["evicted"]] == ["2.0"] and row["freed_bytes"] > 0
    assert tree(cache.root / "models") == before

    proc = run_cli("gc", "--region", "one", "--keep", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "evicted g:2.0" in proc.stdout
    assert not (cache.models / "g" / "2.0").exists()
    assert (cache.models / "g" / "1.0").is_dir() and (cache.models / "g" / "3.0").is_dir()
    assert not any((cache.blobs / h).exists() for h in only_v2)
    assert all((cache.blobs / h).exists() for h in blobs("1.0") | blobs("3.0"))
    assert cache.status("g:2.0")["state"] == "evicted"
    assert cache.status("g:prod")["state"] == "ready"


def test_verify_finds_damage_and_the_next_warm_repairs_it(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 30)
    publish(src, "v:1.0", store, tags=["prod"])
    from weightship import release
    from weightship.fleet.plan import build_request
    from weightship.store import open_store

    st = open_store(store)
    req = build_request(st, release.resolve(st, "v:prod"), tags=["prod"])
    cache = NodeCache(tmp_path / "cache")
    assert cache.warm(req)["state"] == "ready"
    assert run_cli("node", "verify", "--cache", cache.root, "v:prod").returncode == 0

    victim = cache.models / "v" / "1.0" / "config.json"
    os.chmod(victim, 0o644)
    victim.write_text('{"tampered": true}')
    proc = run_cli("node", "verify", "--cache", cache.root, "v:prod")
    assert proc.returncode == 1 and "config.json" in error_line(proc)
    assert cache.status("v:prod")["state"] == "failed"

    result = cache.warm(req)
    assert result["state"] == "ready" and 0 < result["bytes_fetched"] < result["bytes_total"]
    assert source_files(src) == {k: v for k, v in tree(cache.models / "v" / "prod").items() if k != "model.sig"}


def test_warm_request_round_trips() -> None:
    req = WarmRequest(b'{"x":1}', None, {"store": "file:///s"}, tags=["prod"], pin=True, max_rate=10)
    back = WarmRequest.from_json(req.to_json())
    assert back == req


def test_demo_warms_a_local_region(tmp_path: Path) -> None:
    import time

    start = time.monotonic()
    proc = run_cli("demo", "--dir", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    assert "3/3 local nodes ready" in proc.stdout
    for i in (1, 2, 3):
        assert f"gpu-{i}: ready, prod -> 1.0, signature verified" in proc.stdout
        assert (tmp_path / "demo" / "nodes" / f"gpu-{i}" / "models" / "demo" / "prod" / "config.json").is_file()
    status = run_cli("--config", tmp_path / "demo" / "weightship.toml", "status", "demo:prod", "--json")
    assert status.returncode == 0 and cli_json(status)["ready"] == 3
