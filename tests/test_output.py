"""What a person reads: node states that say what is true, tables that fit 80 columns
with no trailing blanks, one unit system, words that agree with their numbers, and
``-q``/``--json`` on either side of the command.

Every run is the real CLI in a subprocess, on a ``file://`` store and ``local`` nodes
(the workspace ``weightship demo`` leaves behind), piped as in a CI log; the progress
bars run under a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli

NARROW = {"COLUMNS": "80"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The demo workspace: demo:1.0 (tag prod) and demo:1.0-r2 in a file:// store, and
    region `demo` of three local nodes with demo:prod warmed."""
    root = tmp_path_factory.mktemp("output") / "ws"
    proc = run_cli("demo", "--dir", root)
    assert proc.returncode == 0, proc.stderr
    return root


def clean_lines(text: str, width: int | None = None) -> list[str]:
    """The lines of a piped output, checked: no trailing blanks, and none wider than ``width``."""
    lines = text.splitlines()
    for line in lines:
        assert line == line.rstrip(), f"trailing blanks: {line!r}"
        assert width is None or len(line) <= width, f"{len(line)} columns: {line!r}"
    return lines


# -- 1. a release ready on the node, its tag still elsewhere -------------------------------


def test_a_ready_release_whose_tag_has_not_moved_is_staged_not_pending(ws: Path):
    # demo:1.0-r2 reaches every node, but only as a version: prod there still means 1.0.
    warmed = run_cli("warm", "demo:1.0-r2", "--region", "demo", "--json", cwd=ws)
    assert warmed.returncode == 0, warmed.stderr
    moved = run_cli("tag", "demo:1.0-r2", "prod", cwd=ws)
    assert moved.returncode == 0, moved.stderr

    proc = run_cli("status", "demo:prod", "--json", cwd=ws)
    assert proc.returncode == 1, proc.stderr  # not ready for traffic: --require all fails
    doc = json.loads(proc.stdout)
    assert (doc["version"], doc["ready"], doc["ok"]) == ("1.0-r2", 0, False)
    for node in doc["nodes"]:
        assert node["state"] == "staged", node
        assert (node["version"], node["tag"], node["tag_version"]) == ("1.0-r2", "prod", "1.0")
        assert node["bytes_present"] == node["bytes_total"] and node["verified"] is True
        assert "demo:prod still points at 1.0" in node["error"] and "run warm demo:prod" in node["error"]
    # The table says the same, and why, on one line per node.
    table = run_cli("status", "demo:prod", cwd=ws, env=NARROW)
    assert table.returncode == 1
    lines = clean_lines(table.stdout)
    assert all(len(ln) <= 80 for ln in lines[:6]), table.stdout
    assert lines[0] == "demo:prod: 0/3 ready (required 3)"
    rows = [ln.split() for ln in lines if ln.startswith("gpu-")]
    assert [r[:4] for r in rows[:3]] == [[f"gpu-{i}", "staged", "1.0-r2", "1.0"] for i in (1, 2, 3)]
    assert "gpu-1: demo:prod still points at 1.0 on this node; run warm demo:prod" in table.stdout
    # The node side agrees (exit 1: not ready), and a share that allows it passes.
    cache = ws / "nodes" / "gpu-1"
    node = run_cli("node", "status", "--cache", cache, "demo:prod", "--version", "1.0-r2", cwd=ws)
    assert node.returncode == 1 and node.stdout.startswith("demo:prod: staged (version 1.0-r2,"), node.stdout
    assert run_cli("status", "demo:prod", "--require", "0", cwd=ws).returncode == 0

    # Warming the tag only switches it: every node is ready again.
    again = run_cli("warm", "demo:prod", "--region", "demo", "--json", cwd=ws)
    assert again.returncode == 0 and json.loads(again.stdout)["nodes"][0]["bytes_fetched"] == 0
    done = json.loads(run_cli("status", "demo:prod", "--json", cwd=ws).stdout)
    assert {n["state"] for n in done["nodes"]} == {"ready"} and done["ok"] is True


# -- 2/3. tables fit 80 columns, piped output has no trailing blanks, binary units -----------


def test_piped_tables_fit_80_columns_without_trailing_blanks(ws: Path):
    commands = [
        ["status", "demo:prod"],
        ["status", "demo:1.0"],
        ["status"],
        ["warm", "demo:prod", "--region", "demo"],
        ["warm", "demo:prod", "--region", "demo", "--plan"],
        ["gc", "--region", "demo", "--dry-run"],
        ["fleet", "ls"],
        ["ls"],
        ["show", "demo:prod"],
        ["node", "status", "--cache", "nodes/gpu-1"],
    ]
    for args in commands:
        proc = run_cli(*args, cwd=ws, env=NARROW)
        assert proc.returncode == 0, (args, proc.stderr)
        clean_lines(proc.stderr)
        lines = clean_lines(proc.stdout)
        if args[0] in ("status", "warm"):
            # Tables fit; lines of prose (errors, notes) may run on, they are not cut either.
            table = [ln for ln in lines if ln.startswith(("node ", "─")) or re.match(r"gpu-\d ", ln)]
            assert len(table) >= 5 and all(len(ln) <= 80 for ln in table), (args, proc.stdout)
        # Sizes in binary units only.
        assert not re.search(r"\d ?(kB|MB|GB|TB)\b", proc.stdout + proc.stderr), (args, proc.stdout)

    # A timestamp is printed whole or not at all, and a dropped column is named.
    for columns in ("80", "60", "200"):
        proc = run_cli("status", "demo:prod", cwd=ws, env={"COLUMNS": columns})
        lines = clean_lines(proc.stdout, int(columns))
        stamps = re.findall(r"\d{4}-\d\d-\d\d\S*", proc.stdout)
        assert all(TIMESTAMP.fullmatch(s) for s in stamps), stamps
        if stamps:
            assert len(stamps) == 3
        else:
            assert any(ln.startswith("(") and "last warm" in ln and "see --json" in ln for ln in lines), lines
        assert ("free" in lines[1]) == (columns == "200")


