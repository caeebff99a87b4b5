"""The ssh transport reads ~/.ssh/config as OpenSSH does: StrictHostKeyChecking accept-new
records a new host key in a UserKnownHostsFile it creates (0600, directories 0700), a
changed key is refused always, and a file the config names that is missing is skipped
(IdentityFile, as OpenSSH does) or named in the error, never a bare "No such file"."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, fleet_toml, model, publish
from tests.helpers import require, run_cli
from tests.sshd import Sshd, SshLab, keygen, sshd_binary, weightship_script


@pytest.fixture(scope="module", autouse=True)
def _needs_sshd() -> None:
    require(sshd_binary() is not None, "openssh-server (sshd)", "apt-get install openssh-server")


@dataclass
class Node:
    lab: SshLab
    server: Sshd
    fleet: Path
    store: str

    @property
    def config(self) -> Path:
        return self.lab.ssh_dir / "config"

    def configure(self, text: str) -> None:
        """Options for every host, after the lab's own Host block (first value wins)."""
        with open(self.config, "a") as fh:
            fh.write("Host *\n" + "".join(f"  {line}\n" for line in text.strip().splitlines()))

    def warm(self, *extra: str) -> dict:
        proc = run_cli(
            "warm", "m:1", "--region", "r", "--fleet", self.fleet, "--store", self.store, "--json", *extra,
            env=self.lab.env(),
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return cli_json(proc)["nodes"][0]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """One sshd whose host key is in no known_hosts file yet, and a release to warm."""
    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, 1), "m:1", store)
    lab = SshLab(tmp_path / "ssh")
    try:
        server = lab.add("n1", known=False)
        fleet = tmp_path / "fleet.toml"
        n = {"name": "n1", "transport": "ssh://n1", "cache": str(tmp_path / "cache"), "command": weightship_script()}
        fleet.write_text(fleet_toml({"r": [n]}))
        yield Node(lab, server, fleet, store)
    finally:
        lab.stop()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_accept_new_in_ssh_config_creates_the_known_hosts_file(node: Node) -> None:
    known = node.lab.home / ".ssh" / "hosts.d" / "known_hosts"
    node.configure("StrictHostKeyChecking accept-new\nUserKnownHostsFile ~/.ssh/hosts.d/known_hosts")
    row = node.warm()
    assert row["state"] == "ready", row
    assert _mode(known.parent) == 0o700 and _mode(known) == 0o600
    assert known.read_text().startswith(f"[127.0.0.1]:{node.server.port} ssh-ed25519 ")

    # Recorded once, trusted after; a key that changes is refused though accept-new says yes.
    assert node.warm()["state"] == "ready"
    assert len(known.read_text().splitlines()) == 1
    keygen(node.lab.root / "another_host_key", "another")
    another = " ".join((node.lab.root / "another_host_key.pub").read_text().split()[:2])
    known.write_text(f"[127.0.0.1]:{node.server.port} {another}\n")
    row = node.warm()
    assert row["state"] == "unreachable" and "CHANGED" in row["error"] and row["attempts"] == 1
    assert known.read_text() == f"[127.0.0.1]:{node.server.port} {another}\n"


def test_accept_new_flag_creates_missing_directories(node: Node) -> None:
    known = node.lab.home / "state" / "ssh" / "known_hosts"
    node.configure(f"UserKnownHostsFile {known}")
    row = node.warm()
    assert row["state"] == "unreachable" and "unknown host key" in row["error"] and str(known) in row["error"]
    assert not known.parent.exists()  # refusing wrote nothing

    row = node.warm("--accept-new-host-keys")
    assert row["state"] == "ready", row
    assert _mode(known.parent) == _mode(known.parent.parent) == 0o700 and _mode(known) == 0o600
    assert f"[127.0.0.1]:{node.server.port} " in known.read_text()


def test_new_key_appended_after_a_last_line_without_newline(node: Node) -> None:
    keygen(node.lab.root / "example_key", "example")
    example = " ".join((node.lab.root / "example_key.pub").read_text().split()[:2])
    known = node.lab.known_hosts
    known.write_text(f"# kept\nexample.org {example}")
    node.configure("StrictHostKeyChecking accept-new")
    assert node.warm()["state"] == "ready"
    lines = known.read_text().splitlines()
    assert lines[1].startswith("example.org ") and lines[2].startswith(f"[127.0.0.1]:{node.server.port} ")


def test_strict_yes_refuses_and_user_known_hosts_none_still_checks(node: Node) -> None:
    node.configure("StrictHostKeyChecking yes")
    row = node.warm()
    assert row["state"] == "unreachable" and "unknown host key" in row["error"] and row["attempts"] == 1

    # `UserKnownHostsFile none` means no file of the user's, not "trust any key".
    node.config.write_text(node.config.read_text().replace("StrictHostKeyChecking yes", "UserKnownHostsFile none"))
    row = node.warm()
    assert row["state"] == "unreachable" and "unknown host key" in row["error"]


def test_missing_identity_file_is_skipped_and_named_when_it_matters(node: Node) -> None:
    node.configure("StrictHostKeyChecking accept-new\nIdentityFile ~/.ssh/id_elsewhere")
    assert node.warm()["state"] == "ready"  # the lab's key still logs in, as with OpenSSH

    text = node.config.read_text().replace(f"IdentityFile {node.lab.client_key}\n", "")
    node.config.write_text(text)
    node.lab.client_key.rename(node.lab.client_key.with_name("id_moved"))
    row = node.warm()
    assert row["state"] == "unreachable" and row["attempts"] == 1
    assert "permission denied" in row["error"] and "~/.ssh/id_elsewhere does not exist" in row["error"]


def test_unreadable_known_hosts_file_is_named(node: Node) -> None:
    bad = node.lab.home / ".ssh" / "known_hosts.d"
    bad.mkdir()
    node.configure(f"UserKnownHostsFile {bad}")
    row = node.warm("--accept-new-host-keys")
    assert row["state"] == "unreachable" and row["attempts"] == 1
    assert str(bad) in row["error"] and "Is a directory" in row["error"]
