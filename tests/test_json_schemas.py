"""The ``--json`` documents against their published JSON Schemas (weightship/schemas, docs/json.md),
and the GitHub Actions step outputs and job summary (``--output-github`` / ``GITHUB_OUTPUT``).

Every document here comes from the real CLI on a ``file://`` store and a region of ``local``
nodes, so a field renamed or dropped in the code fails here, not in someone's pipeline.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.helpers import error_line, run_cli
from weightship import schemas
from weightship.cli import github
from weightship.demo import build_model

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def errors(doc: Any, schema_id: str) -> list[str]:
    validator = Draft202012Validator(schemas.load(schema_id))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def valid(proc, schema_id: str) -> dict[str, Any]:
    """The document a ``--json`` run printed, checked against the schema it must follow."""
    doc = json.loads(proc.stdout)
    if schema_id != "weightship.ls/v1":
        assert doc["schema"] == schema_id
    problems = errors(doc, schema_id)
    assert not problems, "\n".join(problems)
    return doc


def read_outputs(path: Path) -> dict[str, str]:
    """GITHUB_OUTPUT as the runner reads it: ``NAME=VALUE`` lines and ``NAME<<DELIM`` blocks;
    anything else in the file is a failure."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    out: dict[str, str] = {}
    lines = iter(text[:-1].split("\n"))
    for line in lines:
        eq, heredoc = line.find("="), line.find("<<")
        if eq >= 0 and (heredoc < 0 or eq < heredoc):
            name, value = line[:eq], line[eq + 1 :]
        else:
            assert heredoc > 0, f"not an output line: {line!r}"
            name, delim = line[:heredoc], line[heredoc + 2 :]
            body = []
            for nxt in lines:
                if nxt == delim:
                    break
                body.append(nxt)
            else:
                raise AssertionError(f"{name}<<{delim} is never closed")
            value = "\n".join(body)
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name), name
        out[name] = value
    return out


