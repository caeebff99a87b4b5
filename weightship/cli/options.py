"""What the commands share: the global options, option types, and small helpers that turn
options into library objects (config, store, trust policy, signer, reporter).

Command modules import this and :mod:`weightship.cli.render`, never :mod:`weightship.cli.app`.
Only typer is imported at the top: ``weightship --help`` must stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from weightship.errors import UsageError

if TYPE_CHECKING:
    from weightship.config import Config
    from weightship.progress import Reporter
    from weightship.store.base import Store
    from weightship.trust.policy import TrustPolicy
    from weightship.trust.signers import Signer

T = TypeVar("T")


@dataclass
class Globals:
    """The options given before the command (``weightship --config F -q COMMAND``);
    ``-q`` may also follow the command (:func:`anywhere`)."""

    config: Path | None = None
    quiet: bool = False
    # --json before the command: the command's own --json, given early.
    json: bool = False


QUIET_HELP = "Only errors and results."
JSON_HELP = "Print a machine-readable JSON document."


def anywhere(group: Any) -> None:
    """Let ``-q``/``--quiet`` and ``--json`` follow the command as well as precede it.

    Every command under ``group`` (the Typer-built tree of ``weightship``) gets its own
    ``-q``, which sets the global flag, so that it shows in the command's ``--help`` and
    in the shell completions generated from the tree. ``--json`` before the command
    reaches the command's own ``--json`` through :func:`json_defaults`; a command that has
    no JSON document refuses it, rather than print text to a script expecting JSON.
    """
    from typer.core import TyperOption

    for cmd in group.commands.values():
        if getattr(cmd, "commands", None) is not None:  # a group: typer's own click, not click
            anywhere(cmd)
            continue
        if not any(p.name == "quiet" for p in cmd.params):
            cmd.params.append(
                TyperOption(
                    param_decls=["-q", "--quiet", "quiet"],
                    is_flag=True,
                    default=False,
                    expose_value=False,
                    callback=_set_quiet,
                    help=f"{QUIET_HELP} Also accepted before the command.",
                )
            )
        if not any(p.name == "json_" for p in cmd.params):
            cmd.invoke = _refusing_json(cmd.invoke)


def json_defaults(group: Any) -> dict[str, Any]:
    """The click ``default_map`` that turns on ``--json`` in every command under ``group``
    that has it: what ``weightship --json COMMAND`` means."""
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None) is not None:
            out[name] = json_defaults(cmd)
        elif any(p.name == "json_" for p in cmd.params):
            out[name] = {"json_": True}
    return out


def _set_quiet(ctx: typer.Context, param: Any, value: bool) -> None:
    if value and isinstance(ctx.obj, Globals):
        ctx.obj.quiet = True


def _refusing_json(invoke: Callable[[typer.Context], Any]) -> Callable[[typer.Context], Any]:
    def run(ctx: typer.Context) -> Any:
        if isinstance(ctx.obj, Globals) and ctx.obj.json:
            raise UsageError(f"--json: {ctx.command_path} prints no JSON document", "leave --json out")
        return invoke(ctx)

    return run


def globals_(ctx: typer.Context) -> Globals:
    return ctx.obj if isinstance(ctx.obj, Globals) else Globals()


def quiet(ctx: typer.Context) -> bool:
    return globals_(ctx).quiet


def load_config(ctx: typer.Context) -> Config:
    from weightship import config

    return config.load(globals_(ctx).config)


def reporter(ctx: typer.Context, json_mode: bool = False) -> Reporter:
    from weightship.cli.render import make_reporter

    return make_reporter(quiet=globals_(ctx).quiet, json_mode=json_mode)


def open_store(ctx: typer.Context, flag: str | None) -> Store:
    from weightship.store import open_store as _open

    return _open(load_config(ctx).store_url(flag))


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def say(ctx: typer.Context, text: str) -> None:
    if not globals_(ctx).quiet:
        print(text)


def parse_option(flag: str, parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``, its UsageError or ValueError given the flag it came from
    (the library's messages name the value, not the option)."""
    try:
        return parse(text)
    except (UsageError, ValueError) as e:
        raise UsageError(f"{flag} {e}" if isinstance(e, UsageError) else f"{flag}: {e}") from None


def build_policy(
    ctx: typer.Context,
    keys: list[Path] | None = None,
    cert_chains: list[Path] | None = None,
    identity: str | None = None,
    issuer: str | None = None,
    identity_regex: str | None = None,
    offline: bool | None = None,
) -> TrustPolicy:
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
) -> Signer | None:
    """The signer the options name (``--key``, ``--sigstore`` or the configured key);
    None when there is none and ``required`` is False."""
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


# -- option types shared by several commands ---------------------------------------------

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help=(
            "Store URL: file://PATH, s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or oci://HOST/NAMESPACE "
            "(env WEIGHTSHIP_STORE)."
        ),
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help=f"{JSON_HELP} Also accepted before the command.")]
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
RefusePickleOpt = Annotated[
    bool,
    typer.Option(
        "--refuse-pickle",
        help="Fail on pickle files (.bin/.pt/.pth/.ckpt/.pkl: loading them runs code); "
        "default: [publish] pickle in weightship.toml, else warn.",
    ),
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
# The node side (node …, agent serve).
CacheOpt = Annotated[Path, typer.Option("--cache", help="The node cache directory.")]
PolicyFileOpt = Annotated[
    Path | None,
    typer.Option("--policy", help="weightship.toml whose [policy] this node enforces (default: the usual config)."),
]
CapacityOpt = Annotated[
    str | None, typer.Option("--capacity", help="Most the cache may use, e.g. 500G (default: the whole disk).")
]
