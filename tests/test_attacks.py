"""Attacks and faults against the promise that a `ready` node holds exactly the signed bytes.

Each test reproduces one way a store, a peer, a racing publisher, a full disk or a bad
request once broke that promise, against real processes (the CLI, `weightship node`,
agents) and real stores (file://, SeaweedFS), and checks what happens now: the exit
code, the one line that says what to do, and the bytes written or sent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleetkit import (
    cli_json,
    fleet_toml,
    model,
    node_toml,
    publish,
    record,
    source_files,
    spawn_cli,
    start_agents,
    tree,
)
from tests.helpers import error_line, require, run_cli

# -- helpers -------------------------------------------------------------------------------


def _manifest_doc(files: list[dict[str, Any]], name: str = "evil", version: str = "1.0") -> bytes:
    doc = {
        "schema": "weightship.manifest/v1",
        "name": name,
        "version": version,
        "created": None,
        "signature": "unsigned",
        "ignore_paths": [],
        "files": files,
        "total_size": sum(f["size"] for f in files),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _request(manifest: bytes, source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "protocol": 1,
        "op": "warm",
        "manifest": base64.b64encode(manifest).decode(),
        "signature": None,
        "source": source,
        **extra,
    }


def _node_warm(cache: Path, req: dict[str, Any], *extra: str, timeout: float = 120) -> dict[str, Any]:
    """`weightship node warm --cache C --json` (what ssh runs); its result event."""
    proc = run_cli("node", "warm", "--cache", cache, "--json", *extra, input=json.dumps(req), timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _request_for(store_url: str, ref: str, **kw: Any) -> dict[str, Any]:
    from weightship import release
    from weightship.fleet.plan import build_request
    from weightship.store import open_store

    st = open_store(store_url)
    try:
        return build_request(st, release.resolve(st, ref), **kw).to_dict()
    finally:
        st.close()


def _flip_byte(path: Path) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))
    path.chmod(0o444)


def _stray_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith((".tmp-", ".partial-")))


# -- 2. racing publishers ----------------------------------------------------------------------


class _Interleave:
    """A real store whose manifest write first lets a rival publish run to its end: the
    race between `publish` checking that a version is free and committing it, made
    certain instead of likely."""

    def __init__(self, store: Any, rival: Any) -> None:
        self._store = store
        self._rival = rival

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if key.endswith("/manifest.json") and self._rival is not None:
            rival, self._rival = self._rival, None
            rival()
        self._store.write(key, data, exclusive=exclusive)


@pytest.fixture(params=["file", "s3"])
def any_store(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_store_url")


def test_racing_publishers_never_leave_a_signature_that_does_not_match(any_store, tmp_path, keypair) -> None:
    from weightship import release
    from weightship.errors import ConflictError
    from weightship.store import Store, open_store
    from weightship.trust import signers as signing

    key, pub = keypair
    a, b = model(tmp_path, 1), model(tmp_path, 2)
    st = open_store(any_store)

    def rival() -> None:
        release.publish(b, "m:1.0", open_store(any_store), signer=signing.KeySigner(key))

    racing = _Interleave(st, rival)
    Store.register(_Interleave)
    with pytest.raises(ConflictError, match=r"m:1\.0 already exists"):
        release.publish(a, "m:1.0", racing, signer=signing.KeySigner(key))  # type: ignore[arg-type]
    # The winner (b) is what every reader gets, with the signature made for it.
    out = tmp_path / "out"
    proc = run_cli("pull", "m:1.0", out, "--key", pub, "--store", any_store)
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in tree(out).items() if k != "model.sig"} == source_files(b)
    # The loser's signature is gone, not left for a reader to stumble on.
    sigs = [k for k in st.list("releases/m/1.0/") if k.endswith(".sig")]
    assert len(sigs) == 1, sigs


def test_racing_publisher_processes(tmp_path, keypair, s3_store_url) -> None:
    """Two `weightship publish` processes of different directories to one version, at once,
    a few rounds on each store: one wins, the other exits 1 naming the version, and a pull
    under the key always verifies."""
    key, pub = keypair
    for store in (f"file://{tmp_path / 'store'}", s3_store_url):
        for i in range(3):
            a, b = model(tmp_path, 10 + 2 * i), model(tmp_path, 11 + 2 * i)
            ref = f"race:{i}"
            procs = [spawn_cli("-q", "publish", d, ref, "--key", key, "--store", store) for d in (a, b)]
            outs = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
            codes = sorted(rc for rc, _ in outs)
            assert codes == [0, 1], outs
            for rc, err in outs:
                if rc == 1:
                    assert f"race:{i}" in err and "already exists" in err, err
            dest = tmp_path / f"pull-{i}-{store[:2]}"
            proc = run_cli("pull", ref, dest, "--key", pub, "--store", store)
            assert proc.returncode == 0, proc.stderr


# -- 3. a manifest cannot make a node write through a hard link --------------------------------


def test_a_release_file_named_model_sig_is_refused_and_shared_blobs_stay_intact(tmp_path) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 3)
    publish(src, "good:1.0", store, tags=["prod"])
    cache = tmp_path / "cache"
    assert _node_warm(cache, _request_for(store, "good:prod", tags=["prod"]))["state"] == "ready"
    config = next(f for f in json.loads(_manifest_bytes(store, "good", "1.0"))["files"] if f["path"] == "config.json")
    before = (cache / "blobs" / "sha256" / config["sha256"]).read_bytes()

    # An unsigned release whose "model.sig" is the blob of good:1.0's config.json; the
    # node writes the release's signature into model.sig of the release directory.
    evil = _manifest_doc([{"path": "model.sig", "size": config["size"], "sha256": config["sha256"]}])
    req = _request(evil, {"store": store}, tags=["prod"])
    req["signature"] = base64.b64encode(b'{"not": "a bundle"}').decode()
    result = _node_warm(cache, req)
    assert result["state"] == "failed" and "reserved" in result["error"], result
    blob = cache / "blobs" / "sha256" / config["sha256"]
    assert blob.read_bytes() == before and blob.stat().st_mode & 0o777 == 0o444
    assert not (cache / "models" / "evil").exists()
    assert run_cli("node", "verify", "--cache", cache, "good:prod").returncode == 0
    # A store that lists it is refused by pull too, before anything is written.
    from weightship.store import open_store

    open_store(store).write("releases/evil/1.0/manifest.json", evil, exclusive=True)
    proc = run_cli("pull", "evil:1.0", tmp_path / "evil", "--store", store)
    assert proc.returncode == 1 and "reserved" in error_line(proc)
    assert not (tmp_path / "evil").exists()


def _manifest_bytes(store: str, name: str, version: str) -> bytes:
    from weightship.store import open_store

    return open_store(store).read(f"releases/{name}/{version}/manifest.json")


# -- 4. no source can send more than the manifest says ------------------------------------------


@contextlib.contextmanager
def _zero_server(limit: int = 64 * 1024 * 1024) -> Iterator[tuple[str, list[int]]]:
    """An HTTP server on loopback that answers every GET with zeros and no length, until
    the client hangs up (or ``limit`` bytes, so the test itself stays bounded)."""
    sent = [0]

    class Zeros(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            chunk = bytes(64 * 1024)
            with contextlib.suppress(OSError):
                while sent[0] < limit:
                    self.wfile.write(chunk)
                    sent[0] += len(chunk)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Zeros)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/blob", sent
    finally:
        srv.shutdown()
        srv.server_close()


def _ten_bytes() -> tuple[str, bytes]:
    data = b"0123456789"
    return hashlib.sha256(data).hexdigest(), data


def test_a_store_blob_linked_to_dev_zero_stops_at_the_declared_size(tmp_path) -> None:
    h, _ = _ten_bytes()
    root = tmp_path / "store"
    blob = root / "blobs" / "sha256" / h
    blob.parent.mkdir(parents=True)
    os.symlink("/dev/zero", blob)
    manifest = _manifest_doc([{"path": "config.json", "size": 10, "sha256": h}], "z", "1.0")
    (root / "releases" / "z" / "1.0").mkdir(parents=True)
    (root / "releases" / "z" / "1.0" / "manifest.json").write_bytes(manifest)
    store = f"file://{root}"

    # pull
    proc = run_cli("pull", "z:1.0", tmp_path / "out", "--store", store, timeout=60)
    assert proc.returncode == 1 and "config.json" in error_line(proc), proc.stderr
    assert not (tmp_path / "out").exists()
    staged = list((tmp_path / ".out.weightship-partial").rglob("*"))
    assert all(p.stat().st_size <= 10 for p in staged if p.is_file())
    # a node reading the store itself (--credentials node), and one given its file:// URL
    for source in ({"store": store}, {"urls": {h: f"file://{blob}"}}):
        cache = tmp_path / f"cache-{len(source)}-{'store' in source}"
        result = _node_warm(cache, _request(manifest, source), timeout=60)
        assert result["state"] == "failed", result
        assert "more than" in result["error"] or "corrupt" in result["error"], result
        held = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "state/partial" in str(p))
        assert held <= 10


def test_a_url_streaming_forever_stops_at_the_declared_size(tmp_path) -> None:
    h, _ = _ten_bytes()
    manifest = _manifest_doc([{"path": "config.json", "size": 10, "sha256": h}], "z", "1.0")
    cache = tmp_path / "cache"
    with _zero_server() as (url, sent):
        result = _node_warm(cache, _request(manifest, {"urls": {h: url}}), timeout=60)
    assert result["state"] == "failed" and "more than the 10 bytes" in result["error"], result
    assert sent[0] < 64 * 1024 * 1024  # the node hung up long before the server's own limit
    partial = cache / "state" / "partial" / h
    assert not partial.exists() or partial.stat().st_size <= 10


def test_an_agent_reads_local_files_only_inside_its_own_store(tmp_path, keypair) -> None:
    """A validly signed manifest, an agent with a policy: a request naming file:///dev/zero
    (or any file outside the agent's --store) is refused before a byte is written."""
    import httpx

    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 4)
    publish(src, "s:1.0", store, key, tags=["prod"])
    agent = start_agents([tmp_path / "agent"], node_toml(tmp_path / "node.toml", pub), store=store)[0]
    try:
        good = _request_for(store, "s:prod", tags=["prod"])
        for h in list(good["source"]["urls"]):
            evil = dict(good, source={"urls": {**good["source"]["urls"], h: "file:///dev/zero"}})
            break
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        for req in (evil, dict(good, source={"store": f"file://{outside}"})):
            r = httpx.post(f"{agent.url}/v1/warm", json=req, headers={"Authorization": f"Bearer {agent.token}"})
            assert r.status_code in (200, 202, 400), r.text
            if r.status_code == 400:
                assert "outside" in r.text or "local files" in r.text
                continue
            result = _wait_job(agent, r.json()["job"])
            assert result["state"] == "failed", result
            assert "outside this node's store" in result["error"], result
        assert sum(p.stat().st_size for p in (agent.cache / "state" / "partial").iterdir()) <= 10 * 1024 * 1024
        assert not (agent.cache / "models" / "s").exists()
        # The same request with the store's own URLs still warms.
        r = httpx.post(f"{agent.url}/v1/warm", json=good, headers={"Authorization": f"Bearer {agent.token}"})
        assert _wait_job(agent, r.json()["job"])["state"] == "ready"
    finally:
        agent.stop()


