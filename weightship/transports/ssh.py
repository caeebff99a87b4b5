"""``ssh``: run ``weightship node …`` on the node over asyncssh and stream its events.

asyncssh reads ``~/.ssh/config`` (Host aliases, User, Port, IdentityFile,
UserKnownHostsFile), ``known_hosts``, the ssh-agent and the default identity files, as
OpenSSH does. A host key that is not in known_hosts is refused unless
``--accept-new-host-keys``, which records it (OpenSSH's ``accept-new``); a key that
*changed* is refused always.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shlex
from pathlib import Path
from typing import Any

from weightship.fleet import Node
from weightship.node import WarmRequest
from weightship.transports.base import (
    CONNECT_TIMEOUT,
    NodeFailed,
    NodeUnreachable,
    OnEvent,
    Transport,
)


def _client_factory(accept_new: bool, state: dict[str, Any], files: list[Path]):
    import asyncssh

    class Client(asyncssh.SSHClient):
        # Called only for a key that known_hosts does not trust.
        def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
            trusted = asyncssh.match_known_hosts([str(f) for f in files if f.exists()], host, addr, port)[0]
            if trusted:
                state["changed"] = True
                return False
            if not accept_new:
                return False
            pattern = host if port in (22, None) else f"[{host}]:{port}"
            line = f"{pattern} {key.export_public_key().decode().strip()}\n"
            target = files[0]
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(target, "a") as fh:
                fh.write(line)
            state["added"] = str(target)
            return True

    return Client


def _known_hosts_files(node: Node) -> list[Path]:
    """The known_hosts files OpenSSH would use for this node: UserKnownHostsFile from
    ~/.ssh/config, else ~/.ssh/known_hosts. The first one is where a new key is recorded."""
    config = Path("~/.ssh/config").expanduser()
    if config.is_file():
        try:
            from asyncssh.config import SSHClientConfig

            cfg = SSHClientConfig.load(
                None, [config], False, False, False, getpass.getuser(), node.user or (), node.host, node.port or ()
            )
            files = cfg.get("UserKnownHostsFile")
        except Exception:  # an unreadable config is asyncssh's to report when connecting
            files = None
        if files:
            return [Path(f).expanduser() for f in files]
    return [Path("~/.ssh/known_hosts").expanduser()]


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
        state: dict[str, Any] = {}
        factory = _client_factory(self.accept_new, state, _known_hosts_files(self.node))
        kwargs: dict[str, Any] = {"client_factory": factory}
        if self.node.port:
            kwargs["port"] = self.node.port
        if self.node.user:
            kwargs["username"] = self.node.user
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
            raise NodeUnreachable(
                f"ssh {self.where}: unknown host key (not in known_hosts)",
                "add it with ssh-keyscan, or pass --accept-new-host-keys to record it on first use",
                retryable=False,
            ) from None
        except asyncssh.PermissionDenied:
            raise NodeUnreachable(
                f"ssh {self.where}: permission denied",
                "check the user, the ssh-agent or IdentityFile in ~/.ssh/config",
                retryable=False,
            ) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            raise NodeUnreachable(f"ssh {self.where}: {reason}") from None
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
        self, ref: str | None = None, version: str | None = None, digest: str | None = None
    ) -> dict[str, Any]:
        args = ["status", "--cache", str(self.node.cache)]
        if ref:
            args.append(ref)
        if version:
            args += ["--version", version]
        if digest:
            args += ["--digest", digest]
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
