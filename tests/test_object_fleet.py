"""A region of real agents warmed from an object store (s3:// on SeaweedFS, az:// on
Azurite) with presigned URLs, the default: the agents hold no credentials of any kind,
and the caller's never travel; every byte still checked against the signed sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, fleet_toml, model, node_toml, publish, source_files, start_agents, tree
from tests.helpers import run_cli

CREDENTIAL_VARS = ("AWS_", "AZURE_", "AZURITE_")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.parametrize("kind", ["s3", "az"])
def test_agents_without_credentials_warm_from_an_object_store(kind, request, tmp_path, keypair, monkeypatch) -> None:
    url = request.getfixturevalue(f"{kind}_store_url")  # sets this process's AWS_* / AZURE_* for the store
    key, pub = keypair
    src = model(tmp_path, 21, hidden=512)
    (src / "empty.txt").write_bytes(b"")
    publish(src, "m:1.0", url, key, tags=["prod"])
    src2 = model(tmp_path, 22, hidden=512)
    publish(src2, "m:2.0", url, key)

    # The agents start with no credentials in their environment at all.
    saved = {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_VARS)}
    for k in saved:
        monkeypatch.delenv(k)
    try:
        agents = start_agents([tmp_path / f"agent-{i}" for i in range(2)], node_toml(tmp_path / "node.toml", pub))
    finally:
        for k, v in saved.items():
            monkeypatch.setenv(k, v)
    try:
        for a in agents:
            leaked = [k for k in _environ_of(a.proc.pid) if k.startswith(CREDENTIAL_VARS)]
            assert leaked == [], leaked
        work = tmp_path / "work"
        work.mkdir()
        regions = {"r": [a.node(f"a{i}") for i, a in enumerate(agents)]}
        # The store as a flag: see test_az_store_urls_in_config_files for weightship.toml.
        (work / "weightship.toml").write_text(fleet_toml(regions, None, pub))

        # Peers on (the default): each blob comes from the store once, through a URL.
        proc = run_cli("warm", "m:prod", "--region", "r", "--json", "--store", url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == 2, doc
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        assert sum(n["bytes_from_origin"] for n in doc["nodes"]) == total, doc
        for a in agents:
            got = {k: v for k, v in tree(a.cache / "models" / "m" / "prod").items() if k != "model.sig"}
            assert got == source_files(src)

        # No peers: every agent fetches every blob from the store's URLs itself.
        proc = run_cli("warm", "m:2.0", "--region", "r", "--no-peers", "--json", "--store", url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == 2, doc
        # What m:1.0 did not already bring (the models share their tokenizer files).
        new = {sha(p) for p in src2.rglob("*") if p.is_file()} - {sha(p) for p in src.rglob("*") if p.is_file()}
        missing = sum(p.stat().st_size for p in src2.rglob("*") if p.is_file() and sha(p) in new)
        assert missing > 0
        for n in doc["nodes"]:
            assert n["bytes_from_origin"] == n["bytes_fetched"] == missing, n
        for a in agents:
            got = {k: v for k, v in tree(a.cache / "models" / "m" / "2.0").items() if k != "model.sig"}
            assert got == source_files(src2)
        status = run_cli("status", "m:prod", "--region", "r", "--require", "all", "--json", "--store", url, cwd=work)
        assert status.returncode == 0 and cli_json(status)["ready"] == 2
    finally:
        for a in agents:
            a.stop()


def test_az_store_url_in_weightship_toml(az_store_url, tmp_path) -> None:
    (tmp_path / "weightship.toml").write_text(f'[store]\nurl = "{az_store_url}"\n')
    proc = run_cli("ls", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_az_store_url_as_a_regions_store(az_store_url, tmp_path) -> None:
    nodes = {"r": [{"name": "n1", "transport": "local", "cache": "cache"}]}
    toml = fleet_toml(nodes).replace("[regions.r]\n", f'[regions.r]\nstore = "{az_store_url}"\n')
    (tmp_path / "weightship.toml").write_text(toml)
    proc = run_cli("fleet", "ls", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
