"""Fleet commands: ``warm``, ``status``, ``gc``, ``fleet ls``, and the node side
(``node warm|status|gc|verify|pin``, what ssh runs; ``agent serve``).

``weightship --help`` must stay fast, so this module imports only typer at the top;
the engine, transports, asyncssh, httpx and uvicorn are imported by the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from weightship.cli.app import (
    CertChainOpt,
    GithubOpt,
    IdentityOpt,
    IdentityRegexOpt,
    IssuerOpt,
    JsonOpt,
    StoreOpt,
    VerifyKeyOpt,
    build_policy,
    emit_json,
    globals_,
    load_config,
    say,
)
from weightship.errors import UsageError

FleetOpt = Annotated[
    Path | None,
    typer.Option("--fleet", envvar="WEIGHTSHIP_FLEET", help="Fleet file (default: the regions in weightship.toml)."),
]
RegionOpt = Annotated[str | None, typer.Option("--region", "-r", help="Region of the fleet.")]
AcceptNewOpt = Annotated[
    bool,
    typer.Option(
        "--accept-new-host-keys",
        help="Record the host key of an ssh node seen for the first time (a changed key is still refused).",
    ),
]
TimeoutOpt = Annotated[str | None, typer.Option("--timeout", help="Give up after this long: 90, 90s, 10m, 2h.")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="The node cache directory.")]
PolicyFileOpt = Annotated[
    Path | None,
    typer.Option("--policy", help="weightship.toml whose [policy] this node enforces (default: the usual config)."),
]
CapacityOpt = Annotated[
    str | None, typer.Option("--capacity", help="Most the cache may use, e.g. 500G (default: the whole disk).")
]

fleet_app = typer.Typer(help="The fleet file: regions and their nodes.", no_args_is_help=True)
node_app = typer.Typer(
    help="The node side: run the cache engine on this machine (what ssh runs; prints JSON lines with --json).",
    no_args_is_help=True,
)
agent_app = typer.Typer(help="The node agent: the cache engine behind an authenticated HTTP API.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("warm")(warm)
    app.command("status")(status)
    app.command("gc")(gc)
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(node_app, name="node")
    app.add_typer(agent_app, name="agent")


# -- shared ------------------------------------------------------------------------------


def _fleet(ctx: typer.Context, fleet_file: Path | None):
    from weightship.fleet.inventory import load_fleet

    cfg = load_config(ctx)
    return cfg, load_fleet(cfg.data, cfg.path, fleet_file)


def _transport_for(cfg, accept_new: bool):
    from weightship.fleet.transports import for_node

    policy = cfg.policy()
    config_path = str(cfg.path) if cfg.path else None

    def make(node):
        return for_node(node, policy=policy, config_path=config_path, accept_new_host_keys=accept_new)

    return make


def _store_url(cfg, flag: str | None, region) -> str | None:
    # An explicit --store wins; a region's own store (a regional copy) comes before the default.
    return flag or (region.store if region is not None else None) or cfg.store_url(None)


def _capacity(text: str | None) -> int | None:
    from weightship.fleet.inventory import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--capacity: {e}") from None


def _quiet(ctx: typer.Context) -> bool:
    return globals_(ctx).quiet


# -- warm --------------------------------------------------------------------------------


def warm(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:TAG, NAME:VERSION or NAME@sha256:HEX.")],
    region: Annotated[str, typer.Option("--region", "-r", help="Region to warm (see weightship fleet ls).")],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--detach",
            help="Wait until every node is done (the default), or return once each node has accepted the warm.",
        ),
    ] = True,
    min_ready: Annotated[
        str, typer.Option("--min-ready", help="Share of nodes that must end ready for exit 0: all, N% or a count.")
    ] = "all",
    timeout: TimeoutOpt = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=1024, help="Nodes warmed at once.")] = 16,
    retries: Annotated[
        int, typer.Option("--retries", min=0, max=10, help="Retries of a node's transient failures.")
    ] = 2,
    credentials: Annotated[
        str,
        typer.Option(
            "--credentials",
            help="presigned: nodes get per-blob URLs; node: nodes read the store with their own credentials.",
        ),
    ] = "presigned",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="Also point this tag at the release on the nodes.")
    ] = None,
    pin: Annotated[bool, typer.Option("--pin", help="Pin the release on the nodes: gc never evicts it.")] = False,
    max_rate: Annotated[
        str | None, typer.Option("--max-rate", help="Per-node download limit in bytes/s, e.g. 200M.")
    ] = None,
    peers: Annotated[
        bool,
        typer.Option(
            "--peers/--no-peers",
            help="Let agent nodes fetch blobs from each other, so each blob crosses the origin link once "
            "(the default), or have every node fetch from the origin.",
        ),
    ] = True,
    plan_only: Annotated[
        bool,
        typer.Option(
            "--plan", help="Dry run: print per node the bytes missing and where they would come from; warm nothing."
        ),
    ] = False,
    hot: Annotated[
        bool, typer.Option("--hot", help="Also read the release into each node's page cache once it is ready.")
    ] = False,
    accept_new_host_keys: AcceptNewOpt = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Skip this machine's signature check; each node still enforces its own policy.",
        ),
    ] = False,
    key: VerifyKeyOpt = None,
    cert_chain: CertChainOpt = None,
    identity: IdentityOpt = None,
    identity_regex: IdentityRegexOpt = None,
    issuer: IssuerOpt = None,
    fleet: FleetOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
    output_github: GithubOpt = None,
) -> None:
    """Warm a release onto every cache node of a region before traffic needs it.

    The release is resolved once in the store; every node gets the same manifest and
    signature, fetches only the blobs it lacks, verifies every sha256 and its own
    signature policy, then links models/NAME/VERSION and switches the tag atomically.
    Exit 0 only when --min-ready of the nodes are ready.
    """
    import asyncio

    from weightship import release
    from weightship.artifact import refs
    from weightship.cli import github
    from weightship.fleet import orchestrate as w
    from weightship.fleet.inventory import parse_size
    from weightship.store import open_store

    to_github = github.enabled(output_github)
    if credentials not in ("presigned", "node"):
        raise UsageError(f"--credentials {credentials!r}", "choose presigned or node")
    required = w.parse_share(min_ready, "--min-ready")
    seconds = w.parse_duration(timeout)
    rate = None
    if max_rate:
        try:
            rate = parse_size(max_rate)
        except ValueError as e:
            raise UsageError(f"--max-rate: {e}") from None
    cfg, fl = _fleet(ctx, fleet)
    reg = fl.region(region)
    st = open_store(_store_url(cfg, store, reg))
    rel = release.resolve(st, ref)
    r = refs.Ref.parse(ref)
    tags = [r.label] if r.label and r.label != rel.version else []
    tags += [refs.check_label(t, "tag") for t in tag or [] if t not in tags]
    if not no_verify:
        policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex)
        if policy.required:
            signer = release.check_signature(rel, policy)
            if not json_ and signer:
                say(ctx, f"{rel.ref}: signature verified here ({signer.describe()}); each node checks its own policy")
    req = w.build_request(st, rel, credentials=credentials, tags=tags, pin=pin, max_rate=rate, hot=hot)
    transport_for = _transport_for(cfg, accept_new_host_keys)
    plan = None
    # Peers need at least two agents (only agents serve them); a plan asks every node first.
    if plan_only or (peers and sum(n.kind == "agent" for n in reg.nodes) >= 2):
        plan = asyncio.run(w.plan_warm(reg.nodes, rel.manifest, transport_for, peers=peers, parallel=parallel))
    if plan_only:
        assert plan is not None
        if json_:
            emit_json(
                {"schema": "weightship.warm-plan/v1", "ref": ref, "digest": rel.digest, "region": reg.name}
                | plan.to_dict()
            )
        else:
            w.render_plan(plan, f"plan for {rel.ref} in {reg.name} ({len(reg.nodes)} nodes; nothing is fetched)")
        return
    display = w.make_display(_quiet(ctx), json_)
    if not json_:
        say(ctx, f"warming {rel.ref} ({rel.digest[:19]}…) on {len(reg.nodes)} nodes of {reg.name}")
    rows = asyncio.run(
        w.warm_nodes(
            reg.nodes,
            req,
            _transport_for(cfg, accept_new_host_keys),
            parallel=parallel,
            timeout=seconds,
            retries=retries,
            detach=not wait,
            display=display,
            plan=plan if peers else None,
        )
    )
    good = "ready" if wait else "accepted"
    ready = sum(1 for row in rows if row.state == good)
    need = required(len(rows))
    ok = ready >= need
    # The --json document (docs/json.md, weightship/schemas/warm.v1.json); GitHub outputs derive from it.
    doc: dict[str, Any] = {
        "schema": "weightship.warm/v1",
        "ref": ref,
        "name": rel.name,
        "version": rel.version,
        "digest": rel.digest,
        "region": reg.name,
        "tags": tags,
        "nodes": [row.to_dict() for row in rows],
        good: ready,
        "total": len(rows),
        "required": need,
        "ok": ok,
    }
    if to_github:
        github.fleet("warm", doc)
    if json_:
        emit_json(doc)
    else:
        w.render_warm(rows, f"{rel.ref} in {reg.name}: {ready}/{len(rows)} {good} (required {need})")
    if not ok:
        raise typer.Exit(1)


# -- status ------------------------------------------------------------------------------


def status(
    ctx: typer.Context,
    ref: Annotated[str | None, typer.Argument(help="NAME:TAG, NAME:VERSION or NAME@sha256:HEX; omit for all.")] = None,
    region: RegionOpt = None,
    require: Annotated[
        str, typer.Option("--require", help="Share of nodes that must be ready for exit 0: all, N% or a count.")
    ] = "all",
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the requirement is met or --timeout.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Re-hash every ready file on the nodes first; damaged releases are withdrawn and failed."
        ),
    ] = False,
    timeout: TimeoutOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between --watch refreshes.")] = 2.0,
    accept_new_host_keys: AcceptNewOpt = False,
    fleet: FleetOpt = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
    output_github: GithubOpt = None,
) -> None:
    """Per node: state, the version the tag points at, bytes present, verified and by whom,
    free space, last warm, error. Exit 0 only when --require of the nodes are ready (for a
    release checklist); unreachable nodes are a state, not a crash."""
    import asyncio
    import time

    from weightship import release
    from weightship.artifact import refs
    from weightship.cli import github
    from weightship.fleet import orchestrate as w
    from weightship.store import open_store

    to_github = github.enabled(output_github)
    required = w.parse_share(require, "--require")
    seconds = w.parse_duration(timeout)
    cfg, fl = _fleet(ctx, fleet)
    regions = fl.select(region)
    queries: dict[str, Any] = {}
    title = "fleet"
    if ref is not None:
        r = refs.Ref.parse(ref)
        resolved: dict[str | None, Any] = {}
        for reg in regions:
            url = _store_url(cfg, store, reg)
            if url not in resolved:
                resolved[url] = release.resolve(open_store(url), r)
            rel = resolved[url]
            queries[reg.name] = w.Query(f"{r.name}:{r.label or rel.version}", rel.version, rel.digest, verify)
        title = ref
    nodes = [n for reg in regions for n in reg.nodes]
    need = required(len(nodes))
    transport_for = _transport_for(cfg, accept_new_host_keys)

    def query_for(node):
        return queries.get(node.region) or w.Query(verify=verify)

    deadline = time.monotonic() + seconds if seconds else None
    while True:
        rows = asyncio.run(w.status_nodes(nodes, query_for, transport_for))
        ready = sum(1 for row in rows if w.is_ready(row, ref is not None))
        ok = ready >= need
        if not watch or ok or (deadline and time.monotonic() >= deadline):
            break
        if not json_ and not _quiet(ctx):
            print(f"{title}: {ready}/{len(rows)} ready (need {need}); checking again in {interval:g}s", file=sys.stderr)
        time.sleep(interval if not deadline else max(0.0, min(interval, deadline - time.monotonic())))
    # The --json document (docs/json.md, weightship/schemas/status.v1.json); GitHub outputs derive from it.
    doc: dict[str, Any] = {
        "schema": "weightship.status/v1",
        "ref": ref,
        "regions": [reg.name for reg in regions],
        "nodes": rows,
        "ready": ready,
        "total": len(rows),
        "required": need,
        "ok": ok,
    }
    if ref is not None:
        q = next(iter(queries.values()))
        doc.update(version=q.version, digest=q.digest)
    if to_github:
        github.fleet("status", doc)
    if json_:
        emit_json(doc)
    else:
        word = "ready" if ref is not None else "reachable"
        w.render_status(rows, f"{title}: {ready}/{len(rows)} {word} (required {need})", ref is not None)
    if not ok:
        raise typer.Exit(1)


# -- gc ----------------------------------------------------------------------------------


def gc(
    ctx: typer.Context,
    region: Annotated[str, typer.Option("--region", "-r", help="Region whose nodes to clean.")],
    keep: Annotated[
        int, typer.Option("--keep", min=0, help="Releases to keep per model, besides tagged and pinned ones.")
    ] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be evicted; change nothing.")] = False,
    accept_new_host_keys: AcceptNewOpt = False,
    fleet: FleetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evict old releases on every node of a region: keep the --keep most recently warmed
    per model, and never what a tag points at or what is pinned."""
    import asyncio

    from weightship.fleet import orchestrate as w

    cfg, fl = _fleet(ctx, fleet)
    reg = fl.region(region)
    rows = asyncio.run(w.gc_nodes(reg.nodes, _transport_for(cfg, accept_new_host_keys), keep=keep, dry_run=dry_run))
    if json_:
        emit_json({"region": reg.name, "dry_run": dry_run, "nodes": rows})
    else:
        w.render_gc(rows, dry_run)
    if any(row["state"] != "ok" for row in rows):
        raise typer.Exit(1)


