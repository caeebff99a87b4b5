"""The ``weightship`` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function, and renders the result
as text or ``--json``. Errors are :class:`~weightship.errors.WeightshipError` and are
printed as one line; exit codes are 0 (success), 1 (failure), 2 (usage).
"""

from __future__ import annotations

import enum
import gc
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from weightship import __version__
from weightship.errors import UsageError, WeightshipError

# A command loads botocore and its service models, cryptography and more: hundreds of
# thousands of objects that live as long as the process, which the default thresholds
# (a collection every 700 allocations) made the cycle collector walk again and again.
# Measured: 0.03-0.05 s of a 0.5 s `pull`. Cycles are still collected, less often.
gc.set_threshold(50_000, 20, 20)

app = typer.Typer(
    name="weightship",
    help="Model weights as signed, versioned build artifacts: publish, warm onto GPU nodes, gate on status.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich help rendering alone costs more than the 0.3 s start-up budget.
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    config: Path | None = None
    quiet: bool = False


def _version(value: bool) -> None:
    if value:
        print(f"weightship {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="weightship.toml to use (default: ./weightship.toml).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = Globals(config=config, quiet=quiet)


# -- shared helpers (also used by the fleet commands) ----------------------------------


def globals_(ctx: typer.Context) -> Globals:
    return ctx.obj if isinstance(ctx.obj, Globals) else Globals()


def load_config(ctx: typer.Context):
    from weightship import config

    return config.load(globals_(ctx).config)


def reporter(ctx: typer.Context, json_mode: bool = False):
    from weightship.progress import make_reporter

    return make_reporter(quiet=globals_(ctx).quiet, json_mode=json_mode)


def open_store(ctx: typer.Context, flag: str | None):
    from weightship.store import open_store as _open

    return _open(load_config(ctx).store_url(flag))


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def say(ctx: typer.Context, text: str) -> None:
    if not globals_(ctx).quiet:
        print(text)


def build_policy(
    ctx: typer.Context,
    keys: list[Path] | None = None,
    cert_chains: list[Path] | None = None,
    identity: str | None = None,
    issuer: str | None = None,
    identity_regex: str | None = None,
    offline: bool | None = None,
):
    """The configured [policy] plus whatever the command line adds."""
    from weightship.trust.policy import Identity, TrustPolicy

    cfg = load_config(ctx).policy()
    idents = []
    if identity or identity_regex:
        if not issuer:
            raise UsageError("--identity needs --issuer", "e.g. --issuer https://token.actions.githubusercontent.com")
        idents.append(Identity(issuer=issuer, identity=identity, identity_regex=identity_regex))
    elif issuer:
        raise UsageError("--issuer needs --identity or --identity-regex")
    flags = TrustPolicy(keys=list(keys or []), cert_chains=list(cert_chains or []), identities=idents)
    policy = cfg.merged(flags)
    if offline is not None:
        policy.offline = offline
    return policy


# Option types shared by several commands.
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store URL: file://PATH, s3://BUCKET/PREFIX or az://CONTAINER/PREFIX (env WEIGHTSHIP_STORE).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON document.")]
GithubOpt = Annotated[
    bool | None,
    typer.Option(
        "--output-github/--no-output-github",
        help="Write GitHub Actions step outputs ($GITHUB_OUTPUT) and a job summary ($GITHUB_STEP_SUMMARY); "
        "on by default when GITHUB_OUTPUT is set.",
        show_default=False,
    ),
]
IgnoreOpt = Annotated[
    list[str] | None, typer.Option("--ignore", help="Path (relative to DIR) to leave out; repeatable.")
]
VerifyKeyOpt = Annotated[
    list[Path] | None, typer.Option("--key", help="Trusted public key (PEM); repeatable.", show_default=False)
]
CertChainOpt = Annotated[
    list[Path] | None, typer.Option("--cert-chain", help="Trusted CA certificates (PEM) for certificate signatures.")
]
IdentityOpt = Annotated[str | None, typer.Option("--identity", help="Sigstore signer identity (e-mail or URI).")]
IdentityRegexOpt = Annotated[
    str | None, typer.Option("--identity-regex", help="Sigstore signer identity as a regular expression.")
]
IssuerOpt = Annotated[str | None, typer.Option("--issuer", help="OIDC issuer of the Sigstore identity.")]
OfflineOpt = Annotated[
    bool | None,
    typer.Option(
        "--offline/--online",
        help="Verify Sigstore signatures with the trusted root shipped with weightship, or refresh it (TUF).",
        show_default=False,
    ),
]
SignKeyOpt = Annotated[Path | None, typer.Option("--key", help="Private EC key (PEM) to sign with.")]
KeyPasswordOpt = Annotated[
    str | None, typer.Option("--key-password", envvar="WEIGHTSHIP_KEY_PASSWORD", help="Password of the private key.")
]
SignCertOpt = Annotated[
    Path | None, typer.Option("--cert-chain", help="Certificate chain of the signing key (PEM, leaf first).")
]
SigstoreOpt = Annotated[bool, typer.Option("--sigstore", help="Sign keyless with Sigstore (OIDC identity).")]
TokenOpt = Annotated[
    str | None, typer.Option("--identity-token", envvar="WEIGHTSHIP_IDENTITY_TOKEN", help="OIDC token for Sigstore.")
]
StagingOpt = Annotated[bool, typer.Option("--staging", help="Use Sigstore's staging instance.")]
TrustConfigOpt = Annotated[
    Path | None, typer.Option("--trust-config", help="Sigstore client trust configuration (JSON).")
]


def make_signer(
    ctx: typer.Context,
    key: Path | None,
    password: str | None,
    cert_chain: Path | None,
    sigstore: bool,
    token: str | None,
    staging: bool,
    trust_config: Path | None,
    *,
    required: bool,
):
    from weightship.trust import signers as signing

    key = load_config(ctx).signing_key(key) if not sigstore else key
    if sigstore and key:
        raise UsageError("--key and --sigstore both given", "choose one way to sign")
    if sigstore:
        from weightship.trust import sigstore as keyless

        return keyless.SigstoreSigner(identity_token=token, staging=staging, trust_config=trust_config)
    if key is None:
        if required:
            raise UsageError("nothing to sign with", "pass --key KEY.pem or --sigstore")
        return None
    if cert_chain:
        return signing.CertificateSigner(key, cert_chain, password)
    return signing.KeySigner(key, password)


# -- commands --------------------------------------------------------------------------


@app.command()
def pack(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Model directory.")],
    ignore: IgnoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Hash a model directory and print its manifest (nothing is written)."""
    from weightship.artifact import pack as _pack
    from weightship.progress import human_bytes

    rep = reporter(ctx, json_)
    total = _tree_size(directory)
    with rep.task("hashing", total) as advance:
        packed = _pack.pack(directory, ignore=ignore or [], progress=advance)
    m = packed.manifest
    if json_:
        emit_json(m.to_dict())
        return
    for f in m.files:
        extra = ""
        if f.safetensors:
            st = f.safetensors
            extra = f"  {st.tensors} tensors, {st.parameters:,} params, {','.join(sorted(st.dtypes))}"
        print(f"{f.sha256[:16]}  {human_bytes(f.size):>10}  {f.path}{extra}")
    print(f"{len(m.files)} files, {human_bytes(m.total_size)}")


def _tree_size(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    except OSError:
        return 0


@app.command()
def sign(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Model directory.")],
    key: SignKeyOpt = None,
    key_password: KeyPasswordOpt = None,
    cert_chain: SignCertOpt = None,
    sigstore: SigstoreOpt = False,
    identity_token: TokenOpt = None,
    staging: StagingOpt = False,
    trust_config: TrustConfigOpt = None,
    ignore: IgnoreOpt = None,
    signature: Annotated[
        Path | None, typer.Option("--signature", help="Where to write (default DIR/model.sig).")
    ] = None,
) -> None:
    """Sign a model directory in OpenSSF Model Signing format (writes DIR/model.sig)."""
    from weightship import release
    from weightship.artifact import pack as _pack
    from weightship.store.file import atomic_write

    signer = make_signer(
        ctx, key, key_password, cert_chain, sigstore, identity_token, staging, trust_config, required=True
    )
    rep = reporter(ctx)
    with rep.task("hashing", _tree_size(directory)) as advance:
        packed = _pack.pack(directory, ignore=ignore or [], progress=advance)
    bundle = release.sign_packed(packed, signer)
    out = signature or Path(directory) / _pack.SIGNATURE_FILE
    atomic_write(out, bundle)
    say(ctx, f"signed {len(packed.manifest.files)} files ({signer.method}): {out}")


@app.command()
def verify(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Model directory.")],
    key: VerifyKeyOpt = None,
    cert_chain: CertChainOpt = None,
    identity: IdentityOpt = None,
    identity_regex: IdentityRegexOpt = None,
    issuer: IssuerOpt = None,
    offline: OfflineOpt = None,
    signature: Annotated[
        Path | None, typer.Option("--signature", help="Signature file (default DIR/model.sig).")
    ] = None,
    ignore: IgnoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check a model directory against its signature: every byte, name, added or removed file."""
    from weightship.trust.verify import verify_directory

    policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex, offline)
    if not policy.required:
        raise UsageError(
            "no trusted signer given", "pass --key PUB.pem, --cert-chain CA.pem, or --identity ID --issuer URL"
        )
    rep = reporter(ctx, json_)
    with rep.task("hashing", _tree_size(directory)) as advance:
        verified = verify_directory(directory, policy, signature=signature, ignore=ignore or [], progress=advance)
    if json_:
        emit_json(
            {
                "schema": "weightship.verify/v1",
                "verified": True,
                "files": len(verified.statement.resources),
                "signer": verified.signer.to_dict(),
            }
        )
    else:
        say(ctx, f"verified {len(verified.statement.resources)} files, signed by {verified.signer.describe()}")


@app.command()
def publish(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(metavar="SOURCE", help="Model directory, or hf://ORG/MODEL[@REVISION] on the Hugging Face Hub."),
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
    json_: JsonOpt = False,
    output_github: GithubOpt = None,
) -> None:
    """Pack, sign and push a model directory; unchanged blobs are not uploaded again."""
    from weightship import release
    from weightship.artifact import provenance
    from weightship.cli import github
    from weightship.progress import human_bytes

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

    store_url = load_config(ctx).store_url(store)
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
    )
    if to_github:
        github.publish(result.to_dict())
    if json_:
        emit_json(result.to_dict())
        return
    say(
        ctx,
        f"uploaded {human_bytes(result.bytes_uploaded)} in {result.blobs_uploaded} blobs, "
        f"skipped {human_bytes(result.bytes_skipped)} already in the store",
    )
    tags_txt = f" (tags: {', '.join(result.tags)})" if result.tags else ""
    say(ctx, f"published {result.name}:{result.version}{tags_txt} [{result.signed}]")
    print(result.digest)


@app.command("ls")
def ls_(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Model name; all models when omitted.")] = None,
    store: StoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List models, or one model's versions and tags."""
    from weightship import release

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
    for m, d in doc.items():
        by_version: dict[str, list[str]] = {}
        for t, v in d["tags"].items():
            by_version.setdefault(v, []).append(t)
        for v in d["versions"]:
            t = by_version.get(v)
            print(f"{m}:{v}" + (f"  <- {', '.join(sorted(t))}" if t else ""))


@app.command()
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
    from weightship.progress import human_bytes
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
    m = rel.manifest
    print(f"release   {rel.name}:{rel.version}")
    print(f"digest    {rel.digest}")
    print(f"created   {m.created}")
    print(f"signed    {m.signature}: {signer_text}")
    for k, v in sorted(m.source.items()):
        print(f"source    {k}: {v}")
    print(f"files     {len(m.files)}, {human_bytes(m.total_size)}")
    for f in m.files:
        extra = ""
        if f.safetensors:
            s = f.safetensors
            extra = f"  {s.tensors} tensors, {s.parameters:,} params, {','.join(sorted(s.dtypes))}"
        print(f"  {f.sha256[:16]}  {human_bytes(f.size):>10}  {f.path}{extra}")


@app.command()
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
    rel = release.move_tag(st, ref, new_tag)
    if json_:
        emit_json(
            {
                "schema": "weightship.tag/v1",
                "name": rel.name,
                "tag": new_tag,
                "version": rel.version,
                "digest": rel.digest,
            }
        )
        return
    say(ctx, f"{rel.name}:{new_tag} -> {rel.version} ({rel.digest})")


@app.command()
def pull(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION, NAME:TAG or NAME@sha256:HEX.")],
    dest: Annotated[Path, typer.Argument(help="New directory to materialise the release into.")],
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
    json_: JsonOpt = False,
) -> None:
    """Download a release into DEST, verifying every sha256 (and the signature under the policy)."""
    from weightship import release
    from weightship.progress import human_bytes

    policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex, offline)
    st = open_store(ctx, store)
    result = release.pull(st, ref, dest, policy=policy, reporter=reporter(ctx, json_), sync=sync)
    if json_:
        emit_json(result.to_dict())
        return
    signed = f", signature verified ({result.signer.get('method')})" if result.signer else ""
    say(
        ctx,
        f"pulled {result.ref} ({result.version}) into {result.dest}: {result.files} files, "
        f"{human_bytes(result.total_bytes)}, every sha256 verified{signed}",
    )


class Curve(str, enum.Enum):
    p256 = "P-256"
    p384 = "P-384"
    p521 = "P-521"


@app.command()
def keygen(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(help="Where to write the private key, e.g. release.pem; the public key goes beside it (.pub)."),
    ],
    curve: Annotated[Curve, typer.Option("--curve", help="Elliptic curve of the key.")] = Curve.p256,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key pair at PATH (the old private key is lost).")
    ] = False,
) -> None:
    """Generate an EC signing key pair for weightship sign/publish --key."""
    from weightship.trust import signers as signing

    pub = signing.generate_key(path, curve.value, force=force)
    say(ctx, f"private key {path} (keep it secret), public key {pub}")