def test_progress_bars_count_in_binary_units(ws: Path, tmp_path: Path):
    """A pull on a terminal draws rich bars: bytes and speed in KiB/MiB, like the summary."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    env.update(TERM="xterm", COLUMNS="120")
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightship", "pull", "demo:prod", str(tmp_path / "dest")],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    drawn = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: the process is gone
            break
        if not chunk:
            break
        drawn += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))
    assert re.search(r"\d/\d+\.\d MiB", text), text  # rich's DownloadColumn, in binary units
    assert re.search(r"(KiB|MiB|GiB)/s", text), text
    assert not re.search(r"\d ?(kB|MB|GB)\b", text), text
    assert b"MiB" in out and not re.search(rb"\d ?(kB|MB|GB)\b", out)


# -- 4. -q and --json before or after the command -------------------------------------------


def test_quiet_and_json_work_before_and_after_the_command(ws: Path, tmp_path: Path):
    loud = run_cli("pull", "demo:prod", tmp_path / "a", cwd=ws)
    assert loud.returncode == 0 and loud.stdout.startswith("pulled demo:prod"), loud.stdout
    for args in (["-q", "pull", "demo:prod", tmp_path / "b"], ["pull", "demo:prod", tmp_path / "c", "-q"]):
        proc = run_cli(*args, cwd=ws)
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", (args, proc.stdout, proc.stderr)
    assert run_cli("node", "pin", "--cache", "nodes/gpu-1", "demo:1.0", "--quiet", cwd=ws).stdout == ""

    before = run_cli("--json", "status", "demo:prod", cwd=ws)
    after = run_cli("status", "demo:prod", "--json", cwd=ws)
    assert before.returncode == after.returncode == 0, before.stderr
    a, b = json.loads(before.stdout), json.loads(after.stdout)
    assert a["schema"] == b["schema"] == "weightship.status/v1"
    assert [(n["node"], n["state"]) for n in a["nodes"]] == [(n["node"], n["state"]) for n in b["nodes"]]
    # Both ways in one line, and through a subcommand group.
    both = run_cli("-q", "--json", "fleet", "ls", "-q", cwd=ws)
    assert json.loads(both.stdout)["schema"] == "weightship.fleet-ls/v1"
    node = run_cli("--json", "node", "status", "--cache", "nodes/gpu-1", cwd=ws)
    assert json.loads(node.stdout)["schema"] == "weightship.node-status/v1"

    # A command with no JSON document refuses --json rather than print text to a script.
    refused = run_cli("--json", "keygen", tmp_path / "k.pem", cwd=ws)
    assert refused.returncode == 2 and not (tmp_path / "k.pem").exists()
    assert error_line(refused).startswith("error: --json: ") and "prints no JSON document" in refused.stderr

    # --help says so on both sides.
    assert "--json" in run_cli("--help").stdout
    for args in (["pull", "--help"], ["node", "gc", "--help"], ["agent", "serve", "--help"]):
        text = run_cli(*args).stdout
        assert re.search(r"-q, --quiet\s+Only errors and results\. Also accepted before the\s+command\.", text), text
    after_json = " ".join(run_cli("status", "--help").stdout.split("--json", 1)[1].split())
    assert after_json.startswith("Print a machine-readable JSON document. Also accepted before the command.")


# -- 5. words that agree with their numbers --------------------------------------------------


def test_counts_agree_and_local_nodes_are_not_promised_peers(ws: Path, tmp_path: Path):
    (tmp_path / "weightship.toml").write_text(
        f'[store]\nurl = "file://{ws / "store"}"\n\n'
        f'[[regions.solo.nodes]]\nname = "only"\ntransport = "local"\ncache = "{tmp_path / "only"}"\n'
    )
    plan = run_cli("warm", "demo:1.0", "--region", "solo", "--plan", cwd=tmp_path, env=NARROW)
    assert plan.returncode == 0, plan.stderr
    assert "(1 node; nothing is fetched)" in plan.stdout and "1 nodes" not in plan.stdout
    assert "peers" not in plan.stdout, plan.stdout  # local nodes never relay
    assert "every node fetches from it" in plan.stdout
    planned = json.loads(run_cli("warm", "demo:1.0", "--region", "solo", "--plan", "--json", cwd=tmp_path).stdout)
    assert planned["peers"] is False

    warm = run_cli("warm", "demo:1.0", "--region", "solo", cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert "on 1 node of solo" in warm.stdout and "1 nodes" not in warm.stdout + warm.stderr

    # One blob uploaded is one blob; an unsigned release is not "signed unsigned", and a
    # key says "key" once.
    model = ws / "model"
    (model / "config.json").write_text('{"changed": 2}')
    pub = run_cli("publish", model, "demo:1.0-r3", cwd=ws)
    assert pub.returncode == 0, pub.stderr
    assert re.search(r"uploaded \S+ \S+ in 1 blob, skipped", pub.stdout), pub.stdout
    unsigned = run_cli("show", "demo:1.0-r3", cwd=ws)
    assert re.search(r"^signed    no$", unsigned.stdout, re.M), unsigned.stdout
    signed = run_cli("show", "demo:1.0", cwd=ws)
    assert re.search(r"^signed    key [0-9a-f]{16} \(verified\)$", signed.stdout, re.M), signed.stdout