# -- fleet ls ----------------------------------------------------------------------------


@fleet_app.command("ls")
def fleet_ls(
    ctx: typer.Context,
    region: RegionOpt = None,
    fleet: FleetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List regions and their nodes (the fleet file is checked on the way)."""
    from weightship.progress import human_bytes

    _, fl = _fleet(ctx, fleet)
    regions = fl.select(region)
    if json_:
        emit_json(
            {
                "source": str(fl.source) if fl.source else None,
                "regions": {r.name: {"store": r.store, "nodes": [n.to_dict() for n in r.nodes]} for r in regions},
            }
        )
        return
    for r in regions:
        print(f"{r.name}" + (f"  (store {r.store})" if r.store else ""))
        for n in r.nodes:
            extra = []
            if n.cache:
                extra.append(n.cache)
            if n.capacity:
                extra.append(f"capacity {human_bytes(n.capacity)}")
            if n.labels:
                extra.append(",".join(f"{k}={v}" if v else k for k, v in sorted(n.labels.items())))
            print(f"  {n.name:<16} {n.transport:<32} {'  '.join(extra)}")


# -- node side ---------------------------------------------------------------------------


def _node_cache(
    ctx: typer.Context,
    cache: Path,
    policy_file: Path | None,
    capacity: str | None = None,
    *,
    file_sources: Path | bool = True,
):
    """``file_sources``: which file:// sources warms may name (see NodeCache); only the
    agent restricts them, ssh and local callers already act as the node's user."""
    from weightship import config
    from weightship.node.cache import NodeCache

    policy = config.load(policy_file).policy() if policy_file else load_config(ctx).policy()
    return NodeCache(cache, policy=policy, capacity=_capacity(capacity), file_sources=file_sources)


class _Out:
    """JSON lines on stdout; if the reader goes away (ssh dropped), the work goes on."""

    def __init__(self) -> None:
        self.broken = False

    def line(self, obj: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
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
    from weightship.node.cache import WarmRequest

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
        from weightship.progress import human_bytes

        result = node.warm(req, _plain_event)
        if result["state"] == "ready":
            where = node.models / result["name"] / result["version"]
            fetched = human_bytes(result.get("bytes_fetched") or 0)
            print(f"{result['name']}:{result['version']} ready in {where} (fetched {fetched})")
    if result["state"] != "ready":
        if not json_:
            from weightship.errors import WeightshipError

            raise WeightshipError(result.get("error") or "warm failed")
        raise typer.Exit(1)


def _plain_event(ev: dict[str, Any]) -> None:
    if ev.get("event") == "result":
        if ev["state"] != "ready":
            print(f"failed: {ev.get('error')}", file=sys.stderr)
        return
    line = f"{ev['state']}: {ev.get('bytes_done', 0)}/{ev.get('bytes_total', 0)} bytes"
    if ev.get("message"):
        line += f" - {ev['message']}"
    print(line, file=sys.stderr)


def _detach(ctx: typer.Context, node, req, policy: Path | None, capacity: str | None, json_: bool) -> None:
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
    from weightship.progress import human_bytes

    node = _node_cache(ctx, cache, policy, capacity)
    doc = node.status(ref, version, digest, verify=verify)
    if json_:
        _Out().line(doc)
        return
    free = human_bytes(doc["free_bytes"]) if doc.get("free_bytes") is not None else "?"
    if ref is None:
        for r in doc["releases"]:
            tags = f" ({', '.join(r['tags'])})" if r["tags"] else ""
            print(f"{r['name']}:{r['version']}{tags}  {r['state']}  {human_bytes(r['bytes_present'])}")
        print(f"{free} free in {doc['cache']}")
        return
    print(f"{ref}: {doc['state']} (version {doc['version']}, {human_bytes(doc['bytes_present'])} present, {free} free)")
    if doc.get("error"):
        print(doc["error"])
    if doc["state"] != "ready":
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
    say(ctx, f"{doc['name']}:{doc['version']}: {doc['files']} files match the manifest{signed}")


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
            help="The store this agent reads from: warms may name file:// sources only inside a file:// store"
            " (default: none).",
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
) -> None:
    """Serve this node's cache engine over HTTP or HTTPS (warm, status, events, gc), bearer-token only.

    The agent enforces its own --policy on every warm, whatever a caller asks.
    """
    from weightship.node import serve_http as agent
    from weightship.node.fetch import configure_tls_ca

    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"the token in {token_file} is too short", "use at least 16 random characters")
    host, port = agent.parse_listen(listen)
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
    agent.serve(
        node,
        token,
        host,
        port,
        announce=lambda line: print(line, file=sys.stderr, flush=True),
        tls_cert=tls_cert,
        tls_key=tls_key,
        warnings=warnings,
    )
