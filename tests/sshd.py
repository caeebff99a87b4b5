"""Real OpenSSH servers on loopback ports, one per fleet node, for tests.

``SshLab(root)`` makes a client home (``~/.ssh/config`` with one Host alias per node,
a generated client key, ``known_hosts``) and starts ``sshd -D -f CONFIG`` per node with
its own host key and ``authorized_keys``. Tests run the CLI with ``HOME`` pointing at
the lab's home, so asyncssh reads exactly what OpenSSH would. Servers stop by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port


def sshd_binary() -> str | None:
    for c in ("/usr/sbin/sshd", shutil.which("sshd")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def weightship_script() -> str:
    """The ``weightship`` entry point of this Python install (not a pyenv shim): what an
    ssh node runs as its ``command``."""
    for c in (Path(sysconfig.get_path("scripts")) / "weightship", Path(sys.executable).parent / "weightship"):
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError("the weightship script is not installed beside this Python: pip install -e .")


def keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


@dataclass
class Sshd:
    alias: str
    port: int
    dir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            # -e: log to stderr (the log file) instead of syslog, which is absent here.
            self.proc = subprocess.Popen(
                [sshd_binary(), "-D", "-e", "-f", str(self.dir / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        _wait_port(self.port, self.proc, self.dir / "sshd.log")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The whole session: sshd and the per-connection children it forked.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


class SshLab:
    """A client home plus any number of sshd instances on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.home = self.root / "home"
        self.ssh_dir = self.home / ".ssh"
        self.ssh_dir.mkdir(parents=True, mode=0o700)
        self.client_key = self.ssh_dir / "id_ed25519"
        keygen(self.client_key, "weightship-tests")
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.known_hosts.write_text("")
        self.servers: list[Sshd] = []
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)

    def add(self, alias: str, *, known: bool = True) -> Sshd:
        """Start an sshd reachable as ``ssh://ALIAS`` (through ~/.ssh/config)."""
        d = self.root / f"sshd-{alias}"
        d.mkdir()
        keygen(d / "host_key", alias)
        shutil.copy(f"{self.client_key}.pub", d / "authorized_keys")
        port = free_port()
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {d / 'host_key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        with open(self.ssh_dir / "config", "a") as fh:
            fh.write(
                f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {self.client_key}\n\n"
            )
        if known:
            self.trust(alias, port, d)
        server = Sshd(alias, port, d)
        self.servers.append(server)
        server.start()
        return server

    def trust(self, alias: str, port: int, d: Path) -> None:
        pub = (d / "host_key.pub").read_text().split()
        with open(self.known_hosts, "a") as fh:
            fh.write(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")

    def env(self) -> dict[str, str]:
        """Run the CLI as a user whose ~ is the lab's home, and with no ssh-agent."""
        return {"HOME": str(self.home), "SSH_AUTH_SOCK": ""}

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited early:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd not listening on {port} after {timeout}s")
