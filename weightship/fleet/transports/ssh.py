"""``ssh``: run ``weightship node …`` on the node over asyncssh and stream its events.

asyncssh reads ``~/.ssh/config`` (Host aliases, User, Port, IdentityFile,
UserKnownHostsFile), ``known_hosts``, the ssh-agent and the default identity files, as
OpenSSH does. A host key that is not in known_hosts is refused unless
``--accept-new-host-keys`` or ``StrictHostKeyChecking accept-new`` (or ``no``) in the
config, which record it, creating the known_hosts file if need be; a key that *changed*
is refused always.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shlex
from pathlib import Path
from typing import Any, ClassVar

from weightship.fleet.inventory import Node
from weightship.fleet.transports.base import (
    CONNECT_TIMEOUT,
    NodeFailed,
    NodeUnreachable,
    OnEvent,
    Transport,
)
from weightship.node.protocol import WarmRequest


def _client_factory(accept_new: bool, state: dict[str, Any], known: Any, record_in: Path | None):
    import asyncssh

    class Client(asyncssh.SSHClient):
        # Called only for a key that known_hosts does not trust.
        def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
            if asyncssh.match_known_hosts(known, host, addr, port)[0]:
                state["changed"] = True
                return False
            if not accept_new:
                return False
            if record_in is None:  # UserKnownHostsFile none: trusted for this connection only
                return True
            pattern = host if port in (22, None) else f"[{host}]:{port}"
            try:
                _record_host_key(record_in, f"{pattern} {key.export_public_key().decode().strip()}")
            except OSError as e:
                state["record_error"] = e
                return False
            state["added"] = str(record_in)
            return True

    return Client


def _record_host_key(path: Path, line: str) -> None:
    """Append a known_hosts line, creating the file (0600) and its missing directories
    (0700) as OpenSSH does for ~/.ssh: a first connection must not fail on a new home."""
    missing = []
    d = path.parent
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        os.mkdir(d, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        # A last line without its newline would swallow the new entry.
        lead = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""
        os.write(fd, f"{lead}{line}\n".encode())
    finally:
        os.close(fd)


def _client_config(node: Node, where: str) -> Any | None:
    """~/.ssh/config as it applies to this node, or None when there is none (or it cannot
    be read: OpenSSH and asyncssh skip it then too). Read here, besides by asyncssh, for
    what asyncssh does not act on: StrictHostKeyChecking, and files that may be missing."""
    path = Path("~/.ssh/config").expanduser()
    if not os.access(path, os.R_OK):
        return None
    import asyncssh
    from asyncssh.config import SSHClientConfig, SSHConfig

    class Config(SSHClientConfig):
        _handlers: ClassVar[dict[str, tuple[str, Any]]] = {
            **SSHClientConfig._handlers,
            "stricthostkeychecking": ("StrictHostKeyChecking", SSHConfig._set_string),
        }
        # OpenSSH expands %d, %u, %h… in these too.
        _percent_expand: ClassVar[set[str]] = {
            *SSHClientConfig._percent_expand,
            "UserKnownHostsFile",
            "GlobalKnownHostsFile",
        }

    try:
        return Config.load(
            None, [path], False, False, False, getpass.getuser(), node.user or (), node.host, node.port or ()
        )
    except asyncssh.ConfigParseError as e:
        raise NodeUnreachable(f"ssh {where}: {e}", "fix that line of the ssh config", retryable=False) from None
    except OSError as e:
        raise NodeUnreachable(
            f"ssh {where}: cannot read {e.filename or path} ({e.strerror})",
            "it is part of ~/.ssh/config (Include): fix or remove it",
            retryable=False,
        ) from None


def _known_hosts_files(cfg: Any | None) -> tuple[list[Path], list[Path]]:
    """The known_hosts files OpenSSH would use: the user's (UserKnownHostsFile, default
    ~/.ssh/known_hosts and known_hosts2; the first is where a new key is recorded) and
    the system's (GlobalKnownHostsFile, default /etc/ssh/ssh_known_hosts and ..2)."""
    user = cfg.get("UserKnownHostsFile") if cfg is not None else None
    system = cfg.get("GlobalKnownHostsFile") if cfg is not None else None
    if user is None:
        user = ["~/.ssh/known_hosts", "~/.ssh/known_hosts2"]
    if system is None:
        system = ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    return [Path(f).expanduser() for f in user], [Path(f).expanduser() for f in system]