@app.command()
def demo(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option("--dir", help="Workspace (default: a new temporary one).")] = None,
) -> None:
    """Run the whole pipeline on an embedded file:// store: build, sign, publish, pull, verify."""
    from weightship import demo as _demo
    from weightship.progress import Reporter

    # The demo narrates each step itself; transfer bars would only bury the story.
    _demo.run(directory, Reporter(), out=lambda line: say(ctx, line))


def _register_extensions() -> None:
    # Fleet commands (warm, status, gc, node, agent, fleet) live in their own module.
    try:
        from weightship.cli import fleet as cli_fleet
    except ImportError:
        return
    cli_fleet.register(app)


_register_extensions()


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    """The ``weightship`` command."""
    import contextlib
    import signal

    def interrupted(signum: int, frame: object) -> None:
        # Straight to the file descriptor: the main thread may have been stopped halfway
        # through a write to sys.stderr, which a second write would find locked.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        restore = "\x1b[?25h\n" if sys.stderr.isatty() else ""  # rich hides the cursor under its bars
        with contextlib.suppress(OSError):
            os.write(2, f"{restore}error: interrupted; re-run the same command to resume\n".encode())
        os._exit(130)

    # Ctrl-C stops the process at once. Left to Python, the KeyboardInterrupt reaches the
    # main thread only, Typer turns it into a silent exit 130, and the interpreter waits
    # for the worker threads still uploading or fetching (seconds). Nothing is lost by not
    # waiting: every write is resumable or atomic (S3 multipart parts, partial files
    # renamed into place). A SIGINT the shell ignored (a background job) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted)
    try:
        _run()
    except SystemExit as e:
        _leave(e)
    _leave(SystemExit(0))


def _leave(done: SystemExit) -> NoReturn:
    """Exit without tearing the interpreter down once nothing is left running.

    Finalizing a process that loaded botocore, cryptography and their kin frees hundreds
    of thousands of objects one by one: measured, 0.1-0.18 s after a pull or publish had
    finished, on every command. Once the exit handlers have run, the output is flushed
    and no other thread is alive, nothing of that teardown is needed; otherwise (another
    thread still working, an interpreter without the hook) the normal exit it is."""
    import atexit
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or threading.active_count() > 1 or not isinstance(done.code, int | None):
        raise done
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout:
                raise done from None  # a closed pipe: let the normal exit report it
    os._exit(done.code or 0)


def _run() -> None:
    try:
        app()
    except WeightshipError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; re-run the same command to resume", 130)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
    except Exception as e:  # a bug: still one line unless asked for the traceback
        if os.environ.get("WEIGHTSHIP_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e} (set WEIGHTSHIP_DEBUG=1 for a traceback and report it)")
