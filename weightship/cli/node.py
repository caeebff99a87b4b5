"""The node side: ``node warm|have|status|gc|verify|pin`` (what a fleet's ssh transport
runs on a node; JSON lines with ``--json``) and ``agent serve`` (the engine behind HTTP).

Commands here drive :class:`weightship.node.cache.NodeCache` on this machine. The
engine, uvicorn and httpx are imported by the commands, so that ``weightship --help``
stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from weightship.cli.options import (
    CacheOpt,
    CapacityOpt,
    JsonOpt,
    PolicyFileOpt,
    globals_,
    load_config,
    parse_option,
    say,
)
from weightship.errors import UsageError
from weightship.progress import plural

if TYPE_CHECKING:
    from weightship.node.cache import NodeCache
    from weightship.node.protocol import WarmRequest
    from weightship.node.wait import RequestWarm

node_app = typer.Typer(
    help="The node side: run the cache engine on this machine (what ssh runs; prints JSON lines with --json).",
    no_args_is_help=True,
)
agent_app = typer.Typer(help="The node agent: the cache engine behind an authenticated HTTP API.", no_args_is_help=True)


def _capacity(text: str | None) -> int | None:
    from weightship.fleet.inventory import parse_size

    return None if text is None else parse_option("--capacity", parse_size, text)


def _node_cache(
    ctx: typer.Context,
    cache: Path,
    policy_file: Path | None,
    capacity: str | None = None,
    *,
    file_sources: Path | bool = True,
) -> NodeCache:
    """``file_sources``: which file:// sources warms may name (see NodeCache); only the
    agent restricts them, ssh and local callers already act as the node's user."""
    from weightship import config
    from weightship.node.cache import NodeCache

    policy = config.load(policy_file).policy() if policy_file else load_config(ctx).policy()
    return NodeCache(cache, policy=policy, capacity=_capacity(capacity), file_sources=file_sources)


