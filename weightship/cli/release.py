"""Commands on releases in a store: ``publish``, ``ls``, ``show``, ``tag``, ``rm``,
``untag``, ``pull``, ``prune``; and ``demo``, the whole pipeline on a store of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightship.cli.options import (
    CertChainOpt,
    GithubOpt,
    IdentityOpt,
    IdentityRegexOpt,
    IgnoreOpt,
    IssuerOpt,
    JsonOpt,
    KeyPasswordOpt,
    OfflineOpt,
    RefusePickleOpt,
    SignCertOpt,
    SignKeyOpt,
    SigstoreOpt,
    StagingOpt,
    StoreOpt,
    TokenOpt,
    TrustConfigOpt,
    VerifyKeyOpt,
    build_policy,
    emit_json,
    load_config,
    make_signer,
    open_store,
    parse_option,
    reporter,
    say,
)
from weightship.errors import UsageError
from weightship.progress import human_bytes, plural


def publish(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="Model directory, a single model file, or hf://ORG/MODEL[@REVISION] on the Hugging Face Hub.",
        ),
    ],
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to publish as.", metavar="NAME:VERSION")],
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Tag to point at it; repeatable.")] = None,
    key: SignKeyOpt = None,
    key_password: KeyPasswordOpt = None,
    cert_chain: SignCertOpt = None,
    sigstore: SigstoreOpt = False,
    identity_token: TokenOpt = None,
    staging: StagingOpt = False,
    trust_config: TrustConfigOpt = None,
    store: StoreOpt = None,
    ignore: IgnoreOpt = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="hf:// only: glob of Hub files to take; repeatable.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="hf:// only: glob of Hub files to leave out; repeatable.")
    ] = None,
    rehash: Annotated[
        bool,
        typer.Option("--rehash", help="Hash every file, even those the digest cache knows unchanged."),
    ] = False,
    refuse_pickle: RefusePickleOpt = False,
    json_: JsonOpt = False,
    output_github: GithubOpt = None,
) -> None:
    """Pack, sign and push a model directory or file; unchanged blobs are not uploaded again."""
    from weightship import release
    from weightship.artifact import provenance
    from weightship.cli import github

    # Checked before any work, so that a misplaced --output-github costs no upload.
    to_github = github.enabled(output_github)
    signer = make_signer(
        ctx, key, key_password, cert_chain, sigstore, identity_token, staging, trust_config, required=False
    )
    rep = reporter(ctx, json_)
    source_info = provenance.collect()
    packed = None
    cache = None
    if source.startswith("hf://"):
        from weightship.artifact import hub

        snap = hub.snapshot(source, include=include or [], exclude=exclude or [], ignore=ignore or [], reporter=rep)
        packed = snap.packed
        source_info.update(snap.source_info)
    elif include or exclude:
        raise UsageError("--include and --exclude apply to hf:// sources", "use --ignore for a directory")
    elif not rehash:
        from weightship.artifact.digestcache import DigestCache

        cache = DigestCache(Path(source))
    from weightship.store import open_store as open_url
    from weightship.store import takes_chunk_crc32

    cfg = load_config(ctx)
    store_url = cfg.store_url(store)
    result = release.publish(
        Path(source),
        ref,
        lambda: open_url(store_url),
        tags_=tag or [],
        signer=signer,
        ignore=ignore or [],
        source_info=source_info,
        reporter=rep,
        packed=packed,
        cache=cache,
        chunk_crc32=takes_chunk_crc32(store_url),
        # Pickle warnings reach standard error through the reporter as the files are
        # checked (before the upload), and the --json document as "warnings".
        pickle=cfg.pickle_mode(refuse_pickle),
    )
    if to_github:
        github.publish(result.to_dict())
    if json_:
        emit_json(result.to_dict())
        return
    say(
        ctx,
        f"uploaded {human_bytes(result.bytes_uploaded)} in {plural(result.blobs_uploaded, 'blob')}, "
        f"skipped {human_bytes(result.bytes_skipped)} already in the store",
    )
    tags_txt = f" (tags: {', '.join(result.tags)})" if result.tags else ""
    if result.already_published:
        # A retried publish: the store already had this very release; not an error.
        say(ctx, f"{result.name}:{result.version} was already published with these files{tags_txt} [{result.signed}]")
    else:
        say(ctx, f"published {result.name}:{result.version}{tags_txt} [{result.signed}]")
    print(result.digest)


def ls(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Model name; all models when omitted.")] = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List models, or one model's versions and tags."""
    from weightship import release
    from weightship.cli.render import render_models

    st = open_store(ctx, store)
    models = [name] if name else release.names(st)
    doc = {m: {"versions": release.versions(st, m), "tags": release.tags(st, m)} for m in models}
    if name and not doc[name]["versions"]:
        from weightship.errors import NotFoundError

        raise NotFoundError(f"no releases of {name} in {st.url}")
    if json_:
        emit_json(doc)
        return
    if not doc:
        say(ctx, f"no releases in {st.url}")
    render_models(doc)


