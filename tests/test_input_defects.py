"""Defects in what a user hands weightship, and a user's Ctrl-C.

A model directory with a broken safetensors header or a file name no store or node could
hold is refused at pack time, in one line naming the file, before a byte is uploaded; a
node refuses such a manifest too, and a permanent file-system error is not retried.
Ctrl-C stops a publish or a pull at once, says how to resume, and the re-run resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, fleet_toml, unsafe_warm_request
from tests.helpers import error_line, run_cli
from weightship.demo import build_model


def _nothing_stored(store_url: str) -> bool:
    root = Path(store_url[len("file://") :])
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def _publish_refused(model: Path, store: str) -> str:
    """publish fails at once with one error line and leaves the store untouched; so does pack."""
    started = time.monotonic()
    proc = run_cli("publish", model, "m:1", "--store", store)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert "internal error" not in line
    assert "uploading" not in proc.stderr
    assert _nothing_stored(store)
    assert time.monotonic() - started < 10  # no retries with back-off
    packed = run_cli("pack", model, "--json")
    assert packed.returncode == 1 and error_line(packed) == line
    return line


def test_deeply_nested_safetensors_header_is_a_broken_header(tmp_path: Path, file_store: str) -> None:
    model = build_model(tmp_path / "m")
    header = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (model / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    line = _publish_refused(model, file_store)
    assert "deep.safetensors" in line and "malformed or truncated safetensors" in line and "nested" in line


def test_file_name_that_is_not_utf8_is_refused_by_name(tmp_path: Path, file_store: str) -> None:
    model = build_model(tmp_path / "m")
    fd = os.open(os.fsencode(model) + b"/bad\xff.json", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"{}")
    os.close(fd)
    line = _publish_refused(model, file_store)
    assert "bad\\xff.json" in line and "not valid UTF-8" in line


def test_overlong_file_names_are_refused_with_the_limit(tmp_path: Path, file_store: str) -> None:
    # A name Linux accepts (<= 255 bytes) but that a temporary name derived from it would not fit.
    model = build_model(tmp_path / "long-name")
    name = "n" * 230 + ".json"
    (model / name).write_text("{}")
    line = _publish_refused(model, file_store)
    assert "235 bytes" in line and "200 bytes" in line and name[:50] in line

    # Every component short, the whole path longer than stores and nodes accept.
    model = build_model(tmp_path / "long-path")
    deep = model.joinpath(*[f"d{i}" + "y" * 180 for i in range(6)])
    deep.mkdir(parents=True)
    (deep / "a.json").write_text("{}")
    line = _publish_refused(model, file_store)
    assert "1024 bytes" in line and "d0yyy" in line and "a.json" in line


def test_node_refuses_a_manifest_with_an_overlong_name(tmp_path: Path) -> None:
    for path, limit in (("w/" + "x" * 201, "200 bytes"), ("/".join(["p" * 150] * 7), "1024 bytes")):
        proc = run_cli(
            "node", "warm", "--cache", tmp_path / "cache", "--json", input=json.dumps(unsafe_warm_request(path))
        )
        assert proc.returncode == 1, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
        assert result["state"] == "failed" and limit in result["error"] and result["retryable"] is False


def test_name_too_long_on_a_node_is_not_retried(tmp_path: Path, file_store: str) -> None:
    # A path within the limits can still be too long where a node keeps its cache (its
    # own path plus the release's exceeds PATH_MAX): that will not change on a retry.
    model = build_model(tmp_path / "m")
    deep = model.joinpath(*[f"d{i}" + "y" * 190 for i in range(4)])
    deep.mkdir(parents=True)
    (deep / "a.json").write_text("{}")
    assert run_cli("publish", model, "m:1", "--store", file_store).returncode == 0
    cache = tmp_path.joinpath(*["c" * 200] * 19)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml({"r": [{"name": "n1", "transport": "local", "cache": str(cache)}]}))
    proc = run_cli("warm", "m:1", "--region", "r", "--fleet", fleet, "--store", file_store, "--json")
    assert proc.returncode == 1, proc.stderr
    row = cli_json(proc)["nodes"][0]
    assert row["state"] == "failed" and "File name too long" in row["error"]
    assert row["attempts"] == 1


# -- Ctrl-C ----------------------------------------------------------------------------


def _interrupt(args: list[str | os.PathLike], when: str) -> tuple[int, float, str]:
    """Run ``weightship ARGS``, send SIGINT once stderr shows ``when``; return the exit
    code, the seconds from the signal to the exit, and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightship", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if when in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(60), "".join(lines)
        assert proc.poll() is None, "finished before it could be interrupted: " + "".join(lines)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    return code, took, "".join(lines)


def _interrupted_cleanly(code: int, took: float, stderr: str) -> None:
    assert code == 130, stderr
    assert took < 1.5, f"{took:.2f}s from SIGINT to exit"
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: interrupted; re-run the same command to resume"], stderr


@pytest.fixture
def big_model(tmp_path: Path) -> Path:
    """About 300 MiB in 12 random safetensors shards: long enough to be interrupted while moving."""
    root = tmp_path / "big"
    root.mkdir()
    n = 25 * 1024 * 1024
    for i in range(12):
        header = json.dumps({f"w{i}": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        with open(root / f"shard-{i}.safetensors", "wb") as fh:
            fh.write(len(header).to_bytes(8, "little") + header)
            fh.write(os.urandom(n))
    (root / "config.json").write_text("{}")
    return root


def test_ctrl_c_stops_a_publish_at_once_and_the_rerun_resumes(big_model: Path, s3_store_url: str) -> None:
    args = ["publish", big_model, "big:1", "--store", s3_store_url, "--json"]
    # Past the first blobs to complete (4 go up at once): a blob half sent is sent again whole.
    _interrupted_cleanly(*_interrupt(args, "uploading: 50%"))

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["bytes_uploaded"] < out["total_bytes"]  # what the first run sent was kept

    check = run_cli("pull", "big:1", big_model.parent / "pulled", "--store", s3_store_url)
    assert check.returncode == 0, check.stderr


def test_ctrl_c_stops_a_pull_at_once_and_the_rerun_completes(big_model: Path, file_store: str, tmp_path: Path) -> None:
    assert run_cli("publish", big_model, "big:1", "--store", file_store).returncode == 0
    dest = tmp_path / "pulled"
    _interrupted_cleanly(*_interrupt(["pull", "big:1", dest, "--store", file_store], "downloading: 25%"))
    assert not dest.exists()  # nothing unverified appeared

    again = run_cli("pull", "big:1", dest, "--store", file_store, "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in big_model.iterdir())
