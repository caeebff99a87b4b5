"""``agent``: the httpx client of ``weightship agent serve`` (see weightship.node.serve_http)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from weightship.errors import ConfigError, UsageError
from weightship.fleet.inventory import Node
from weightship.fleet.transports.base import CONNECT_TIMEOUT, NodeFailed, NodeUnreachable, OnEvent, Transport
from weightship.node.protocol import WarmRequest
from weightship.node.tls import shared_ssl_context

# A warm's event stream is re-opened this many times (from the last event seen) when the
# connection drops; the job goes on in the agent meanwhile.
STREAM_RECONNECTS = 5

# One TLS context per CA file, shared by every node that names it: a status of a region of
# fifty agents builds one, not fifty.
_CA_CONTEXTS: dict[str, Any] = {}
_CA_LOCK = threading.Lock()


def ca_context(node: Node) -> Any:
    """The TLS context that checks ``node``'s agent certificate against the fleet file's
    ``ca`` for it, and only that CA: an agent's certificate comes from the fleet's own CA,
    never from a public one."""
    import ssl

    assert node.ca
    with _CA_LOCK:
        ctx = _CA_CONTEXTS.get(node.ca)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=node.ca)
            except ssl.SSLError as e:  # an OSError too: caught first
                raise ConfigError(
                    f"node {node.name}: ca {node.ca} holds no PEM CA certificate ({e.reason or e})"
                ) from None
            except OSError as e:
                raise ConfigError(f"node {node.name}: cannot read ca {node.ca}: {e.strerror}") from None
            _CA_CONTEXTS[node.ca] = ctx
        return ctx


class AgentTransport(Transport):
    """One agent, over one ``httpx.AsyncClient``: every call of this transport (a warm's
    request and its event stream, status, gc, have) reuses its kept-alive connections,
    where a client per call paid a TCP (and TLS) handshake each time. ``close()`` ends it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.base = node.agent_url
        self._token = node.read_token()
        self._verify = ca_context(node) if node.ca else shared_ssl_context()
        self._http: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> Any:
        """The transport's client, made on first use. A client's connections belong to the
        event loop that opened them: called from another loop (a second asyncio.run), it
        starts a new client rather than reuse connections of a loop that is gone."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(
                base_url=self.base,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=httpx.Timeout(60.0, connect=CONNECT_TIMEOUT),
                verify=self._verify,
            )
            self._loop = loop
        return self._http

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        import httpx

        try:
            resp = await self._client().request(method, path, **kw)
        except httpx.TransportError as e:
            raise NodeUnreachable(f"agent {self.base}: {_reason(e, self.node)}") from None
        return self._json(resp)

    async def close(self) -> None:
        http, self._http = self._http, None
        loop, self._loop = self._loop, None
        if http is not None and loop is asyncio.get_running_loop():
            await http.aclose()

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
                async with self._client().stream(
                    "GET", f"/v1/jobs/{job}/events", params={"from": seen}, timeout=None
                ) as resp:
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
        reason = _reason(last, self.node) if last else "the event stream ended without a result"
        raise NodeUnreachable(f"agent {self.base}: lost the warm's events ({reason}); job {job} may still be running")

    async def status(
        self, ref: str | None = None, version: str | None = None, digest: str | None = None, *, verify: bool = False
    ) -> dict[str, Any]:
        params = {k: v for k, v in {"ref": ref, "version": version, "digest": digest}.items() if v}
        if verify:
            params["verify"] = "1"
        return await self._call("GET", "/v1/status", params=params)

    async def gc(self, keep: int, dry_run: bool) -> dict[str, Any]:
        return await self._call("POST", "/v1/gc", json={"keep": keep, "dry_run": dry_run})

    async def have(self, hexdigests: list[str]) -> dict[str, Any]:
        return await self._call("POST", "/v1/have", json={"blobs": hexdigests})

    async def warm_ref(self, ref: str) -> dict[str, Any]:
        """Ask the agent to warm ``ref`` from its own store (``agent serve --store``); its
        answer names the job and the release (``name``, ``version``, ``digest``). The warm
        goes on in the agent; its progress is in the agent's cache and its job's events."""
        return await self._call("POST", "/v1/warm-ref", json={"ref": ref})


def agent_node(url: str, token_file: str, ca: str | None = None, name: str = "agent") -> Node:
    """An agent named by its URL (``http://HOST:PORT``, or ``https://`` with ``ca``, the CA
    its certificate chains to), as a node that :class:`AgentTransport` reaches."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("http", "https") or not u.hostname or not port or u.path not in ("", "/") or u.query:
        raise UsageError(f"--agent {url!r}: write http://HOST:PORT, or https://HOST:PORT with --tls-ca")
    if (u.scheme == "https") != (ca is not None):
        raise UsageError(
            f"--agent {url!r}: an agent serving TLS is named https://HOST:PORT and needs --tls-ca",
            "pass both, or neither for an agent serving plain HTTP",
        )
    return Node(
        name=name,
        region="",
        kind="agent",
        transport=f"agent://{u.netloc}",
        host=u.hostname,
        port=port,
        token_file=token_file,
        ca=ca,
    )


def _reason(e: Exception, node: Node) -> str:
    import httpx

    text = str(e)
    if isinstance(e, httpx.ConnectError):
        # A scheme that does not match the agent fails in ways that name neither: say so.
        if node.ca and "CERTIFICATE_VERIFY_FAILED" in text:
            return f"its TLS certificate does not verify against ca {node.ca} ({text})"
        if node.ca and "WRONG_VERSION_NUMBER" in text:
            return f"it does not speak TLS ({text}); remove ca for this node, or start the agent with --tls-cert"
        return f"cannot connect ({text})"
    if isinstance(e, httpx.RemoteProtocolError) and not node.ca:
        return f"{text}; if the agent serves TLS (--tls-cert), set ca for this node in the fleet file"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    return f"{type(e).__name__}: {e}"
