"""Fleet commands: ``warm``, ``status``, ``gc`` and ``fleet ls``.

Each parses its options, calls :mod:`weightship.fleet` (which returns a typed report),
and renders the report, or prints its ``to_dict()`` with ``--json``; the exit code
says whether enough nodes are ready. ``weightship --help`` must stay fast, so the
fleet library, transports, asyncssh and httpx are imported by the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from weightship.cli.options import (
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
    load_config,
    parse_option,
    quiet,
    say,
)
from weightship.errors import UsageError
from weightship.progress import plural

if TYPE_CHECKING:
    from weightship.config import Config
    from weightship.fleet.inventory import Fleet, Region
    from weightship.fleet.plan import TransportFor

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

fleet_app = typer.Typer(help="The fleet file: regions and their nodes.", no_args_is_help=True)


# -- shared ------------------------------------------------------------------------------


def _fleet(ctx: typer.Context, fleet_file: Path | None) -> tuple[Config, Fleet]:
    from weightship.fleet.inventory import load_fleet

    cfg = load_config(ctx)
    return cfg, load_fleet(cfg.data, cfg.path, fleet_file)


def _select(fl: Fleet, region: str | None) -> list[Region]:
    from weightship.fleet.inventory import NoFleet

    try:
        return fl.select(region)
    except NoFleet as e:
        hint = "add [regions.NAME] tables to weightship.toml or pass --fleet FILE (see docs)"
        raise NoFleet(e.message, hint) from None


def _transport_for(cfg: Config, accept_new: bool) -> TransportFor:
    from weightship.fleet.transports import for_node

    policy = cfg.policy()
    config_path = str(cfg.path) if cfg.path else None

    def make(node):
        return for_node(node, policy=policy, config_path=config_path, accept_new_host_keys=accept_new)

    return make


def _store_url(cfg: Config, flag: str | None, region: Region | None) -> str | None:
    # An explicit --store wins; a region's own store (a regional copy) comes before the default.
    return flag or (region.store if region is not None else None) or cfg.store_url(None)


def _timeout(text: str | None) -> float | None:
    from weightship.fleet.orchestrate import parse_duration

    return None if text is None else parse_option("--timeout", parse_duration, text)


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
    from weightship.cli import github
    from weightship.cli.render import make_display, render_plan, render_warm
    from weightship.fleet import orchestrate
    from weightship.fleet import plan as planning
    from weightship.fleet.inventory import parse_size
    from weightship.store import open_store

    to_github = github.enabled(output_github)
    if credentials not in planning.CREDENTIALS:
        raise UsageError(f"--credentials {credentials!r}", "choose presigned or node")
    required = parse_option("--min-ready", orchestrate.parse_share, min_ready)
    seconds = _timeout(timeout)
    rate = parse_option("--max-rate", parse_size, max_rate) if max_rate else None
    cfg, fl = _fleet(ctx, fleet)
    reg = fl.region(region)
    st = open_store(_store_url(cfg, store, reg))
    rel = release.resolve(st, ref)
    tags = planning.warm_tags(ref, rel, tag)
    if not no_verify:
        policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex)
        if policy.required:
            signer = release.check_signature(rel, policy)
            if not json_ and signer:
                say(ctx, f"{rel.ref}: signature verified here ({signer.describe()}); each node checks its own policy")
    try:
        req = planning.build_request(st, rel, credentials=credentials, tags=tags, pin=pin, max_rate=rate, hot=hot)
    except planning.NoBlobUrls as e:
        raise UsageError(e.message, "pass --credentials node to let nodes read it") from None
    transport_for = _transport_for(cfg, accept_new_host_keys)
    if plan_only:
        # Peers are in play only as the warm itself would use them (two agents or more):
        # a plan of local or ssh nodes must not promise relaying that will not happen.
        in_play = planning.wants_plan(reg.nodes, peers)
        planned = asyncio.run(planning.plan_region(reg, rel, transport_for, ref=ref, peers=in_play, parallel=parallel))
        if json_:
            emit_json(planned.to_dict())
        else:
            render_plan(planned)
        return
    display = make_display(quiet(ctx), json_)
    if not json_:
        say(ctx, f"warming {rel.ref} ({rel.digest[:19]}…) on {plural(len(reg.nodes), 'node')} of {reg.name}")
    report = asyncio.run(
        orchestrate.warm_region(
            reg,
            rel,
            req,
            transport_for,
            ref=ref,
            min_ready=required,
            parallel=parallel,
            timeout=seconds,
            retries=retries,
            detach=not wait,
            peers=peers,
            display=display,
        )
    )
    # GitHub outputs derive from the --json document, so that they never disagree.
    if to_github:
        github.fleet("warm", report.to_dict())
    if json_:
        emit_json(report.to_dict())
    else:
        render_warm(report)
    if not report.ok:
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

    from weightship.cli import github
    from weightship.cli.render import render_status, render_waiting
    from weightship.fleet import orchestrate

    to_github = github.enabled(output_github)
    required = parse_option("--require", orchestrate.parse_share, require)
    seconds = _timeout(timeout)
    cfg, fl = _fleet(ctx, fleet)
    regions = _select(fl, region)
    queries = orchestrate.status_queries(regions, ref, lambda reg: _store_url(cfg, store, reg), verify=verify)
    report = asyncio.run(
        orchestrate.status_regions(
            regions,
            queries,
            _transport_for(cfg, accept_new_host_keys),
            ref=ref,
            require=required,
            watch=watch,
            interval=interval,
            timeout=seconds,
            on_wait=None if json_ or quiet(ctx) else render_waiting,
        )
    )
    if to_github:
        github.fleet("status", report.to_dict())
    if json_:
        emit_json(report.to_dict())
    else:
        render_status(report)
    if not report.ok:
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

    from weightship.cli.render import render_gc
    from weightship.fleet import orchestrate

    cfg, fl = _fleet(ctx, fleet)
    reg = fl.region(region)
    transport_for = _transport_for(cfg, accept_new_host_keys)
    report = asyncio.run(orchestrate.gc_region(reg, transport_for, keep=keep, dry_run=dry_run))
    if json_:
        emit_json(report.to_dict())
    else:
        render_gc(report)
    if not report.ok:
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
    from weightship.cli.render import render_fleet

    _, fl = _fleet(ctx, fleet)
    regions = _select(fl, region)
    if json_:
        emit_json(
            {
                "schema": "weightship.fleet-ls/v1",
                "source": str(fl.source) if fl.source else None,
                "regions": {r.name: _region_doc(r) for r in regions},
            }
        )
        return
    render_fleet(regions)


def _region_doc(r: Region) -> dict[str, Any]:
    doc: dict[str, Any] = {"store": r.store, "nodes": [n.to_dict() for n in r.nodes]}
    if r.kubernetes is not None:
        # The nodes above were discovered just now; this is where and how they were looked for.
        doc["kubernetes"] = r.kubernetes.to_dict()
    return doc