def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION, NAME:TAG or NAME@sha256:HEX.")],
    store: StoreOpt = None,
    key: VerifyKeyOpt = None,
    cert_chain: CertChainOpt = None,
    identity: IdentityOpt = None,
    identity_regex: IdentityRegexOpt = None,
    issuer: IssuerOpt = None,
    offline: OfflineOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show a release: digest, files, tensors, who signed it and where it came from."""
    from weightship import release
    from weightship.cli.render import render_release
    from weightship.trust.bundle import describe_unverified

    st = open_store(ctx, store)
    rel = release.resolve(st, ref)
    policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex, offline)
    if rel.signature is None:
        signer_text, signer_doc = "unsigned", {"verified": False}
    elif policy.required:
        info = release.check_signature(rel, policy)
        signer_text = f"{info.describe()} (verified)" if info else "unsigned"
        signer_doc = {"verified": True, **(info.to_dict() if info else {})}
    else:
        signer_text = describe_unverified(rel.signature)
        signer_doc = {"verified": False, "claimed": signer_text}
    if json_:
        doc = rel.manifest.to_dict()
        # Not a manifest any more (digest, signer and tags added): it gets its own schema.
        doc["schema"] = "weightship.show/v1"
        doc["digest"] = rel.digest
        doc["signer"] = signer_doc
        doc["tags"] = sorted(t for t, v in release.tags(st, rel.name).items() if v == rel.version)
        emit_json(doc)
        return
    render_release(rel, signer_text)


def tag(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Release to point at (NAME:VERSION, NAME:TAG, NAME@sha256:HEX).")],
    new_tag: Annotated[str, typer.Argument(metavar="TAG", help="Tag to move, e.g. prod.")],
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Point a tag at a release (tags move; versions never change)."""
    from weightship import release

    st = open_store(ctx, store)
    result = release.tag(st, ref, new_tag)
    if json_:
        emit_json(result.to_dict())
        return
    if result.previous is None:
        was = "new tag"
    elif result.previous == result.version:
        was = "unchanged"
    else:
        was = f"was {result.previous}"
    say(ctx, f"{result.name}:{result.tag} -> {result.version} ({result.digest}) ({was})")


def rm(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="The release to remove: NAME:VERSION or NAME@sha256:HEX.")],
    force: Annotated[
        bool, typer.Option("--force", help="Remove the tags pointing at it too (otherwise a tagged release is kept).")
    ] = False,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Remove a release; its blobs stay until prune collects them."""
    from weightship import release

    result = release.rm(open_store(ctx, store), ref, force=force)
    if json_:
        emit_json(result.to_dict())
        return
    tags_txt = f" and its tags {', '.join(result.tags_removed)}" if result.tags_removed else ""
    # A registry's own garbage collector frees blobs there (docs/format.md, OCI registries).
    freer = "the registry's garbage collector" if result.store.startswith("oci://") else "weightship prune"
    say(ctx, f"removed {result.name}:{result.version} ({result.digest}){tags_txt}; {freer} frees its blobs")


def untag(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="The tag to remove: NAME:TAG.", metavar="NAME:TAG")],
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Remove a tag (the release it pointed at stays)."""
    from weightship import release

    result = release.untag(open_store(ctx, store), ref)
    if json_:
        emit_json(result.to_dict())
        return
    say(ctx, f"removed tag {result.name}:{result.tag} (it pointed at {result.version})")


def prune(
    ctx: typer.Context,
    grace: Annotated[
        str,
        typer.Option("--grace", help="Keep what is younger than this (90s, 30m, 24h): publishes in flight need it."),
    ] = "24h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Delete blobs no release references (and signatures of removed releases) once older than --grace."""
    from datetime import timedelta

    from weightship import release
    from weightship.fleet.orchestrate import parse_duration

    period = timedelta(seconds=parse_option("--grace", parse_duration, grace) or 0)
    result = release.prune(open_store(ctx, store), grace=period, dry_run=dry_run, reporter=reporter(ctx, json_))
    if json_:
        emit_json(result.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    say(
        ctx,
        f"{verb} {plural(len(result.blobs), 'blob')}, {plural(len(result.signatures), 'signature')} and "
        f"{plural(len(result.leftovers), 'leftover')}: {human_bytes(result.bytes_freed)}; kept "
        f"{result.blobs_in_use} in use and {result.blobs_in_grace} younger than {grace}",
    )


def pull(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION, NAME:TAG or NAME@sha256:HEX.")],
    dest: Annotated[
        Path, typer.Argument(help="Directory to materialise the release into: new or empty, unless --force.")
    ],
    store: StoreOpt = None,
    key: VerifyKeyOpt = None,
    cert_chain: CertChainOpt = None,
    identity: IdentityOpt = None,
    identity_regex: IdentityRegexOpt = None,
    issuer: IssuerOpt = None,
    offline: OfflineOpt = None,
    sync: Annotated[
        bool,
        typer.Option(
            "--sync",
            help="fsync every file before DEST appears (at the disk's speed): a crash just after cannot lose it.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace a DEST that is not empty: swapped in once the new content is verified."),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Glob of the release's paths to pull (e.g. '*.json'); repeatable."),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob of the release's paths to leave out; repeatable.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Download a release into DEST, verifying every sha256 (and the signature under the policy)."""
    from weightship import release

    policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex, offline)
    st = open_store(ctx, store)
    result = release.pull(
        st,
        ref,
        dest,
        policy=policy,
        reporter=reporter(ctx, json_),
        sync=sync,
        force=force,
        include=include or [],
        exclude=exclude or [],
    )
    if json_:
        emit_json(result.to_dict())
        return
    signed = f", signature verified ({result.signer.get('method')})" if result.signer else ""
    # The version only when the ref did not name it (a tag or a digest).
    version = "" if result.ref.endswith(f":{result.version}") else f" ({result.version})"
    say(
        ctx,
        f"pulled {result.ref}{version} into {result.dest}: {plural(result.files, 'file')}, "
        f"{human_bytes(result.total_bytes)}, every sha256 verified{signed}",
    )


def demo(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option("--dir", help="Workspace (default: a new temporary one).")] = None,
) -> None:
    """Run the whole pipeline on an embedded file:// store: build, sign, publish, pull, verify."""
    from weightship import demo as _demo
    from weightship.progress import Reporter

    # The demo narrates each step itself; transfer bars would only bury the story.
    _demo.run(directory, Reporter(), out=lambda line: say(ctx, line))
