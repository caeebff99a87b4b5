"""Checking files against a signature: the same rules for a directory and a release."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from weightship.artifact import hashing, pack
from weightship.artifact.manifest import SINGLE_FILE_RESOURCE, check_relpath
from weightship.errors import IntegrityError, ModelError, SignatureError, UsageError
from weightship.trust.bundle import verify_bundle
from weightship.trust.policy import TrustPolicy, Verified


def compare(signed: dict[str, str], actual: dict[str, str], where: str) -> None:
    """Raise naming the first file that differs between what was signed and what is here.

    A signature of a single file names it "." (as model_signing does): it matches when
    ``where`` holds exactly one file, whatever that file is called, with that content.
    A release of one file, pulled or warmed, is a directory holding that file."""
    if list(signed) == [SINGLE_FILE_RESOURCE]:
        if len(actual) != 1:
            raise IntegrityError(
                f"the signature covers a single file, but {where} holds {len(actual)} files",
                "verify the file itself, not a directory",
            )
        signed = {next(iter(actual)): signed[SINGLE_FILE_RESOURCE]}
    for path in sorted(set(signed) | set(actual)):
        if path not in actual:
            raise IntegrityError(f"{path}: signed but missing from {where} (removed or renamed)")
        if path not in signed:
            raise IntegrityError(f"{path}: in {where} but not covered by the signature (added)")
        if signed[path] != actual[path]:
            raise IntegrityError(f"{path}: content differs from what was signed (sha256 mismatch)")


def safe_ignores(statement_ignores: Iterable[str], resources: Iterable[str]) -> list[str]:
    """The signature's ignore paths are untrusted input: each must be a relative path
    inside the directory, and none may hide a file the signature lists."""
    out = []
    for raw in statement_ignores:
        rel = raw.strip("/")
        try:
            check_relpath(rel)
        except Exception:
            raise SignatureError(f"signature ignore path {raw!r} points outside the model") from None
        out.append(rel)
    for res in resources:
        if res == SINGLE_FILE_RESOURCE:
            continue  # a single file: nothing is walked, so nothing can be hidden
        if pack.is_ignored(res, out):
            raise SignatureError(f"signature ignore paths hide {res!r}, a file it also signs")
    return out


def verify_directory(
    root: Path,
    policy: TrustPolicy,
    *,
    signature: Path | None = None,
    ignore: Iterable[str | Path] = (),
    progress: hashing.Progress | None = None,
) -> Verified:
    """Verify a model directory against its OMS signature (default ``ROOT/model.sig``),
    or a single model file against its own (default ``FILE.sig``, see :func:`signature_path`)."""
    root = Path(root)
    if not root.exists():
        # Else a mistyped path reads as an unsigned model: "missing.gguf/model.sig: no signature".
        raise ModelError(f"{root}: no such file or directory", "pass the model directory or file")
    sig_path = signature or signature_path(root)
    try:
        bundle = sig_path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{sig_path}: no signature", "sign the model first (weightship sign)") from None
    except OSError as e:
        raise UsageError(f"cannot read {sig_path}: {e.strerror}") from None
    verified = verify_bundle(bundle, policy)
    st = verified.statement
    if root.is_file():
        if list(ignore):
            raise UsageError(f"--ignore applies to a model directory, and {root} is a file")
        digest, _ = hashing.sha256_files([root], progress=progress)[root]
        compare(st.resources, {root.name: digest}, str(root))
        return verified
    ignores = pack.normalise_ignores(root, ignore)
    for rel in safe_ignores(st.ignore_paths, st.resources):
        if rel not in ignores:
            ignores.append(rel)
    local, _ = pack.walk(root, ignores)
    hashed = hashing.sha256_files(local.values(), progress=progress)
    actual = {rel: hashed[path][0] for rel, path in local.items()}
    compare(st.resources, actual, str(root))
    return verified


def signature_path(model: Path) -> Path:
    """Where a model's signature lies unless told: ``DIR/model.sig`` for a directory (as
    model_signing writes it), ``FILE.sig`` beside a single file (``model.gguf.sig``), since a
    file has no inside, and a fixed name beside it would be shared by every file there."""
    model = Path(model)
    if model.is_file():
        return model.with_name(model.name + ".sig")
    return model / pack.SIGNATURE_FILE