class _Out:
    """JSON lines on stdout, each naming its schema; if the reader goes away (ssh
    dropped), the work goes on."""

    def __init__(self) -> None:
        self.broken = False

    def line(self, obj: dict[str, Any]) -> None:
        from weightship.node.protocol import labelled

        if self.broken:
            return
        try:
            sys.stdout.write(json.dumps(labelled(obj), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, OSError):
            self.broken = True


def _node_errors(fn):
    """In --json mode a failure is still one JSON line, so the caller can show it."""
    import functools

    from weightship.errors import WeightshipError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WeightshipError as e:
            if kwargs.get("json_"):
                _Out().line({"event": "error", "error": str(e), "retryable": False})
            raise

    return wrapper


@node_app.command("warm")
@_node_errors
def node_warm(
    ctx: typer.Context,
    cache: CacheOpt,
    request: Annotated[
        Path | None, typer.Option("--request", help="Warm request JSON (default: read from standard input).")
    ] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Go on in the background; print the accepted job.")] = False,
    hot: Annotated[
        bool, typer.Option("--hot", help="Then read the release into the page cache (bounded memory).")
    ] = False,
    capacity: CapacityOpt = None,
    policy: PolicyFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Warm one release into this node's cache, from a request on standard input
    (what `weightship warm` sends over ssh). Exit 0 when it is ready."""
    from weightship.node.protocol import WarmRequest

    node = _node_cache(ctx, cache, policy, capacity)
    if request is not None:
        data = request.read_bytes()
        # A detached run's request holds presigned URLs: do not leave it lying around.
        if request.parent == node.state / "requests":
            request.unlink(missing_ok=True)
    else:
        if sys.stdin.isatty():
            raise UsageError("no warm request", "pipe one on standard input or pass --request FILE")
        data = sys.stdin.buffer.read()
    req = WarmRequest.from_json(data)
    if hot:
        req.hot = True
    if detach:
        _detach(ctx, node, req, policy, capacity, json_)
        return
    if json_:
        result = node.warm(req, _Out().line)
    else:
        from weightship.cli.render import render_node_event
        from weightship.progress import human_bytes

        result = node.warm(req, render_node_event)
        if result["state"] == "ready":
            where = node.models / result["name"] / result["version"]
            fetched = human_bytes(result.get("bytes_fetched") or 0)
            print(f"{result['name']}:{result['version']} ready in {where} (fetched {fetched})")
    if result["state"] != "ready":
        if not json_:
            from weightship.errors import WeightshipError

            raise WeightshipError(result.get("error") or "warm failed")
        raise typer.Exit(1)


def _detach(
    ctx: typer.Context, node: NodeCache, req: WarmRequest, policy: Path | None, capacity: str | None, json_: bool
) -> None:
    import os
    import subprocess
    import uuid

    from weightship.artifact.manifest import Manifest

    # Refuse a bad request now, while someone is listening.
    Manifest.from_bytes(req.manifest, where="manifest sent to the node")
    node.ensure()
    reqdir = node.state / "requests"
    reqdir.mkdir(mode=0o700, exist_ok=True)
    job = uuid.uuid4().hex[:16]
    path = reqdir / f"{job}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(req.to_json())
    cmd = [sys.executable, "-m", "weightship"]
    cfg = globals_(ctx).config
    if cfg:
        cmd += ["--config", str(cfg)]
    cmd += ["node", "warm", "--cache", str(node.root), "--request", str(path), "--json"]
    if policy:
        cmd += ["--policy", str(policy)]
    if capacity:
        cmd += ["--capacity", capacity]
    with open(reqdir / f"{job}.log", "ab") as log:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    doc = {"event": "result", "state": "accepted", "job": job, "log": str(reqdir / f"{job}.log")}
    if json_:
        _Out().line(doc)
    else:
        print(f"accepted: warming in the background (log {doc['log']})")


@node_app.command("have")
@_node_errors
def node_have(
    ctx: typer.Context,
    cache: CacheOpt,
    json_: JsonOpt = False,
) -> None:
    """Which of the blobs named on standard input ({"blobs": [HEX…]}) this cache holds, and
    how much of the others it has partly downloaded (what warm's planner asks)."""
    from weightship.node.cache import NodeCache

    if sys.stdin.isatty():
        raise UsageError("no blob list", 'pipe {"blobs": [HEX…]} on standard input')
    try:
        doc = json.loads(sys.stdin.buffer.read())
        hexes = doc["blobs"]
        if not isinstance(hexes, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UsageError('standard input must be {"blobs": [HEX…]}') from None
    result = NodeCache(cache).have(hexes)
    if json_:
        _Out().line(result)
        return
    for h, size in result["blobs"].items():
        print(f"{h}  {size}")
    for h, size in result["partial"].items():
        print(f"{h}  {size} (partial)")


@node_app.command("status")
@_node_errors
def node_status(
    ctx: typer.Context,
    cache: CacheOpt,
    ref: Annotated[str | None, typer.Argument(help="NAME:TAG or NAME:VERSION; omit for every release.")] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="The version REF should be (from the store).")
    ] = None,
    digest: Annotated[str | None, typer.Option("--digest", help="The digest that version should have.")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-hash ready releases first; a damaged one is withdrawn and failed.")
    ] = False,
    capacity: CapacityOpt = None,
    policy: PolicyFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Readiness of a release (or of every release) in this node's cache."""
    from weightship.cli.render import render_node_status

    node = _node_cache(ctx, cache, policy, capacity)
    doc = node.status(ref, version, digest, verify=verify)
    if json_:
        _Out().line(doc)
        return
    render_node_status(doc, ref)
    if ref is not None and doc["state"] != "ready":
        raise typer.Exit(1)


@node_app.command("gc")
@_node_errors
def node_gc(
    ctx: typer.Context,
    cache: CacheOpt,
    keep: Annotated[int, typer.Option("--keep", min=0, help="Releases to keep per model besides tagged/pinned.")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be evicted; change nothing.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Evict old releases from this node's cache (never tagged or pinned ones)."""
    from weightship.node.cache import NodeCache
    from weightship.progress import human_bytes

    doc = NodeCache(cache).gc(keep, dry_run)
    if json_:
        _Out().line(doc)
        return
    names = ", ".join(f"{e['name']}:{e['version']}" for e in doc["evicted"]) or "nothing"
    say(ctx, f"{'would evict' if dry_run else 'evicted'} {names}; freed {human_bytes(doc['freed_bytes'])}")


@node_app.command("verify")
@_node_errors
def node_verify(
    ctx: typer.Context,
    cache: CacheOpt,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION or NAME:TAG in this cache.")],
    policy: PolicyFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Re-hash a materialised release against its manifest and the node's policy; a damaged
    file is dropped so the next warm repairs it."""
    node = _node_cache(ctx, cache, policy)
    doc = node.verify(ref)
    if json_:
        _Out().line(doc)
        return
    signed = f", signature verified ({doc['signer'].get('method')})" if doc.get("signer") else ""
    files = f"{plural(doc['files'], 'file')} {'matches' if doc['files'] == 1 else 'match'}"
    say(ctx, f"{doc['name']}:{doc['version']}: {files} the manifest{signed}")


@node_app.command("pin")
@_node_errors
def node_pin(
    ctx: typer.Context,
    cache: CacheOpt,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION or NAME:TAG in this cache.")],
    unpin: Annotated[bool, typer.Option("--unpin", help="Remove the pin instead.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Pin a release so that neither gc nor eviction removes it."""
    from weightship.node.cache import NodeCache

    doc = NodeCache(cache).pin(ref, not unpin)
    if json_:
        _Out().line(doc)
        return
    say(ctx, f"{doc['name']}:{doc['version']} {'pinned' if doc['pinned'] else 'unpinned'}")


@node_app.command(
    "wait",
    epilog="""\b
As a Kubernetes init container (the cache is the node's hostPath):
  initContainers:
  - name: weights
    image: weightship
    args: [node, wait, "llama:prod", --cache, /nvme/weightship, --timeout, 20m,
           --agent, "http://$(NODE_IP):7070", --token-file, /etc/weightship/agent.token]
then point the server at the printed path, or at /nvme/weightship/models/llama/prod.""",
)
def node_wait(
    cache: CacheOpt,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION, NAME:TAG or NAME@sha256:HEX.")],
    timeout: Annotated[
        str, typer.Option("--timeout", help="Give up (exit 1) after this long: seconds, or e.g. 90s, 10m, 2h.")
    ] = "10m",
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            help="This node's agent (http://HOST:PORT, https:// with --tls-ca): asked to warm REF from its"
            " --store when the cache does not hold it ready (absent, failed or evicted).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="File holding the agent's bearer token (with --agent).")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="PEM CA the agent's certificate chains to (https --agent).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Wait until REF is ready in this cache (whole and verified), then print its directory.

    Exit 0 as soon as it is ready, 1 when its warm failed (saying why) or at --timeout.
    """
    from weightship.errors import WeightshipError
    from weightship.fleet.orchestrate import parse_duration
    from weightship.node.wait import wait_ready

    seconds = parse_option("--timeout", parse_duration, timeout)
    assert seconds is not None
    request = None
    if agent is None and (token_file is not None or tls_ca is not None):
        raise UsageError("--token-file and --tls-ca go with --agent URL", "name the agent, or drop them")
    if agent is not None:
        if token_file is None:
            raise UsageError("--agent needs --token-file", "pass the file holding the agent's token")
        request = _agent_warm_request(agent, token_file, tls_ca, ref)
    result = wait_ready(cache, ref, seconds, request_warm=request)
    if json_:
        _Out().line(result.to_dict())
        if not result.ok:
            raise typer.Exit(1)
        return
    if not result.ok:
        raise WeightshipError(result.error or f"{ref} is not ready")
    print(result.path, flush=True)


def _agent_warm_request(agent: str, token_file: Path, tls_ca: Path | None, ref: str) -> RequestWarm:
    """What ``node wait --agent`` calls to have the agent warm REF: the agent's answer, or
    TryLater while it cannot be reached (it may be starting beside this container)."""
    import asyncio

    from weightship.fleet.transports.agent import AgentTransport, agent_node
    from weightship.fleet.transports.base import NodeUnreachable
    from weightship.node.wait import TryLater

    if tls_ca is not None and not tls_ca.is_file():
        raise UsageError(f"--tls-ca {tls_ca}: no such file")
    node = agent_node(agent, str(token_file), str(tls_ca) if tls_ca else None)
    # Read now: a token file that cannot be read is a usage error, not a reason to wait.
    transport = AgentTransport(node)

    async def ask() -> dict[str, Any]:
        try:
            return await transport.warm_ref(ref)
        finally:
            await transport.close()

    def request() -> dict[str, Any]:
        try:
            return asyncio.run(ask())
        except NodeUnreachable as e:
            raise TryLater(str(e)) from None

    return request


# -- agent -------------------------------------------------------------------------------


@agent_app.command(
    "serve",
    epilog="""\b
Under systemd, e.g. /etc/systemd/system/weightship-agent.service:
  [Unit]
  Description=weightship node agent
  After=network-online.target
  Wants=network-online.target
  [Service]
  ExecStart=/opt/weightship/bin/weightship agent serve --cache /nvme/weightship \\
      --listen 10.0.0.6:7070 --token-file /etc/weightship/agent.token \\
      --policy /etc/weightship/weightship.toml \\
      --tls-cert /etc/weightship/agent.crt --tls-key /etc/weightship/agent.key \\
      --tls-ca /etc/weightship/agents-ca.pem
  User=weightship
  Restart=on-failure
  [Install]
  WantedBy=multi-user.target

\b
then: head -c 32 /dev/urandom | base64 > /etc/weightship/agent.token; chmod 600 it
(owned by the weightship user); systemctl enable --now weightship-agent; give the
same token to the fleet file's token_file for this node, and the CA of agent.crt to
its ca (the fleet then reaches it, and its peers, over HTTPS).""",
)
def agent_serve(
    ctx: typer.Context,
    cache: CacheOpt,
    token_file: Annotated[Path, typer.Option("--token-file", help="File holding the bearer token callers must send.")],
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to bind; loopback unless you name an address.")
    ] = "127.0.0.1:7070",
    policy: PolicyFileOpt = None,
    capacity: CapacityOpt = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="The store this agent reads from: where it warms a reference by itself (node wait --agent),"
            " and the only file:// store warms may name file:// sources in (default: none).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate (chain) to serve HTTPS with; needs --tls-key.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="Unencrypted PEM private key of --tls-cert.")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="PEM CA that peers' certificates must chain to (default: the system's roots)."),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            envvar="WEIGHTSHIP_METRICS_LISTEN",
            help="Also serve GET /metrics (Prometheus) on this HOST:PORT, over HTTP without a token, and nothing"
            " else there. /metrics on --listen needs the token.",
        ),
    ] = None,
    kubernetes_node: Annotated[
        str | None,
        typer.Option(
            "--kubernetes-node",
            envvar="WEIGHTSHIP_KUBERNETES_NODE",
            help="Label this Kubernetes Node with the releases ready here (models.weightship.dev/NAME.TAG=VERSION),"
            " through the pod's service account or KUBECONFIG; in a DaemonSet, the downward API's spec.nodeName.",
        ),
    ] = None,
) -> None:
    """Serve this node's cache engine over HTTP or HTTPS (warm, status, events, gc), bearer-token only.

    The agent enforces its own --policy on every warm, whatever a caller asks.
    """
    from weightship.node import serve_http as agent
    from weightship.node.tls import configure_tls_ca

    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"the token in {token_file} is too short", "use at least 16 random characters")
    host, port = agent.parse_listen(listen)
    metrics_at = agent.parse_listen(metrics_listen, "--metrics-listen") if metrics_listen is not None else None
    if metrics_at is not None and metrics_at == (host, port):
        raise UsageError("--metrics-listen must differ from --listen", "give /metrics a port of its own")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together", "pass both to serve HTTPS, or neither")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    # file:// warm sources: only inside this agent's own file store. A caller holds just the
    # token, and must not make the agent read (and serve to peers) any file it can open.
    file_sources: Path | bool = False
    if store and (store.startswith("file://") or "://" not in store):
        # Not required to exist yet: an agent may start before the first publish (or mount).
        root = store[len("file://") :] if store.startswith("file://") else store
        if not root:
            raise UsageError(f"--store {store!r} names no directory", "write file:///PATH/OF/THE/STORE")
        file_sources = Path(root).resolve()
    if tls_ca is not None:
        configure_tls_ca(tls_ca)
    node = _node_cache(ctx, cache, policy, capacity, file_sources=file_sources)
    warnings = []
    if not node.policy.required:
        said = f"--policy {policy} has no [policy] keys, cert_chains or identities" if policy else "no --policy"
        warnings.append(
            f"{said}: this agent accepts unsigned releases and any signer;"
            " pass --policy weightship.toml with a [policy] naming the keys or identities to trust"
        )
    if kubernetes_node is not None:
        _label_node(node, kubernetes_node)
    agent.serve(
        node,
        token,
        host,
        port,
        announce=lambda line: print(line, file=sys.stderr, flush=True),
        tls_cert=tls_cert,
        tls_key=tls_key,
        warnings=warnings,
        store=store,
        metrics_listen=metrics_at,
    )


def _label_node(node: NodeCache, name: str) -> None:
    """Keep the labels of Kubernetes Node ``name`` equal to the releases ready in ``node``,
    from a background thread (see weightship.kube.labels)."""
    import re

    from weightship.kube.client import open_client
    from weightship.kube.labels import NodeLabeler

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise UsageError(f"--kubernetes-node {name!r} is not a Kubernetes node name", "pass spec.nodeName")
    # Missing credentials are a setup mistake: exit 2 now, rather than a warning per retry.
    open_client(prefer_in_cluster=True).close()
    NodeLabeler(node, name, lambda line: print(line, file=sys.stderr, flush=True)).start()
