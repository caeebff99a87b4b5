"""The fleet file: parsed into regions and nodes, and refused with file:line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli
from weightship.errors import ConfigError
from weightship.fleet.inventory import load_fleet, parse_size

GOOD = """\
[store]
url = "file:///srv/weights"

[regions.us-east]
store = "s3://models-us-east/weights"

[[regions.us-east.nodes]]
name = "gpu-1"
transport = "ssh://root@10.0.0.5:2222"
cache = "/nvme/weightship"
command = "/opt/weightship/bin/weightship"
capacity = "500G"
labels = { gpu = "h100", rack = "r1" }

[[regions.us-east.nodes]]
name = "gpu-2"
transport = "agent://10.0.0.6:7070"
token_file = "agent.token"

[regions.lab]
[[regions.lab.nodes]]
name = "laptop"
transport = "local"
cache = "cache"
"""


def test_fleet_ls_shows_regions_and_nodes(tmp_path: Path) -> None:
    (tmp_path / "weightship.toml").write_text(GOOD)
    proc = run_cli("fleet", "ls", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    east = doc["regions"]["us-east"]
    assert east["store"] == "s3://models-us-east/weights"
    gpu1, gpu2 = east["nodes"]
    assert gpu1["capacity"] == 500 * 1024**3
    assert gpu1["labels"] == {"gpu": "h100", "rack": "r1"}
    assert gpu1["command"] == "/opt/weightship/bin/weightship"
    assert gpu2["command"] == "weightship"
    # A local cache is relative to the file that names it.
    assert doc["regions"]["lab"]["nodes"][0]["cache"] == str(tmp_path / "cache")
    text = run_cli("fleet", "ls", cwd=tmp_path)
    assert "gpu-1" in text.stdout and "ssh://root@10.0.0.5:2222" in text.stdout


def test_fleet_table_and_separate_file(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(GOOD.replace("[regions.", "[fleet.regions.").replace("[[regions.", "[[fleet.regions."))
    fl = load_fleet({}, None, fleet)
    assert sorted(fl.regions) == ["lab", "us-east"]
    node = fl.region("us-east").nodes[0]
    assert (node.kind, node.host, node.port, node.user) == ("ssh", "10.0.0.5", 2222, "root")
    agent = fl.region("us-east").nodes[1]
    assert agent.token_file == str(tmp_path / "agent.token")
    with pytest.raises(ConfigError, match="no region 'eu'"):
        fl.region("eu")


@pytest.mark.parametrize(
    ("edit", "line", "field", "why"),
    [
        (('transport = "agent://10.0.0.6:7070"', 'transport = "ftp://10.0.0.6"'), 17, "nodes[1].transport", "ftp://"),
        (('capacity = "500G"', 'capacity = "lots"'), 12, "nodes[0].capacity", "not a size"),
        (('command = "/opt', 'comand = "/opt'), 11, "nodes[0].comand", "unknown field"),
        # A missing field points at the node's table.
        (('token_file = "agent.token"', 'cache = "/x"'), 15, "nodes[1].token_file", "token"),
        (('cache = "/nvme/weightship"', 'cache = "nvme"'), 10, "nodes[0].cache", "absolute"),
        (('name = "gpu-2"', 'name = "gpu-1"'), 16, "nodes[1].name", "used twice"),
    ],
)
def test_malformed_fleet_names_line_and_field(tmp_path: Path, edit, line: int, field: str, why: str) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    path = tmp_path / "weightship.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_fleet({}, None, path)
    err = str(info.value)
    assert f"weightship.toml:{line}:" in err, err
    assert field in err and why in err, err


def test_malformed_fleet_is_one_line_from_the_cli(tmp_path: Path) -> None:
    (tmp_path / "weightship.toml").write_text(GOOD.replace('capacity = "500G"', "capacity = -1"))
    proc = run_cli("fleet", "ls", cwd=tmp_path)
    assert proc.returncode == 2
    assert "weightship.toml:12: regions.us-east.nodes[0].capacity" in error_line(proc)


def test_broken_toml_and_missing_fleet(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text("[regions.x\n")
    proc = run_cli("fleet", "ls", "--fleet", tmp_path / "fleet.toml", cwd=tmp_path)
    assert proc.returncode == 2 and "fleet.toml" in error_line(proc)
    proc = run_cli("status", cwd=tmp_path)
    assert proc.returncode == 2 and "no fleet configured" in error_line(proc)


def test_parse_size() -> None:
    assert parse_size("1K") == 1024
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("-3G")