def _wait_job(agent: Any, job: str, timeout: float = 60) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.stream(
        "GET",
        f"{agent.url}/v1/jobs/{job}/events",
        headers={"Authorization": f"Bearer {agent.token}"},
        timeout=timeout,
    ) as resp:
        for line in resp.iter_lines():
            if line.strip():
                ev = json.loads(line)
                if ev.get("event") == "result":
                    return ev
            if time.monotonic() > deadline:
                break
    raise AssertionError("no result")


# -- 5. a disk that fills mid-warm -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a real file system that really fills up."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(proc.returncode == 0, "a tmpfs mount (root)", f"run the tests as root ({proc.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_mid_warm_fails_cleanly_and_resumes(tmp_path, small_disk) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 5, hidden=1024)  # about 16 MiB
    publish(src, "big:1.0", store, tags=["prod"])
    cache = small_disk / "cache"
    req = _request_for(store, "big:prod", tags=["prod"], max_rate=4 * 1024 * 1024)
    total = json.loads(base64.b64decode(req["manifest"]))["total_size"]

    (tmp_path / "req.json").write_text(json.dumps(req))
    with open(tmp_path / "req.json") as stdin:
        proc = subprocess.Popen(
            [*_cli(), "node", "warm", "--cache", str(cache), "--json"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    # Once the warm is under way, something else on the node takes the rest of the disk.
    deadline = time.monotonic() + 30
    while not any((cache / "state" / "partial").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
        while True:
            fh.write(bytes(64 * 1024))
    out, _ = proc.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["state"] == "failed" and "disk is full" in result["error"], result
    rec = record(cache, "big", "1.0")
    assert rec and rec["state"] == "failed" and "disk is full" in rec["error"]
    status = json.loads(run_cli("node", "status", "--cache", cache, "big:1.0", "--json").stdout)
    assert status["state"] == "failed" and "disk is full" in status["error"]
    assert not (cache / "models" / "big" / "1.0").exists()
    partial = sum(p.stat().st_size for p in (cache / "state" / "partial").iterdir())
    assert partial > 0

    # Space comes back: the next warm resumes from what was fetched.
    filler.unlink()
    result = _node_warm(cache, dict(req, max_rate=None))
    assert result["state"] == "ready", result
    assert result["bytes_fetched"] <= total - partial + 1024 * 1024, (result["bytes_fetched"], total, partial)
    assert source_files(src) == {k: v for k, v in tree(cache / "models" / "big" / "prod").items() if k != "model.sig"}


def test_gc_removes_the_partial_files_of_a_failed_warm(tmp_path, small_disk) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 6, hidden=1024)
    publish(src, "big:1.0", store)
    cache = small_disk / "cache"
    req = _request_for(store, "big:1.0")
    # Leave a failed warm with partial files behind: the store goes away half way.
    manifest = json.loads(base64.b64decode(req["manifest"]))
    biggest = max(manifest["files"], key=lambda f: f["size"])
    part = cache / "state" / "partial" / biggest["sha256"]
    part.parent.mkdir(parents=True)
    part.write_bytes(Path(req["source"]["urls"][biggest["sha256"]][7:]).read_bytes()[: biggest["size"] // 2])
    req["source"]["urls"][biggest["sha256"]] = f"file://{tmp_path}/gone"
    assert _node_warm(cache, req)["state"] == "failed"
    assert part.exists()
    proc = run_cli("node", "gc", "--cache", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"name": "big", "version": "1.0"} in doc["evicted"] and doc["freed_bytes"] >= biggest["size"] // 2
    assert not any((cache / "state" / "partial").iterdir())


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "weightship"]


# -- 6. empty files with peers ---------------------------------------------------------------


def test_empty_files_warm_with_peers(tmp_path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 7)
    (src / "empty.txt").write_bytes(b"")
    (src / "sub").mkdir()
    (src / "sub" / "also-empty").write_bytes(b"")
    publish(src, "e:1.0", store, key, tags=["prod"])
    agents = start_agents(
        [tmp_path / f"agent-{i}" for i in range(3)], node_toml(tmp_path / "node.toml", pub), store=store
    )
    try:
        work = tmp_path / "work"
        work.mkdir()
        regions = {"r": [a.node(f"a{i}") for i, a in enumerate(agents)]}
        (work / "weightship.toml").write_text(fleet_toml(regions, store, pub))
        proc = run_cli("warm", "e:prod", "--region", "r", "--json", cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == 3, doc
        for a in agents:
            got = tree(a.cache / "models" / "e" / "prod")
            assert got["empty.txt"] == b"" and got["sub/also-empty"] == b""
    finally:
        for a in agents:
            a.stop()


# -- 7. cached bytes stay honest over time ----------------------------------------------------


def test_status_verify_withdraws_a_corrupt_release_and_the_next_warm_refetches_only_that(tmp_path) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 8)
    publish(src, "v:1.0", store, tags=["prod"])
    nodes = [{"name": "n1", "transport": "local", "cache": "cache"}]
    (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": nodes}, store=store))
    assert run_cli("warm", "v:prod", "--region", "lab", cwd=tmp_path).returncode == 0
    cache = tmp_path / "cache"
    manifest = json.loads((cache / "state/releases/v/1.0/manifest.json").read_text())
    shard = max(manifest["files"], key=lambda f: f["size"])
    _flip_byte(cache / "blobs" / "sha256" / shard["sha256"])

    # Without --verify nothing re-reads the bytes; with it, the damage is found and withdrawn.
    assert run_cli("status", "v:prod", "--region", "lab", cwd=tmp_path).returncode == 0
    proc = run_cli("status", "v:prod", "--region", "lab", "--verify", "--json", cwd=tmp_path)
    assert proc.returncode == 1
    node = cli_json(proc)["nodes"][0]
    assert node["state"] == "failed" and "corrupt" in node["error"] and shard["path"] in node["error"], node
    served = cache / "models" / "v" / "prod" / shard["path"]
    assert not served.exists()  # the tag no longer leads to the corrupt bytes
    assert (cache / "state" / "quarantine" / shard["sha256"]).exists()

    proc = run_cli("warm", "v:prod", "--region", "lab", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    n = cli_json(proc)["nodes"][0]
    assert n["state"] == "ready" and n["bytes_fetched"] == shard["size"], n
    assert source_files(src) == {k: v for k, v in tree(cache / "models" / "v" / "prod").items() if k != "model.sig"}
    assert run_cli("status", "v:prod", "--region", "lab", "--verify", cwd=tmp_path).returncode == 0


def test_node_verify_stops_serving_a_corrupt_release(tmp_path) -> None:
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 9)
    publish(src, "w:1.0", store, tags=["prod"])
    cache = tmp_path / "cache"
    assert _node_warm(cache, _request_for(store, "w:prod", tags=["prod"]))["state"] == "ready"
    victim = cache / "models" / "w" / "prod" / "config.json"
    _flip_byte(victim.resolve())
    proc = run_cli("node", "verify", "--cache", cache, "w:prod")
    assert proc.returncode == 1 and "config.json" in error_line(proc)
    assert not victim.exists()
    status = json.loads(run_cli("node", "status", "--cache", cache, "w:prod", "--json").stdout)
    assert status["state"] == "failed" and "corrupt" in status["error"]
    result = _node_warm(cache, _request_for(store, "w:prod", tags=["prod"]))
    size = (src / "config.json").stat().st_size
    assert result["state"] == "ready" and result["bytes_fetched"] == size, result
    assert victim.read_bytes() == (src / "config.json").read_bytes()


# -- 8. an interrupted file:// publish resumes inside the blob --------------------------------


def test_file_publish_killed_mid_blob_resumes_inside_it_and_leaves_no_temp_files(tmp_path) -> None:
    src = tmp_path / "big-model"
    src.mkdir()
    size = 256 * 1024 * 1024
    with open(src / "weights.bin", "wb") as fh:
        for _ in range(size // (8 * 1024 * 1024)):
            fh.write(os.urandom(8 * 1024 * 1024))
    (src / "config.json").write_text("{}")
    root = tmp_path / "store"
    store = f"file://{root}"
    proc = spawn_cli("-q", "publish", src, "big:1.0", "--store", store)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in root.rglob(".partial-*") if p.stat().st_size > size // 4]
        if partial:
            break
        time.sleep(0.002)
    assert partial, "the upload was never seen in flight"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = run_cli("publish", src, "big:1.0", "--store", store, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bytes_uploaded"] <= size * 3 // 4 + 1024, doc  # resumed inside the blob
    assert _stray_files(root) == []
    out = tmp_path / "out"
    assert run_cli("pull", "big:1.0", out, "--store", store).returncode == 0
    assert (
        hashlib.sha256((out / "weights.bin").read_bytes()).digest()
        == hashlib.sha256((src / "weights.bin").read_bytes()).digest()
    )
