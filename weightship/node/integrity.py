"""Every ready byte is the signed byte: re-hashing what a node holds, and withdrawing what
no longer matches.

Damage is never left serving: a blob that no longer hashes to its name is moved to
``state/quarantine/``, every release that uses it leaves ``models/`` (its tags then lead
nowhere rather than to wrong bytes) and is recorded ``failed`` naming the file, and the
next warm fetches exactly the blobs that went.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable

from weightship.artifact.manifest import Manifest
from weightship.artifact.pack import SIGNATURE_FILE
from weightship.errors import IntegrityError, SignatureError, UsageError
from weightship.node.layout import CacheLayout, fsync_dir
from weightship.node.protocol import CheckResult, VerifyResult, is_hex

_EMPTY = Manifest(files=[])


def verify_release(cache: CacheLayout, ref: str, progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash a materialised release against its manifest (and the node's policy); a
    damaged one is withdrawn and raises :class:`IntegrityError` (or SignatureError when
    the node's policy no longer admits it)."""
    from weightship.artifact import hashing
    from weightship.release import Release, check_signature

    name, version = cache.locate(ref)
    with cache.lock():
        rec = cache.read_record(name, version) or {}
        if rec.get("state") != "ready":
            raise UsageError(f"{name}:{version} is {rec.get('state')}, not ready", "warm it first")
        rdir = cache.release_dir(name, version)
        data = (rdir / "manifest.json").read_bytes()
        manifest = Manifest.from_bytes(data)
        sig_path = rdir / SIGNATURE_FILE
        signature = sig_path.read_bytes() if sig_path.exists() else None
        try:
            signer = check_signature(Release(name, version, manifest, data, signature), cache.policy)
        except SignatureError as e:
            # The node's policy no longer admits it (a key was revoked, say): not served.
            withdraw(cache, {(name, version)}, f"signature: {e}")
            raise
        tree = cache.models / name / version
        problems = []
        files = {f.path: f for f in manifest.files}
        on_disk = {
            p.relative_to(tree).as_posix(): p
            for p in tree.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.name != SIGNATURE_FILE
        }
        for rel in sorted(set(on_disk) - set(files)):
            problems.append(f"{rel}: not part of the release")
        for rel in sorted(set(files) - set(on_disk)):
            problems.append(f"{rel}: missing")
        # The blobs themselves are hashed (each once): a tree file is a hard link to one.
        blobs = manifest.blobs()
        hashed = hashing.sha256_files([cache.blobs / h for h in blobs if (cache.blobs / h).exists()], progress)
        bad = {h for h in blobs if hashed.get(cache.blobs / h, ("",))[0] != h}
        for rel, f in files.items():
            if f.sha256 in bad:
                problems.append(f"{rel}: corrupt (its bytes no longer match the signed sha256)")
        if problems:
            for h in bad:
                quarantine(cache, h)
            withdraw(cache, {(name, version)}, f"corrupt: {problems[0]}")
            raise IntegrityError(
                f"{name}:{version} in {cache.root}: {'; '.join(problems[:3])}",
                "it is no longer served; run warm again to repair it (only the damaged files are fetched)",
            )
        return VerifyResult(
            name=name,
            version=version,
            files=len(files),
            verified=signer is not None,
            signer=signer.to_dict() if signer else None,
        )


def check_blob(cache: CacheLayout, h: str) -> CheckResult:
    """Re-hash one blob this node holds, after a peer reported that the copy it got from
    here did not verify. A blob that is corrupt is quarantined and the releases that use
    it stop being served; a sound one is left alone, so a lying reporter costs one re-hash
    and changes nothing."""
    from weightship.artifact import hashing

    if not is_hex(h):
        raise UsageError(f"{h[:80]!r} is not a sha256 hex digest")
    with cache.lock():
        path = cache.blobs / h
        if not path.exists():
            return CheckResult(blob=h, held=False)
        corrupt = hashing.sha256_files([path])[path][0] != h
        withdrawn: list[str] = []
        if corrupt:
            quarantine(cache, h)
            users = {
                (r["name"], r["version"])
                for r in cache.records()
                if r["state"] == "ready" and h in (cache.manifest(r["name"], r["version"]) or _EMPTY).blobs()
            }
            withdrawn = [f"{n}:{v}" for n, v in sorted(users)]
            withdraw(cache, users, f"corrupt: blob {h[:12]}… no longer matches its sha256 (a peer caught it)")
        return CheckResult(blob=h, held=True, corrupt=corrupt, withdrawn=withdrawn)


def quarantine(cache: CacheLayout, h: str) -> None:
    """Move a corrupt blob out of ``blobs/`` (kept for a post-mortem, removed by gc)."""
    cache.quarantine.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(cache.blobs / h, cache.quarantine / h)


def withdraw(cache: CacheLayout, releases: set[tuple[str, str]], why: str) -> None:
    """Stop serving releases found damaged: their trees leave ``models/`` (a tag pointing
    at one then leads nowhere, which a serving process notices, instead of to wrong bytes)
    and their records say ``failed`` and why. A warm re-materialises them."""
    for name, version in releases:
        target = cache.models / name / version
        if target.is_dir() and not target.is_symlink():
            trash = cache.staging / f"withdrawn-{uuid.uuid4().hex}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
            fsync_dir(target.parent)
        rec = cache.read_record(name, version)
        if rec:
            rec.update(state="failed", error=why, verified=False)
            cache.write_record(rec)


__all__ = ["check_blob", "quarantine", "verify_release", "withdraw"]
