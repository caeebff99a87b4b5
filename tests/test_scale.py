"""Scale: one region of 50 real ``weightship agent serve`` processes on this machine.
``status`` answers in under 2 s (the whole command, interpreter start-up included) and a
peer-assisted ``warm`` ends ready on every node, with each blob leaving the store once.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, fleet_toml, model, node_toml, publish, start_agents
from tests.helpers import run_cli

NODES = 50
STATUS_LIMIT = 2.0


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    from weightship.trust.signers import generate_key

    root = tmp_path_factory.mktemp("scale")
    key = root / "release.pem"
    pub = generate_key(key)
    store = f"file://{root / 'store'}"
    agents = start_agents(
        [root / f"agent-{i}" for i in range(NODES)], node_toml(root / "node.toml", pub), {}, batch=25, store=store
    )
    try:
        work = root / "work"
        work.mkdir()
        nodes = [a.node(f"agent-{i:02d}") for i, a in enumerate(agents)]
        (work / "weightship.toml").write_text(fleet_toml({"big": nodes}, store, pub))
        yield work, store, key
    finally:
        for a in agents:
            a.proc.terminate()
        for a in agents:
            a.stop()


def _timed(work: Path, *args: str) -> tuple[float, dict]:
    started = time.monotonic()
    proc = run_cli(*args, cwd=work)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return took, cli_json(proc)


def test_status_and_warm_over_fifty_agents(region) -> None:
    work, store, key = region
    times = []
    for _ in range(3):
        took, doc = _timed(work, "status", "--region", "big", "--json")
        assert doc["ready"] == doc["total"] == NODES
        times.append(took)
    assert statistics.median(times) < STATUS_LIMIT, times

    src = model(work.parent, 1, hidden=128)
    release = publish(src, "small:1.0", store, key, tags=["prod"])
    took, doc = _timed(work, "warm", "small:prod", "--region", "big", "--json")
    assert doc["ready"] == NODES, [n["error"] for n in doc["nodes"] if n["error"]]
    total = doc["nodes"][0]["bytes_total"]
    assert sum(n["bytes_from_origin"] for n in doc["nodes"]) == total
    assert not any(n["bad_peers"] for n in doc["nodes"])

    times = []
    for _ in range(3):
        took, doc = _timed(work, "status", "small:prod", "--region", "big", "--json")
        assert doc["ready"] == NODES and doc["digest"] == release.digest
        times.append(took)
    assert statistics.median(times) < STATUS_LIMIT, times
