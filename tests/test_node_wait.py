"""``weightship node wait``: an init container's command. Real caches warmed by real agents
(`weightship warm` with a fleet file), a real S3 store (SeaweedFS) for an agent that
warms by itself: the wait ends the moment a release is whole and verified, never before,
and says why when it fails or times out."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from tests.fleetkit import (
    cli_json,
    corrupt_largest_blob,
    fleet_toml,
    make_tls,
    model,
    node_toml,
    publish,
    record,
    source_files,
    spawn_cli,
    start_agent,
)
from tests.helpers import error_line, run_cli
from weightship import schemas

SCHEMA = "weightship.node-wait/v1"


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    problems = [e.message for e in Draft202012Validator(schemas.load(SCHEMA)).iter_errors(doc)]
    assert problems == [], (problems, doc)
    assert doc["schema"] == SCHEMA
    return doc


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below root (the release's signature aside)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "model.sig":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expected(src: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in source_files(src).items()}


def _region(tmp_path: Path, agent, store: str, pub: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "weightship.toml").write_text(fleet_toml({"r": [agent.node("a0")]}, store, pub))
    return work


def test_a_wait_times_out_and_refuses_what_cannot_work(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    started = time.monotonic()
    proc = run_cli("node", "wait", "m:prod", "--cache", cache, "--timeout", "1", "--json")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    doc = valid(cli_json(proc))
    assert doc["ok"] is False and doc["timed_out"] is True and doc["state"] == "absent"
    assert doc["version"] is None and doc["path"] is None and "after 1s" in doc["error"]
    assert doc["watch"] == "inotify"
    assert 1.0 <= took < 10, took
    # Without --json: one line saying what is missing and what to do, nothing on stdout.
    proc = run_cli("node", "wait", "m:prod", "--cache", cache, "--timeout", "0")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "m:prod is not ready" in error_line(proc) and "warm it" in error_line(proc)

    usage = [
        ("no-colon",),
        ("m:prod", "--timeout", "soon"),
        ("m:prod", "--agent", "http://127.0.0.1:7070"),  # no --token-file
        ("m:prod", "--token-file", str(tmp_path / "t")),  # no --agent
        ("m:prod", "--agent", "ftp://x:1", "--token-file", str(tmp_path / "t")),
        ("m:prod", "--agent", "https://127.0.0.1:7070", "--token-file", str(tmp_path / "t")),  # no --tls-ca
        ("m:prod", "--agent", "http://127.0.0.1:7070", "--token-file", str(tmp_path / "missing")),
    ]
    for args in usage:
        # (The case's own options last: a later --timeout wins.)
        proc = run_cli("node", "wait", "--cache", cache, "--timeout", "0", "--json", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stdout == "", args
        error_line(proc)


def test_the_wait_ends_the_moment_the_release_is_ready_and_never_before(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    # About 4 MiB, warmed at 1 MiB/s: the wait watches a warm that takes seconds.
    src = model(tmp_path, 61, hidden=512)
    published = publish(src, "m:1.0", store, key, tags=["prod"])
    agent = start_agent(tmp_path / "agent", node_toml(tmp_path / "node.toml", pub), {}, store=store)
    try:
        work = _region(tmp_path, agent, store, pub)
        # By tag (ready once the tag is switched) and by version (seen fetching first).
        refs = ("m:prod", "m:1.0")
        waiters = {r: spawn_cli("node", "wait", r, "--cache", agent.cache, "--timeout", "120", "--json") for r in refs}
        # The waits are watching an empty cache before the warm begins.
        time.sleep(1.5)
        assert all(w.poll() is None for w in waiters.values()), [w.communicate() for w in waiters.values()]
        warm = spawn_cli(
            "warm", "m:prod", "--region", "r", "--credentials", "node", "--max-rate", "1M", "--json", cwd=work
        )
        seen: dict[str, set[str]] = {r: set() for r in refs}
        ended: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while len(ended) < len(refs):
            assert time.monotonic() < deadline, "a wait did not end"
            rec = record(agent.cache, "m", "1.0")
            for r, w in waiters.items():
                if r in ended:
                    continue
                if w.poll() is not None:
                    ended[r] = time.time()
                    # At the moment a wait returns, the release is whole: every file, every byte.
                    assert hashes(agent.cache / "models" / "m" / "1.0") == expected(src)
                elif rec is not None:
                    # What the wait had not reported yet: it must not have been ready then.
                    seen[r].add(rec["state"])
            time.sleep(0.01)
        rec = record(agent.cache, "m", "1.0")
        assert rec is not None and rec["state"] == "ready"
        for r, w in waiters.items():
            out, err = w.communicate()
            assert w.returncode == 0, err
            doc = valid(json.loads(out))
            path = Path(doc["path"])
            assert doc["ok"] and doc["state"] == "ready" and not doc["timed_out"] and doc["error"] is None
            assert path == agent.cache / "models" / "m" / "1.0"
            assert hashes(path) == expected(src)
            assert doc["version"] == "1.0" and doc["digest"] == published.digest
            assert doc["bytes_present"] == doc["bytes_total"] == rec["bytes_total"]
            # It ended within a second of the record turning ready (not at a slow poll) ...
            assert 0 <= ended[r] - rec["updated"] < 1.0, (r, ended[r] - rec["updated"])
        # ... and the wait by version watched the warm go by, so it did not end before.
        assert "fetching" in seen["m:1.0"], seen
        warm_out, warm_err = warm.communicate(timeout=120)
        assert warm.returncode == 0, warm_out + warm_err

        # Ready already: by version, by digest, by tag; plain output is the path alone.
        for ref in ("m:1.0", f"m@{published.digest}", "m:prod"):
            proc = run_cli("node", "wait", ref, "--cache", agent.cache, "--timeout", "5")
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == f"{path}\n"
        # A digest of no release here: waits for it, then times out.
        other = "m@sha256:" + "0" * 64
        proc = run_cli("node", "wait", other, "--cache", agent.cache, "--timeout", "0.5", "--json")
        assert proc.returncode == 1 and valid(cli_json(proc))["state"] == "absent"
    finally:
        agent.stop()


def test_a_failed_warm_ends_the_wait_with_its_reason(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store_root = tmp_path / "store"
    store = f"file://{store_root}"
    src = model(tmp_path, 62)
    publish(src, "m:1.0", store, key, tags=["prod"])
    bad_file = corrupt_largest_blob(store_root, src)
    agent = start_agent(tmp_path / "agent", node_toml(tmp_path / "node.toml", pub), {}, store=store)
    try:
        work = _region(tmp_path, agent, store, pub)
        waiter = spawn_cli("node", "wait", "m:1.0", "--cache", agent.cache, "--timeout", "120", "--json")
        time.sleep(1.0)
        assert waiter.poll() is None
        warm = run_cli("warm", "m:1.0", "--region", "r", "--credentials", "node", "--json", cwd=work)
        assert warm.returncode == 1, warm.stdout + warm.stderr
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 1, err
        doc = valid(json.loads(out))
        assert doc["state"] == "failed" and not doc["ok"] and not doc["timed_out"]
        assert bad_file in doc["error"] and "sha256 mismatch" in doc["error"], doc["error"]
        assert not (agent.cache / "models" / "m" / "1.0").exists()
        # Later waits say the same at once, as one error line.
        proc = run_cli("node", "wait", "m:1.0", "--cache", agent.cache, "--timeout", "60")
        assert proc.returncode == 1 and proc.stdout == ""
        assert "m:1.0 failed in" in error_line(proc) and "sha256 mismatch" in error_line(proc)

        # With --agent, the recorded failure is what the agent is asked to repair: once the
        # store is mended, the wait has it warmed again and ends ready.
        good = src / bad_file
        (store_root / "blobs" / "sha256" / hashlib.sha256(good.read_bytes()).hexdigest()).write_bytes(good.read_bytes())
        proc = run_cli(
            "node", "wait", "m:1.0", "--cache", agent.cache, "--agent", agent.url,
            "--token-file", agent.dir / "token", "--timeout", "120", "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = valid(cli_json(proc))
        assert doc["ok"] and doc["job"], doc
        assert hashes(Path(doc["path"])) == expected(src)
    finally:
        agent.stop()


def test_the_wait_asks_the_agent_to_warm_what_the_cache_lacks(tmp_path: Path, keypair, s3_store_url: str) -> None:
    key, pub = keypair
    src = model(tmp_path, 63)
    published = publish(src, "m:1.0", s3_store_url, key, tags=["prod"])
    policy = node_toml(tmp_path / "node.toml", pub)
    # The agent reads the store with its own credentials (the AWS_* chain of its environment).
    agent = start_agent(tmp_path / "agent", policy, {}, store=s3_store_url)
    tls = make_tls(tmp_path / "tls")
    # A node whose agent was started without --store: it cannot warm anything by itself.
    storeless = start_agent(tmp_path / "storeless", policy, {}, tls=tls)
    try:
        token = str(agent.dir / "token")
        proc = run_cli(
            "node", "wait", "m:prod", "--cache", agent.cache, "--agent", agent.url, "--token-file", token,
            "--timeout", "120", "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = valid(cli_json(proc))
        assert doc["ok"] and doc["job"] and doc["digest"] == published.digest
        path = Path(doc["path"])
        assert path == agent.cache / "models" / "m" / "1.0"
        assert hashes(path) == expected(src)
        # The tag moved as `weightship warm m:prod` would move it.
        assert os.readlink(agent.cache / "models" / "m" / "prod") == "1.0"
        rec = record(agent.cache, "m", "1.0")
        assert rec is not None and rec["verified"] is True

        # Ready now: the agent is not asked again.
        proc = run_cli(
            "node", "wait", "m:1.0", "--cache", agent.cache, "--agent", agent.url, "--token-file", token,
            "--timeout", "5", "--json",
        )  # fmt: skip
        assert proc.returncode == 0 and cli_json(proc)["job"] is None

        # An agent without a store refuses (over TLS, checked against --tls-ca): exit 1 naming --store.
        proc = run_cli(
            "node", "wait", "m:prod", "--cache", storeless.cache, "--agent", storeless.url,
            "--token-file", storeless.dir / "token", "--tls-ca", tls.ca, "--timeout", "30",
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "--store" in error_line(proc)
        # A wrong token: exit 1 saying so.
        (tmp_path / "wrong").write_text("not-the-token-at-all\n")
        proc = run_cli(
            "node", "wait", "m:prod", "--cache", storeless.cache, "--agent", storeless.url,
            "--token-file", tmp_path / "wrong", "--tls-ca", tls.ca, "--timeout", "30",
        )  # fmt: skip
        assert proc.returncode == 1 and "refused the token" in error_line(proc)
        # A release the store does not have.
        proc = run_cli(
            "node", "wait", "m:nope", "--cache", agent.cache, "--agent", agent.url, "--token-file", token,
            "--timeout", "30",
        )  # fmt: skip
        assert proc.returncode == 1 and "not found" in error_line(proc)
    finally:
        agent.stop()
        storeless.stop()


def test_an_unreachable_agent_is_asked_again_until_the_timeout(tmp_path: Path) -> None:
    from tests.servers import free_port

    (tmp_path / "token").write_text("a-token-of-some-length\n")
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_cli(
        "node", "wait", "m:prod", "--cache", tmp_path / "cache", "--agent", url, "--token-file",
        tmp_path / "token", "--timeout", "2", "--json",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    doc = valid(cli_json(proc))
    assert doc["timed_out"] and "could not be reached" in doc["error"], doc
