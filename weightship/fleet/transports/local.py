"""``local``: the node engine in this process (the embedded default; the demo uses it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from weightship.fleet.inventory import Node
from weightship.fleet.transports.base import NodeFailed, OnEvent, Transport
from weightship.node.cache import NodeCache
from weightship.node.protocol import WarmRequest
from weightship.trust.policy import TrustPolicy

T = TypeVar("T")


class LocalTransport(Transport):
    def __init__(self, node: Node, *, policy: TrustPolicy | None = None, config_path: str | None = None) -> None:
        self.node = node
        # A local node with its own weightship.toml enforces that file's [policy];
        # otherwise it is this machine, and this machine's [policy] is its policy.
        self.config_path = node.config or config_path
        if node.config:
            from weightship import config

            policy = config.load(Path(node.config)).policy()
        assert node.cache
        self.cache = NodeCache(node.cache, policy=policy, capacity=node.capacity)

    async def warm(self, req: WarmRequest, on_event: OnEvent, *, detach: bool = False) -> dict[str, Any]:
        if detach:
            return await self._detach(req)
        loop = asyncio.get_running_loop()

        def emit(ev: dict[str, Any]) -> None:
            # As over ssh and the agent, the result is the return value, not an event.
            if ev.get("event") == "progress":
                loop.call_soon_threadsafe(on_event, ev)

        return await _in_thread(lambda: self.cache.warm(req, emit))

    async def _detach(self, req: WarmRequest) -> dict[str, Any]:
        # This process may exit before the warm ends, so the warm runs in a node process
        # of its own, exactly as ssh would start it.
        cmd = [sys.executable, "-m", "weightship"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        cmd += ["node", "warm", "--cache", str(self.cache.root), "--detach", "--json"]
        if self.cache.capacity:
            cmd += ["--capacity", str(self.cache.capacity)]
        proc = await asyncio.to_thread(
            subprocess.run, cmd, input=req.to_json(), capture_output=True, timeout=60, check=False
        )
        lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise NodeFailed(err[-1] if err else f"node warm exited with {proc.returncode}")

    async def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        return await _in_thread(lambda: self.cache.status(ref, version, digest, verify=verify))

    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]:
        return await _in_thread(lambda: self.cache.gc(keep, dry_run))

    async def have(self, hexdigests: list[str]) -> dict[str, Any]:
        return await _in_thread(lambda: self.cache.have(hexdigests))


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a daemon thread: a warm abandoned at --timeout must not hold up exit
    (its partial files stay, and the next warm resumes them)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        value, exc = None, None
        try:
            value = fn()
        except BaseException as e:  # handed to the awaiting task as is
            exc = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_set, fut, value, exc)

    threading.Thread(target=run, daemon=True, name="weightship-local-node").start()
    return await fut


def _set(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