def read_tables(path: Path) -> list[list[list[str]]]:
    """The Markdown tables of a job summary, as rows of cells (header first, rule dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if current is None:
            current = []
            tables.append(current)
        if all(set(c) <= {"-", ":"} and c for c in cells):
            continue
        assert not current or len(cells) == len(current[0]), line
        current.append(cells)
    return tables


def github_env(tmp: Path) -> tuple[dict[str, str], Path, Path]:
    out, summary = tmp / "github-output", tmp / "step-summary"
    return {"GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary)}, out, summary


# -- the schemas themselves ---------------------------------------------------------------


def test_shipped_schemas_are_draft_2020_12_and_named_by_their_id():
    shipped = schemas.available()
    expected = {"manifest", "publish", "pull", "show", "ls", "verify", "tag", "warm", "warm-plan", "status", "gc"}
    expected |= {"fleet-ls", "node-status", "node-gc", "node-verify", "node-have", "node-pin", "node-warm"}
    expected |= {"node-error", "node-wait", "rm", "untag", "prune"}
    assert {s.split(".", 1)[1].split("/")[0] for s in shipped} >= expected
    for schema_id in shipped:
        doc = schemas.load(schema_id)
        Draft202012Validator.check_schema(doc)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        if schema_id != "weightship.ls/v1":
            # A document's own `schema` field is how a reader finds this file.
            assert doc["properties"]["schema"] == {"const": schema_id}
            assert "schema" in doc["required"]


# -- store commands -----------------------------------------------------------------------


def test_store_commands_follow_their_schemas(small_model: Path, keypair, file_store: str, tmp_path: Path):
    key, pub = keypair
    packed = valid(run_cli("pack", small_model, "--json"), "weightship.manifest/v1")
    assert packed["name"] is None and len(packed["files"]) == 5

    pub_run = run_cli(
        "publish", small_model, "demo:1.0", "--key", key, "-t", "prod", "-t", "canary", "--store", file_store, "--json"
    )
    assert pub_run.returncode == 0, pub_run.stderr
    published = valid(pub_run, "weightship.publish/v1")
    assert published["release"] == f"demo@{published['digest']}" and published["signed"] == "key"
    assert published["tags"] == ["prod", "canary"] and published["bytes_skipped"] == 0
    (small_model / "config.json").write_text("{}")
    again = valid(run_cli("publish", small_model, "demo:1.1", "--store", file_store, "--json"), "weightship.publish/v1")
    assert again["signed"] == "unsigned" and again["tags"] == [] and again["bytes_skipped"] > 0

    tagged = valid(run_cli("tag", "demo:1.1", "canary", "--store", file_store, "--json"), "weightship.tag/v1")
    # `previous` (where the tag pointed before) is an additive field of tag/v1.
    assert tagged.pop("previous", "1.0") == "1.0"
    assert tagged == {
        "schema": "weightship.tag/v1",
        "name": "demo",
        "tag": "canary",
        "version": "1.1",
        "digest": again["digest"],
    }
    listed = valid(run_cli("ls", "--store", file_store, "--json"), "weightship.ls/v1")
    assert listed == {"demo": {"versions": ["1.0", "1.1"], "tags": {"prod": "1.0", "canary": "1.1"}}}
    valid(run_cli("ls", "demo", "--store", file_store, "--json"), "weightship.ls/v1")

    claimed = valid(run_cli("show", "demo:prod", "--store", file_store, "--json"), "weightship.show/v1")
    assert claimed["signer"]["verified"] is False and "key" in claimed["signer"]["claimed"]
    assert claimed["digest"] == published["digest"] and claimed["tags"] == ["prod"]
    verified = valid(run_cli("show", "demo:prod", "--key", pub, "--store", file_store, "--json"), "weightship.show/v1")
    assert verified["signer"]["verified"] is True and verified["signer"]["method"] == "key"
    unsigned = valid(run_cli("show", "demo:1.1", "--store", file_store, "--json"), "weightship.show/v1")
    assert unsigned["signer"] == {"verified": False} and unsigned["signature"] == "unsigned"

    dest = tmp_path / "pulled"
    pulled = valid(
        run_cli("pull", "demo:prod", dest, "--key", pub, "--store", file_store, "--json"), "weightship.pull/v1"
    )
    assert pulled["digest"] == published["digest"] and pulled["signer"]["method"] == "key"
    plain = valid(
        run_cli("pull", "demo:1.1", tmp_path / "plain", "--store", file_store, "--json"), "weightship.pull/v1"
    )
    assert plain["signer"] == {}

    checked = valid(run_cli("verify", dest, "--key", pub, "--json"), "weightship.verify/v1")
    assert checked["verified"] is True and checked["files"] == 5


def test_schemas_reject_broken_documents(small_model: Path, file_store: str):
    doc = json.loads(run_cli("publish", small_model, "demo:1", "--store", file_store, "--json").stdout)
    assert not errors(doc, "weightship.publish/v1")

    # A field added later is fine within v1: readers ignore what they do not know.
    assert not errors({**doc, "something_new": 1}, "weightship.publish/v1")
    missing = {k: v for k, v in doc.items() if k != "digest"}
    assert any("'digest' is a required property" in e for e in errors(missing, "weightship.publish/v1"))
    assert errors({**doc, "digest": "sha256:abc"}, "weightship.publish/v1")
    assert errors({**doc, "bytes_uploaded": "12"}, "weightship.publish/v1")
    assert errors({**doc, "schema": "weightship.publish/v2"}, "weightship.publish/v1")
    assert errors({**doc, "signed": "maybe"}, "weightship.publish/v1")
    assert errors({"demo": {"versions": ["1"]}}, "weightship.ls/v1")  # tags missing


def test_gguf_entries_and_publish_warnings_follow_their_schemas(file_store: str, tmp_path: Path):
    """A GGUF file's header summary (files[].gguf) in pack, publish and show, and a
    publish's pickle warnings, each held to the schema that documents it."""
    import pickle

    from tests.test_gguf import F32, Q4_K, gguf_bytes

    model = tmp_path / "model"
    model.mkdir()
    (model / "q4.gguf").write_bytes(gguf_bytes(tensors=[("w", [256, 4], Q4_K, 576), ("n", [256], F32, 1024)]))
    (model / "extra.pt").write_bytes(pickle.dumps({"step": 1}, protocol=4))

    packed = valid(run_cli("pack", model, "--json"), "weightship.manifest/v1")
    entry = next(f for f in packed["files"] if f["path"] == "q4.gguf")
    assert entry["gguf"]["types"] == {"F32": 1, "Q4_K": 1} and entry["gguf"]["architecture"] == "llama"
    broken = copy.deepcopy(packed)
    next(f for f in broken["files"] if f["path"] == "q4.gguf")["gguf"]["types"] = {"F32": "one"}
    assert errors(broken, "weightship.manifest/v1")
    del next(f for f in broken["files"] if f["path"] == "q4.gguf")["gguf"]["version"]
    assert any("'version' is a required property" in e for e in errors(broken, "weightship.manifest/v1"))

    proc = run_cli("publish", model, "q4:1", "--store", file_store, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    published = valid(proc, "weightship.publish/v1")
    (warning,) = published["warnings"]
    assert warning.startswith("extra.pt is a pickle")
    assert errors({**published, "warnings": "extra.pt"}, "weightship.publish/v1")

    shown = valid(run_cli("show", "q4:1", "--store", file_store, "--json", cwd=tmp_path), "weightship.show/v1")
    assert next(f for f in shown["files"] if f["path"] == "q4.gguf")["gguf"] == entry["gguf"]


# -- the fleet: warm and status -----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet_ws(tmp_path_factory) -> Path:
    """A signed demo:prod in a file:// store; region `local` of three local nodes and region
    `far` whose one node is an agent nobody listens for."""
    from weightship.trust import signers as signing

    ws = tmp_path_factory.mktemp("fleet")
    signing.generate_key(ws / "release.pem")
    nodes = "".join(
        f'[[regions.local.nodes]]\nname = "gpu-{i}"\ntransport = "local"\ncache = "nodes/gpu-{i}"\n\n'
        for i in (1, 2, 3)
    )
    (ws / "weightship.toml").write_text(
        '[store]\nurl = "file://store"\n\n[policy]\nkeys = ["release.pub"]\n\n'
        + nodes
        + f'[[regions.far.nodes]]\nname = "far-1"\ntransport = "agent://127.0.0.1:{_closed_port()}"\n'
        + f'token = "{"t" * 32}"\n'
    )
    model = build_model(ws / "model")
    proc = run_cli("publish", model, "demo:1.0", "--tag", "prod", "--key", ws / "release.pem", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    return ws


def test_warm_json_follows_its_schema_and_writes_github_outputs(fleet_ws: Path, tmp_path: Path):
    env, out, summary = github_env(tmp_path)
    proc = run_cli("warm", "demo:prod", "--region", "local", "--json", cwd=fleet_ws, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = valid(proc, "weightship.warm/v1")
    assert doc["ok"] is True and doc["ready"] == doc["total"] == 3 and doc["tags"] == ["prod"]
    assert {n["state"] for n in doc["nodes"]} == {"ready"} and all(n["verified"] for n in doc["nodes"])

    outputs = read_outputs(out)
    assert outputs["ok"] == "true" and outputs["ready"] == "3" and outputs["total"] == "3"
    assert outputs["release"] == f"demo@{doc['digest']}" and outputs["version"] == "1.0"
    assert outputs["region"] == "local" and outputs["tags"] == "prod"
    assert json.loads(outputs["by_region"]) == {"local": {"ready": 3, "total": 3}}
    assert json.loads(outputs["not_ready"]) == []
    (table,) = read_tables(summary)
    assert table[0][:3] == ["node", "region", "state"]
    assert [row[:3] for row in table[1:]] == [[f"gpu-{i}", "local", "ready"] for i in (1, 2, 3)]
    assert "✅" in summary.read_text()


def test_failed_warm_still_prints_a_valid_document_and_outputs(fleet_ws: Path, tmp_path: Path):
    env, out, summary = github_env(tmp_path)
    proc = run_cli("warm", "demo:prod", "--region", "far", "--retries", "0", "--json", cwd=fleet_ws, env=env)
    assert proc.returncode == 1, proc.stderr
    doc = valid(proc, "weightship.warm/v1")
    assert doc["ok"] is False and doc["ready"] == 0 and doc["nodes"][0]["state"] == "unreachable"
    outputs = read_outputs(out)
    assert outputs["ok"] == "false" and json.loads(outputs["not_ready"]) == ["far-1"]
    (table,) = read_tables(summary)
    assert table[1][2] == "unreachable" and table[1][-1]  # the error is in the table
    assert "❌" in summary.read_text()


def test_status_json_follows_its_schema_and_writes_github_outputs(fleet_ws: Path, tmp_path: Path):
    warmed = run_cli("warm", "demo:prod", "--region", "local", cwd=fleet_ws)
    assert warmed.returncode == 0, warmed.stderr
    env, out, summary = github_env(tmp_path)

    proc = run_cli("status", "demo:prod", "--require", "75%", "--json", cwd=fleet_ws, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = valid(proc, "weightship.status/v1")
    assert doc["ref"] == "demo:prod" and sorted(doc["regions"]) == ["far", "local"]
    assert (doc["ready"], doc["total"], doc["required"], doc["ok"]) == (3, 4, 3, True)
    states = {n["node"]: n["state"] for n in doc["nodes"]}
    assert states == {"gpu-1": "ready", "gpu-2": "ready", "gpu-3": "ready", "far-1": "unreachable"}

    outputs = read_outputs(out)
    assert (outputs["ok"], outputs["ready"], outputs["total"], outputs["required"]) == ("true", "3", "4", "3")
    assert outputs["digest"] == doc["digest"] and outputs["release"] == f"demo@{doc['digest']}"
    assert json.loads(outputs["by_region"]) == {"far": {"ready": 0, "total": 1}, "local": {"ready": 3, "total": 3}}
    # Two regions: the per-region summary spans two lines, so it went in a NAME<<DELIM block.
    assert outputs["summary"] == "far: 0/1 ready\nlocal: 3/3 ready"
    assert re.search(r"^summary<<ghadelimiter_[0-9a-f-]{36}$", out.read_text(), re.M)
    (table,) = read_tables(summary)
    assert {row[0]: row[2] for row in table[1:]} == states

    # Without REF: every node and what its cache holds; `ready` counts reachable nodes.
    fleet = run_cli("status", "--require", "all", "--json", cwd=fleet_ws, env=env)
    assert fleet.returncode == 1, fleet.stderr
    doc = valid(fleet, "weightship.status/v1")
    assert doc["ref"] is None and (doc["ready"], doc["ok"]) == (3, False)
    local = next(n for n in doc["nodes"] if n["node"] == "gpu-1")
    assert local["releases"][0]["name"] == "demo"
    # Outputs of the second command follow the first's: the runner keeps the last value.
    outputs = read_outputs(out)
    assert outputs["ok"] == "false" and outputs["summary"] == "far: 0/1 reachable\nlocal: 3/3 reachable"
    assert len(read_tables(summary)) == 2


def test_status_schema_rejects_broken_documents(fleet_ws: Path):
    proc = run_cli("status", "demo:prod", "--region", "local", "--json", cwd=fleet_ws)
    doc = json.loads(proc.stdout)
    assert not errors(doc, "weightship.status/v1")
    broken = copy.deepcopy(doc)
    del broken["nodes"][0]["state"]
    assert any("'state' is a required property" in e for e in errors(broken, "weightship.status/v1"))
    # With a REF the version and digest it resolved to are required.
    assert errors({k: v for k, v in doc.items() if k != "digest"}, "weightship.status/v1")
    assert errors({**doc, "ok": "yes"}, "weightship.status/v1")

    warm = json.loads(run_cli("warm", "demo:prod", "--region", "local", "--json", cwd=fleet_ws).stdout)
    assert not errors(warm, "weightship.warm/v1")
    # Neither `ready` (--wait) nor `accepted` (--detach): no count to decide on.
    assert errors({k: v for k, v in warm.items() if k != "ready"}, "weightship.warm/v1")


def test_gc_and_fleet_ls_follow_their_schemas(fleet_ws: Path):
    proc = run_cli("gc", "--region", "local", "--dry-run", "--json", cwd=fleet_ws)
    assert proc.returncode == 0, proc.stderr
    doc = valid(proc, "weightship.gc/v1")
    assert doc["ok"] is True and doc["dry_run"] is True and doc["region"] == "local"
    assert [n["node"] for n in doc["nodes"]] == ["gpu-1", "gpu-2", "gpu-3"]
    assert all(n["state"] == "ok" and n["evicted"] == [] for n in doc["nodes"])

    # A node that does not answer: still the document, ok false, exit 1.
    far = run_cli("gc", "--region", "far", "--json", cwd=fleet_ws)
    assert far.returncode == 1, far.stderr
    doc = valid(far, "weightship.gc/v1")
    assert doc["ok"] is False and doc["nodes"][0]["state"] == "unreachable" and doc["nodes"][0]["error"]
    broken = copy.deepcopy(doc)
    broken["nodes"][0]["state"] = "ok"  # an answering node says what it evicted
    assert any("'evicted' is a required property" in e for e in errors(broken, "weightship.gc/v1"))

    listed = valid(run_cli("fleet", "ls", "--json", cwd=fleet_ws), "weightship.fleet-ls/v1")
    assert sorted(listed["regions"]) == ["far", "local"] and listed["source"] == str(fleet_ws / "weightship.toml")
    assert [n["name"] for n in listed["regions"]["local"]["nodes"]] == ["gpu-1", "gpu-2", "gpu-3"]
    assert "token" not in json.dumps(listed["regions"]["far"])  # secrets stay out of the document
    assert errors({**listed, "regions": {"x": {"nodes": []}}}, "weightship.fleet-ls/v1")


def _lines(proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_node_documents_follow_their_schemas(fleet_ws: Path, tmp_path: Path):
    """``node … --json``, what an ssh node prints: each line names its schema."""
    from weightship import release
    from weightship.node.protocol import WarmRequest
    from weightship.store import open_store

    store = f"file://{fleet_ws / 'store'}"
    st = open_store(store)
    try:
        rel = release.resolve(st, "demo:prod")
    finally:
        st.close()
    request = WarmRequest(rel.manifest_bytes, rel.signature, {"store": store}, tags=["prod"]).to_json().decode()
    cache = tmp_path / "cache"

    warm = run_cli("node", "warm", "--cache", cache, "--json", input=request, cwd=fleet_ws)
    assert warm.returncode == 0, warm.stderr
    events = _lines(warm)
    assert len(events) >= 2 and events[-1]["event"] == "result" and events[-1]["state"] == "ready"
    for ev in events:
        assert ev["schema"] == "weightship.node-warm/v1" and not errors(ev, "weightship.node-warm/v1"), ev
    assert errors({k: v for k, v in events[-1].items() if k != "digest"}, "weightship.node-warm/v1")

    def one(*args: str | Path, input: str | None = None, code: int = 0) -> dict[str, Any]:
        proc = run_cli("node", *args, "--json", input=input, cwd=fleet_ws)
        assert proc.returncode == code, proc.stderr
        (doc,) = _lines(proc)
        problems = errors(doc, doc["schema"])
        assert not problems, "\n".join(problems)
        return doc

    status = one("status", "--cache", cache, "demo:prod", "--version", rel.version, "--digest", rel.digest)
    assert status["schema"] == "weightship.node-status/v1" and status["state"] == "ready"
    every = one("status", "--cache", cache)
    assert every["schema"] == "weightship.node-status/v1" and every["releases"][0]["tags"] == ["prod"]
    assert errors({k: v for k, v in status.items() if k != "tag_version"}, "weightship.node-status/v1")
    verified = one("verify", "--cache", cache, "demo:prod")
    assert verified["schema"] == "weightship.node-verify/v1" and verified["verified"] is True
    pinned = one("pin", "--cache", cache, "demo:prod")
    assert pinned["schema"] == "weightship.node-pin/v1" and pinned["pinned"] is True
    gc = one("gc", "--cache", cache, "--dry-run")
    assert gc["schema"] == "weightship.node-gc/v1" and gc["kept"] == [f"demo:{rel.version}"]
    blob = json.loads(rel.manifest_bytes)["files"][0]["sha256"]
    have = one("have", "--cache", cache, input=json.dumps({"blobs": [blob, "0" * 64]}))
    assert have["schema"] == "weightship.node-have/v1" and list(have["blobs"]) == [blob]

    # A failure is one line too, with its own schema: a bad request (2), a missing release (1).
    bad = one("warm", "--cache", cache, input="{}", code=2)
    assert bad["schema"] == "weightship.node-error/v1" and "malformed warm request" in bad["error"]
    missing = one("verify", "--cache", cache, "demo:9.9", code=1)
    assert missing["schema"] == "weightship.node-error/v1" and missing["retryable"] is False


# -- GitHub outputs -----------------------------------------------------------------------


def test_publish_writes_github_outputs_and_prints_as_before(small_model: Path, file_store: str, tmp_path: Path):
    env, out, summary = github_env(tmp_path)
    out.write_text("earlier=kept\n")
    proc = run_cli("publish", small_model, "demo:1.0", "-t", "prod", "-t", "canary", "--store", file_store, env=env)
    assert proc.returncode == 0, proc.stderr
    # The text output is unchanged: the digest is still the last line, and nothing else joined it.
    lines = proc.stdout.splitlines()
    assert DIGEST.fullmatch(lines[-1]) and lines[-2].startswith("published demo:1.0 (tags: prod, canary)")
    outputs = read_outputs(out)
    assert outputs["earlier"] == "kept"
    assert outputs["digest"] == lines[-1] and outputs["release"] == f"demo@{lines[-1]}"
    assert (outputs["name"], outputs["version"], outputs["tags"], outputs["signed"]) == (
        "demo",
        "1.0",
        "prod canary",
        "unsigned",
    )
    assert int(outputs["bytes_uploaded"]) == int(outputs["total_bytes"]) > 0
    (table,) = read_tables(summary)
    assert table[0][0] == "release" and table[1][0] == f"demo@{lines[-1]}" and table[1][1] == "prod, canary"

    # --no-output-github: a step with several publishes can keep the outputs of one.
    before = out.read_text()
    quiet = run_cli("publish", small_model, "demo:1.1", "--store", file_store, "--no-output-github", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert out.read_text() == before


def test_output_github_without_github_output_is_a_usage_error(small_model: Path, file_store: str, tmp_path: Path):
    proc = run_cli("publish", small_model, "demo:1.0", "--store", file_store, "--output-github")
    assert proc.returncode == 2
    assert error_line(proc) == "error: --output-github: GITHUB_OUTPUT is not set; run it in a GitHub Actions step"
    # Refused before anything was uploaded.
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))
    for command in (["warm", "demo:1", "--region", "x"], ["status"]):
        proc = run_cli(*command, "--output-github", cwd=tmp_path)
        assert proc.returncode == 2 and "GITHUB_OUTPUT is not set" in error_line(proc)


def test_multiline_and_hostile_values_cannot_forge_outputs(tmp_path: Path, monkeypatch):
    out = tmp_path / "github-output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    github.write({"summary": "a\nEOF\nok=true", "ok": False, "tags": ["a", "b"], "none": None}, "ignored")
    assert read_outputs(out) == {"summary": "a\nEOF\nok=true", "ok": "false", "tags": "a b", "none": ""}
