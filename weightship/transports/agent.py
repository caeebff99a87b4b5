"""``agent``: the httpx client of ``weightship agent serve`` (see weightship.agent)."""

from __future__ import annotations

import json
from typing import Any

from weightship.fleet import Node
from weightship.node import WarmRequest
from weightship.sources import shared_ssl_context
from weightship.transports.base import CONNECT_TIMEOUT, NodeFailed, NodeUnreachable, OnEvent, Transport

# A warm's event stream is re-opened this many times (from the last event seen) when the
# connection drops; the job goes on in the agent meanwhile.
STREAM_RECONNECTS = 5


class AgentTransport(Transport):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.base = f"http://{node.host}:{node.port}"
        self._token = node.read_token()

    def _client(self):
        import httpx

        return httpx.AsyncClient(
            base_url=self.base,
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=httpx.Timeout(60.0, connect=CONNECT_TIMEOUT),
            verify=shared_ssl_context(),
        )

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        import httpx

        try:
            async with self._client() as c:
                resp = await c.request(method, path, **kw)
        except httpx.TransportError as e:
            raise NodeUnreachable(f"agent {self.base}: {_reason(e)}") from None
        return self._json(resp)

    def _json(self, resp) -> dict[str, Any]:
        try:
            doc = resp.json()
        except ValueError:
            doc = {}
        if resp.status_code == 401:
            raise NodeFailed(
                f"agent {self.base} refused the token (401)", "check token_file against the agent's --token-file"
            )
        if resp.status_code >= 400:
            raise NodeFailed(f"agent {self.base}: {doc.get('error') or f'HTTP {resp.status_code}'}")
        return doc

    async def warm(self, req: WarmRequest, on_event: OnEvent, *, detach: bool = False) -> dict[str, Any]:
        import httpx

        job = (await self._call("POST", "/v1/warm", content=req.to_json()))["job"]
        if detach:
            return {"event": "result", "state": "accepted", "job": job}
        seen = 0
        for _attempt in range(STREAM_RECONNECTS + 1):
            try:
                async with (
                    self._client() as c,
                    c.stream("GET", f"/v1/jobs/{job}/events", params={"from": seen}, timeout=None) as resp,
                ):
                    if resp.status_code != 200:
                        await resp.aread()
                        self._json(resp)
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        seen += 1
                        if ev.get("event") == "result":
                            return ev
                        on_event(ev)
            except httpx.TransportError as e:
                last = e
                continue
            last = None
        reason = _reason(last) if last else "the event stream ended without a result"
        raise NodeUnreachable(f"agent {self.base}: lost the warm's events ({reason}); job {job} may still be running")

    async def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None
    ) -> dict[str, Any]:
        params = {k: v for k, v in {"ref": ref, "version": version, "digest": digest}.items() if v}
        return await self._call("GET", "/v1/status", params=params)

    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]:
        return await self._call("POST", "/v1/gc", json={"keep": keep, "dry_run": dry_run})

    async def have(self, hexdigests: list[str]) -> dict[str, Any]:
        return await self._call("POST", "/v1/have", json={"blobs": hexdigests})


def _reason(e: Exception) -> str:
    import httpx

    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    return f"{type(e).__name__}: {e}"