def _load_known_hosts(files: list[Path], where: str) -> Any:
    """Every key those files trust. A file that does not exist trusts nothing (OpenSSH's
    view; asyncssh would fail the connection with a bare "No such file or directory")."""
    import asyncssh

    known = asyncssh.SSHKnownHosts()
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise NodeUnreachable(
                f"ssh {where}: cannot read known_hosts file {f} ({e.strerror})", retryable=False
            ) from None
        try:
            known.load(text)
        except ValueError as e:
            raise NodeUnreachable(
                f"ssh {where}: {f}: {e}", "fix or remove that line of the known_hosts file", retryable=False
            ) from None
    return known


class SshTransport(Transport):
    def __init__(self, node: Node, *, accept_new_host_keys: bool = False) -> None:
        self.node = node
        self.accept_new = accept_new_host_keys
        self._conn = None

    @property
    def where(self) -> str:
        user = f"{self.node.user}@" if self.node.user else ""
        port = f":{self.node.port}" if self.node.port else ""
        return f"{user}{self.node.host}{port}"

    async def _connect(self):
        import asyncssh

        if self._conn is not None:
            return self._conn
        cfg = _client_config(self.node, self.where)
        user_files, system_files = _known_hosts_files(cfg)
        known = _load_known_hosts(user_files + system_files, self.where)
        strict = str(cfg.get("StrictHostKeyChecking") or "") if cfg is not None else ""
        # OpenSSH's accept-new, and no/off, record an unknown key; a key that changed is
        # refused whatever the setting (OpenSSH's "no" would connect anyway).
        accept_new = self.accept_new or strict.lower() in ("accept-new", "no", "off", "false")
        state: dict[str, Any] = {}
        factory = _client_factory(accept_new, state, known, user_files[0] if user_files else None)
        # known_hosts is handed over loaded: asyncssh would fail on a listed file that does
        # not exist yet, and would turn off host key checking for `UserKnownHostsFile none`.
        kwargs: dict[str, Any] = {"client_factory": factory, "known_hosts": known}
        if self.node.port:
            kwargs["port"] = self.node.port
        if self.node.user:
            kwargs["username"] = self.node.user
        # OpenSSH skips an IdentityFile that does not exist; asyncssh fails on it with a
        # bare "No such file or directory". Skip it too, and name it if the login fails.
        identities = [str(f) for f in (cfg.get("IdentityFile") or [])] if cfg is not None else []
        absent = [f for f in identities if not Path(f).expanduser().exists()]
        if absent:
            kwargs["client_keys"] = [f for f in identities if f not in absent]
            kwargs["ignore_encrypted"] = True  # asyncssh's default for keys it finds itself
        try:
            self._conn = await asyncio.wait_for(
                asyncssh.connect(self.node.host, connect_timeout=CONNECT_TIMEOUT, **kwargs), CONNECT_TIMEOUT + 5
            )
        except asyncssh.HostKeyNotVerifiable:
            if state.get("changed"):
                raise NodeUnreachable(
                    f"ssh {self.where}: the host key CHANGED since it was recorded in known_hosts",
                    "if the node was reinstalled, remove the old key (ssh-keygen -R HOST); otherwise investigate",
                    retryable=False,
                ) from None
            if err := state.get("record_error"):
                raise NodeUnreachable(
                    f"ssh {self.where}: cannot record its new host key in {err.filename or user_files[0]} "
                    f"({err.strerror})",
                    "fix that file's permissions or UserKnownHostsFile in ~/.ssh/config",
                    retryable=False,
                ) from None
            raise NodeUnreachable(
                f"ssh {self.where}: unknown host key (not in {', '.join(map(str, user_files)) or 'known_hosts'})",
                "add it with ssh-keyscan, or pass --accept-new-host-keys (or set StrictHostKeyChecking accept-new) "
                "to record it on first use",
                retryable=False,
            ) from None
        except asyncssh.PermissionDenied:
            missing = f" (IdentityFile {', '.join(absent)} does not exist)" if absent else ""
            raise NodeUnreachable(
                f"ssh {self.where}: permission denied{missing}",
                "check the user, the ssh-agent or IdentityFile in ~/.ssh/config",
                retryable=False,
            ) from None
        except OSError as e:
            if e.filename:  # a file the config names (a key, a certificate): no retry brings it back
                raise NodeUnreachable(
                    f"ssh {self.where}: {e.filename}: {e.strerror}",
                    "fix or remove the line of ~/.ssh/config that names it",
                    retryable=False,
                ) from None
            raise NodeUnreachable(f"ssh {self.where}: {e.strerror or str(e) or type(e).__name__}") from None
        except (asyncssh.Error, asyncio.TimeoutError) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise NodeUnreachable(f"ssh {self.where}: {reason}") from None
        except ValueError as e:  # asyncssh's verdict on a malformed key or config value
            raise NodeUnreachable(f"ssh {self.where}: {e}", retryable=False) from None
        return self._conn

    def _command(self, args: list[str]) -> str:
        # `command` is a shell fragment (it may set variables or use a venv path), the
        # rest is quoted: nothing the caller sends is interpreted by the node's shell.
        parts = [self.node.command]
        if self.node.config:
            parts += ["--config", shlex.quote(self.node.config)]
        parts += ["node", *map(shlex.quote, args)]
        return " ".join(parts)

    async def _run(
        self, args: list[str], stdin: bytes | None = None, on_event: OnEvent | None = None
    ) -> dict[str, Any]:
        import asyncssh

        conn = await self._connect()
        cmd = self._command([*args, "--json"])
        result = None
        try:
            async with conn.create_process(cmd, encoding=None) as proc:
                if stdin is not None:
                    proc.stdin.write(stdin)
                proc.stdin.write_eof()
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("{"):
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev.get("event") == "progress" and on_event:
                        on_event(ev)
                    elif ev.get("event") in ("result", "error"):
                        result = ev
                done = await proc.wait()
                stderr = (await proc.stderr.read()).decode(errors="replace")
        except (OSError, asyncssh.Error) as e:
            self._conn = None
            raise NodeUnreachable(f"ssh {self.where}: connection lost ({e})") from None
        if result is not None and result.get("event") == "result":
            return result
        if result is not None:
            raise NodeFailed(str(result.get("error") or "node command failed"))
        if done.exit_status == 127:
            raise NodeFailed(
                f"`{self.node.command}` not found on {self.where}",
                "install weightship there or set `command` for the node in the fleet file",
            )
        if done.exit_signal:
            raise NodeFailed(
                f"{self.where}: the node's weightship process was killed (signal {done.exit_signal[0]})",
                "warm again: it resumes what was fetched",
                retryable=True,
            )
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        raise NodeFailed(
            f"{self.where}: `{cmd}` exited with {done.exit_status}" + (f": {lines[-1].strip()}" if lines else "")
        )

    async def warm(self, req: WarmRequest, on_event: OnEvent, *, detach: bool = False) -> dict[str, Any]:
        args = ["warm", "--cache", str(self.node.cache)]
        if detach:
            args.append("--detach")
        return await self._run(args, req.to_json(), on_event)

    async def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        args = ["status", "--cache", str(self.node.cache)]
        if ref:
            args.append(ref)
        if version:
            args += ["--version", version]
        if digest:
            args += ["--digest", digest]
        if verify:
            args.append("--verify")
        return await self._run(args)

    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]:
        args = ["gc", "--cache", str(self.node.cache), "--keep", str(keep)]
        if dry_run:
            args.append("--dry-run")
        return await self._run(args)

    async def have(self, hexdigests: list[str]) -> dict[str, Any]:
        body = json.dumps({"blobs": hexdigests}).encode()
        return await self._run(["have", "--cache", str(self.node.cache)], body)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None
