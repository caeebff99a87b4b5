"""Checking files against a signature: the same rules for a directory and a release."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from weightship.artifact import hashing, pack
from weightship.artifact.manifest import check_relpath
from weightship.errors import IntegrityError, SignatureError, UsageError
from weightship.trust.bundle import verify_bundle
from weightship.trust.policy import TrustPolicy, Verified


def compare(signed: dict[str, str], actual: dict[str, str], where: str) -> None:
    """Raise naming the first file that differs between what was signed and what is here."""
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
    """Verify a model directory against its OMS signature (default ``ROOT/model.sig``)."""
    root = Path(root)
    sig_path = signature or root / pack.SIGNATURE_FILE
    try:
        bundle = sig_path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{sig_path}: no signature", "sign the model first (weightship sign)") from None
    except OSError as e:
        raise UsageError(f"cannot read {sig_path}: {e.strerror}") from None
    verified = verify_bundle(bundle, policy)
    st = verified.statement
    ignores = pack.normalise_ignores(root, ignore)
    for rel in safe_ignores(st.ignore_paths, st.resources):
        if rel not in ignores:
            ignores.append(rel)
    local, _ = pack.walk(root, ignores)
    hashed = hashing.sha256_files(local.values(), progress=progress)
    actual = {rel: hashed[path][0] for rel, path in local.items()}
    compare(st.resources, actual, str(root))
    return verified
