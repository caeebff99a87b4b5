"""Commands on a model directory or a single model file: ``pack``, ``sign``, ``verify``,
and ``keygen`` for the key that signs it. Nothing here touches a store."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from weightship.cli.options import (
    CertChainOpt,
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
    TokenOpt,
    TrustConfigOpt,
    VerifyKeyOpt,
    build_policy,
    emit_json,
    load_config,
    make_signer,
    reporter,
    say,
)
from weightship.errors import UsageError
from weightship.progress import human_bytes, plural

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Model directory, or a single model file.")]


def tree_size(directory: Path) -> int:
    """Bytes under ``directory`` (or of a single file): the total of a hashing progress bar
    (0 when unreadable)."""
    directory = Path(directory)
    try:
        if directory.is_file():
            return directory.stat().st_size
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    except OSError:
        return 0


def pack(
    ctx: typer.Context,
    directory: ModelArg,
    ignore: IgnoreOpt = None,
    refuse_pickle: RefusePickleOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Hash a model directory or file, check its headers, and print its manifest (nothing is written)."""
    from weightship.artifact import pack as _pack
    from weightship.cli.render import render_files

    mode = load_config(ctx).pickle_mode(refuse_pickle)
    rep = reporter(ctx, json_)
    with rep.task("hashing", tree_size(directory)) as advance:
        packed = _pack.pack(directory, ignore=ignore or [], progress=advance, pickle=mode)
    for warning in packed.warnings:
        rep.warn(warning)  # standard error: a --json document stays clean
    m = packed.manifest
    if json_:
        emit_json(m.to_dict())
        return
    render_files(m)
    print(f"{plural(len(m.files), 'file')}, {human_bytes(m.total_size)}")


def sign(
    ctx: typer.Context,
    directory: ModelArg,
    key: SignKeyOpt = None,
    key_password: KeyPasswordOpt = None,
    cert_chain: SignCertOpt = None,
    sigstore: SigstoreOpt = False,
    identity_token: TokenOpt = None,
    staging: StagingOpt = False,
    trust_config: TrustConfigOpt = None,
    ignore: IgnoreOpt = None,
    signature: Annotated[
        Path | None,
        typer.Option("--signature", help="Where to write (default DIR/model.sig, or FILE.sig for a single file)."),
    ] = None,
) -> None:
    """Sign a model in OpenSSF Model Signing format (writes DIR/model.sig, or FILE.sig for one file)."""
    from weightship import release
    from weightship.artifact import pack as _pack
    from weightship.store.file import atomic_write
    from weightship.trust.verify import signature_path

    signer = make_signer(
        ctx, key, key_password, cert_chain, sigstore, identity_token, staging, trust_config, required=True
    )
    rep = reporter(ctx)
    with rep.task("hashing", tree_size(directory)) as advance:
        # Signing vouches for bytes, whatever their format: no pickle warnings here.
        packed = _pack.pack(directory, ignore=ignore or [], progress=advance, pickle="allow")
    bundle = release.sign_packed(packed, signer)
    out = signature or signature_path(directory)
    atomic_write(out, bundle)
    say(ctx, f"signed {plural(len(packed.manifest.files), 'file')} ({signer.method}): {out}")


def verify(
    ctx: typer.Context,
    directory: ModelArg,
    key: VerifyKeyOpt = None,
    cert_chain: CertChainOpt = None,
    identity: IdentityOpt = None,
    identity_regex: IdentityRegexOpt = None,
    issuer: IssuerOpt = None,
    offline: OfflineOpt = None,
    signature: Annotated[
        Path | None,
        typer.Option("--signature", help="Signature file (default DIR/model.sig, or FILE.sig for a single file)."),
    ] = None,
    ignore: IgnoreOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check a model directory or file against its signature: every byte, name, added or removed file."""
    from weightship.trust.verify import verify_directory

    policy = build_policy(ctx, key, cert_chain, identity, issuer, identity_regex, offline)
    if not policy.required:
        raise UsageError(
            "no trusted signer given", "pass --key PUB.pem, --cert-chain CA.pem, or --identity ID --issuer URL"
        )
    rep = reporter(ctx, json_)
    with rep.task("hashing", tree_size(directory)) as advance:
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
        files = plural(len(verified.statement.resources), "file")
        say(ctx, f"verified {files}, signed by {verified.signer.describe()}")


class Curve(str, enum.Enum):
    p256 = "P-256"
    p384 = "P-384"
    p521 = "P-521"


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
