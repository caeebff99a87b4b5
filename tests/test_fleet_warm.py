"""Orchestration: retries, timeouts, shares, detached warms and status --watch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.fleetkit import cli_json, fleet_toml, model, publish
from tests.helpers import run_cli
from weightship.errors import UsageError
from weightship.fleet.inventory import Node
from weightship.fleet.orchestrate import parse_duration, parse_share, warm_nodes
from weightship.fleet.transports.base import NodeFailed, NodeUnreachable, Transport
from weightship.node.protocol import WarmRequest


class Scripted(Transport):
    """A transport that plays back outcomes, one per attempt."""

    def __init__(self, node: Node, outcomes: list[Any], delay: float = 0.0) -> None:
        self.node = node
        self.outcomes = outcomes
        self.delay = delay
        self.calls = 0

    async def warm(self, req: WarmRequest, on_event, *, detach: bool = False) -> dict[str, Any]:
        self.calls += 1
        on_event({"event": "progress", "state": "fetching", "bytes_done": 1, "bytes_total": 2})
        await asyncio.sleep(self.delay)
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    async def status(self, ref=None, version=None, digest=None) -> dict[str, Any]:
        raise NotImplementedError

    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]:
        raise NotImplementedError


def _node(name: str) -> Node:
    return Node(name=name, region="r", kind="local", transport="local", cache="/nonexistent")


READY = {"event": "result", "state": "ready", "bytes_total": 2, "bytes_fetched": 2}


def test_transient_failures_are_retried_and_permanent_ones_are_not(monkeypatch) -> None:
    monkeypatch.setattr("weightship.fleet.orchestrate.RETRY_DELAYS", (0.0,))
    flaky = Scripted(_node("flaky"), [NodeUnreachable("ssh: connection reset"), READY])
    broken = Scripted(_node("broken"), [{"event": "result", "state": "failed", "error": "x: sha256 mismatch"}])
    unavailable = {"event": "result", "state": "failed", "error": "store returned 503", "retryable": True}
    store_down = Scripted(_node("store"), [unavailable] * 3)
    hostkey = Scripted(_node("hostkey"), [NodeUnreachable("unknown host key", retryable=False)])
    killed = Scripted(_node("killed"), [NodeFailed("killed (signal KILL)", retryable=True), READY])
    by_name = {t.node.name: t for t in (flaky, broken, store_down, hostkey, killed)}
    req = WarmRequest(b"{}", None, {"urls": {}})
    rows = asyncio.run(warm_nodes([t.node for t in by_name.values()], req, lambda n: by_name[n.name], retries=2))
    got = {r.node.name: (r.state, r.attempts) for r in rows}
    assert got == {
        "flaky": ("ready", 2),
        "broken": ("failed", 1),
        "store": ("failed", 3),
        "hostkey": ("unreachable", 1),
        "killed": ("ready", 2),
    }


def test_timeout_reports_where_each_node_was() -> None:
    slow = Scripted(_node("slow"), [READY], delay=5)
    fast = Scripted(_node("fast"), [READY])
    req = WarmRequest(b"{}", None, {"urls": {}})
    by_name = {"slow": slow, "fast": fast}
    rows = asyncio.run(warm_nodes([slow.node, fast.node], req, lambda n: by_name[n.name], timeout=0.5, parallel=1))
    states = {r.node.name: r for r in rows}
    assert states["slow"].state == "fetching" and "timed out after 0.5s" in states["slow"].error
    # --parallel 1: the second node never got its turn.
    assert states["fast"].state == "pending" and "timed out" in states["fast"].error


@pytest.mark.parametrize(
    ("text", "n", "need"), [("all", 6, 6), ("100%", 6, 6), ("50%", 6, 3), ("66%", 3, 2), ("67%", 3, 3), ("2", 6, 2)]
)
def test_parse_share(text: str, n: int, need: int) -> None:
    assert parse_share(text)(n) == need


def test_parse_errors() -> None:
    with pytest.raises(UsageError):
        parse_share("most")
    with pytest.raises(UsageError):
        parse_share("150%")
    assert parse_duration("2m") == 120 and parse_duration("90") == 90
    with pytest.raises(UsageError):
        parse_duration("soon")


def test_detached_warm_then_status_watch(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, 40), "d:1.0", store, key, tags=["prod"])
    nodes = [{"name": f"n{i}", "transport": "local", "cache": f"caches/n{i}"} for i in (1, 2)]
    (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": nodes}, store=store, pub=pub))

    watch = ("--watch", "--timeout", "1", "--interval", "0.3")
    proc = run_cli("status", "d:prod", "--region", "lab", *watch, cwd=tmp_path)
    assert proc.returncode == 1 and "0/2 ready" in proc.stdout and "checking again" in proc.stderr

    proc = run_cli("warm", "d:prod", "--region", "lab", "--detach", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [n["state"] for n in cli_json(proc)["nodes"]] == ["accepted", "accepted"]
    proc = run_cli("status", "d:prod", "--region", "lab", "--watch", "--timeout", "60", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cli_json(proc)["ready"] == 2
