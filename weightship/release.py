"""Releases in a store: publish, resolve, pull, list, tag, rm, untag, prune.

The write order is what makes a store safe to read while it is written (see
docs/format.md): blobs first, then the signature, then the manifest (the commit point:
a version exists once its manifest does), then tags. A reader that finds a manifest
therefore finds every blob and the signature it names; a reader that finds a tag finds
a whole release. Removing runs the other way (tags, then the manifest; blobs and
signatures only later, by prune, after a grace period): docs/format.md, "Deleting".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from weightship.artifact import hashing, pack, pickles, refs
from weightship.artifact.digestcache import DigestCache
from weightship.artifact.manifest import FileEntry, Manifest
from weightship.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    PolicyError,
    SignatureError,
    StoreError,
    UsageError,
    WeightshipError,
)
from weightship.progress import Reporter
from weightship.store import Store, takes_chunk_crc32
from weightship.store.base import ObjectInfo
from weightship.store.file import fsync_dir, write_new_file
from weightship.store.layout import (
    PRUNE_PREFIX,
    blob_key,
    legacy_signature_key,
    manifest_key,
    parse_release_key,
    signature_key,
    tag_key,
)
from weightship.trust import oms
from weightship.trust.bundle import verify_bundle
from weightship.trust.policy import SignerInfo, TrustPolicy
from weightship.trust.signers import Signer
from weightship.trust.verify import compare, safe_ignores

UPLOAD_WORKERS = 4
# The race between a publish that reuses a blob nobody referenced and a prune deleting it
# (docs/format.md, "Deleting: rm and prune"): a prune issues every delete within
# PRUNE_RELIST seconds of a listing of the manifests that showed the blob unreferenced;
# a publish that finds a prune in progress once its manifest is committed waits
# PRUNE_SETTLE seconds before it checks its blobs are all still there (re-uploading any
# that are not). Both are durations on each process's own clock: no clocks are compared.
PRUNE_RELIST = 2.0
PRUNE_SETTLE = 6.0
# A prune marker older than this is left by a prune that was killed: prunes delete it.
PRUNE_MARKER_STALE = timedelta(hours=24)
DEFAULT_GRACE = timedelta(hours=24)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Release:
    """A release as read from a store; ``manifest_bytes`` is what the digest covers."""

    name: str
    version: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None

    @property
    def digest(self) -> str:
        return digest_of(self.manifest_bytes)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass
class PublishResult:
    name: str
    version: str
    digest: str
    tags: list[str]
    signed: str
    files: int
    total_bytes: int
    bytes_uploaded: int
    bytes_skipped: int
    blobs_uploaded: int
    blobs_skipped: int
    store: str
    # True when the version was already in the store with these very files and signer
    # (a retried CI job): nothing was committed, tags given were applied.
    already_published: bool = False
    # Things worth a word that did not stop the publish (pickle files), one line each.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/publish.v1.json).
        return {"schema": "weightship.publish/v1", **self.__dict__, "release": f"{self.name}@{self.digest}"}


# -- reading ---------------------------------------------------------------------------


def versions(store: Store, name: str) -> list[str]:
    prefix = f"releases/{name}/"
    return sorted({k[len(prefix) :].split("/")[0] for k in store.list(prefix) if k.endswith("/manifest.json")})


def names(store: Store) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("releases/") if k.endswith("/manifest.json")})


def tags(store: Store, name: str) -> dict[str, str]:
    prefix = f"tags/{name}/"
    out = {}
    for k in store.list(prefix):
        try:
            out[k[len(prefix) :]] = store.read(k).decode().strip()
        except NotFoundError:
            continue  # untagged (or rm --force) since the listing
    return out


def load_release(store: Store, name: str, version: str) -> Release:
    data = store.read(manifest_key(name, version))
    manifest = Manifest.from_bytes(data, where=f"manifest of {name}:{version}")
    if manifest.name != name or manifest.version != version:
        raise SignatureError(
            f"manifest at {name}:{version} says it is {manifest.name}:{manifest.version}",
            "the store was tampered with; re-publish the release",
        )
    sig = None
    if manifest.signature != "unsigned":
        try:
            sig = store.read(signature_key(name, version, digest_of(data)))
        except NotFoundError:
            try:
                sig = store.read(legacy_signature_key(name, version))
            except NotFoundError:
                raise SignatureError(
                    f"{name}:{version} is marked signed ({manifest.signature}) but its signature is missing",
                    "the store lost an object: re-publish the release under a new version",
                ) from None
    return Release(name, version, manifest, data, sig)


def resolve(store: Store, ref: str | refs.Ref) -> Release:
    """Find the release a reference names. A version wins over a tag of the same name."""
    r = refs.Ref.parse(ref) if isinstance(ref, str) else ref
    if r.digest:
        for v in versions(store, r.name):
            data = store.read(manifest_key(r.name, v))
            if digest_of(data) == r.digest:
                return load_release(store, r.name, v)
        raise NotFoundError(f"no release of {r.name} has digest {r.digest}", "see weightship ls")
    assert r.label is not None
    if store.exists(manifest_key(r.name, r.label)):
        return load_release(store, r.name, r.label)
    try:
        version = store.read(tag_key(r.name, r.label)).decode().strip()
    except NotFoundError:
        raise NotFoundError(
            f"{r} not found: no version or tag {r.label!r} of {r.name} in {store.url}",
            f"see weightship ls {r.name}",
        ) from None
    return load_release(store, r.name, refs.check_label(version))


def check_signature(release: Release, policy: TrustPolicy) -> SignerInfo | None:
    """Apply a trust policy to a release, before any byte of it is used.

    The signature must verify under the policy and must cover exactly the manifest's
    files with the manifest's digests; then verifying each blob against the manifest
    verifies it against the signature.
    """
    if release.signature is None:
        if policy.required:
            raise PolicyError(
                f"{release.ref} is unsigned and the policy requires a signature",
                f"required: {policy.describe()}",
            )
        return None
    if not policy.required:
        return None
    verified = verify_bundle(release.signature, policy)
    st = verified.statement
    safe_ignores(st.ignore_paths, st.resources)
    compare(st.resources, release.manifest.digests(), f"manifest of {release.ref}")
    return verified.signer


# -- publishing ------------------------------------------------------------------------


def sign_packed(packed: pack.PackedModel, signer: Signer, model_name: str | None = None) -> bytes:
    payload = oms.build_statement(
        model_name or packed.root.resolve().name,
        packed.resources(),
        ignore_paths=packed.ignore_paths,
        allow_symlinks=packed.has_symlinks,
    )
    return signer.sign(payload)


def upload_blobs(
    store: Store,
    packed: pack.PackedModel,
    reporter: Reporter,
    workers: int | None = None,
) -> tuple[int, int, int, int]:
    """Upload the blobs the store lacks; return (bytes up, bytes skipped, blobs up, blobs skipped)."""
    workers = workers or UPLOAD_WORKERS
    if packed.manifest.name:
        store = store.scoped(packed.manifest.name)  # a registry keeps blobs per repository
    first_rel: dict[str, str] = {}
    sizes = {}
    for f in packed.manifest.files:
        first_rel.setdefault(f.sha256, f.path)
        sizes[f.sha256] = f.size
    with ThreadPoolExecutor(max_workers=workers) as pool:
        present = dict(zip(sizes, pool.map(store.has_blob, sizes), strict=False))
    missing = [h for h in sizes if not present[h]]
    skipped = [h for h in sizes if present[h]]
    total_missing = sum(sizes[h] for h in missing)
    sent = 0
    if missing:
        with reporter.task("uploading", total_missing) as advance, ThreadPoolExecutor(max_workers=workers) as pool:
            # Biggest first so that the last one to finish is small.
            order = sorted(missing, key=lambda h: -sizes[h])

            def put(h: str) -> int:
                rel = first_rel[h]
                crcs = packed.chunk_crc32.get(rel)
                return store.put_blob(h, packed.path_of(rel), sizes[h], advance, chunk_crc32=crcs)

            for n in pool.map(put, order):
                sent += n
    return sent, sum(sizes[h] for h in skipped), len(missing), len(skipped)


def publish(
    source: Path | str,
    ref: str,
    store: Store | Callable[[], Store],
    *,
    tags_: Iterable[str] = (),
    signer: Signer | None = None,
    ignore: Iterable[str | Path] = (),
    source_info: dict[str, str] | None = None,
    reporter: Reporter | None = None,
    packed: pack.PackedModel | None = None,
    cache: DigestCache | None = None,
    chunk_crc32: bool | None = None,
    pickle: str = pickles.DEFAULT_MODE,
) -> PublishResult:
    """Pack, sign, upload what is missing, then commit manifest and tags.

    ``store`` may be a function that opens it: it is then called while the model is
    being hashed, so that connecting (and for S3, starting botocore) costs no time of
    its own. ``cache`` lets files unchanged since the last publish skip hashing.
    ``chunk_crc32``: record CRC32s while hashing for the upload to send (Store.put_blob);
    by default when ``store`` is a store that takes them (pass it with a function).
    ``source`` is a model directory or a single model file. ``pickle`` is what to do
    about pickle files (weightship.artifact.pickles): ``warn`` (through ``reporter``, and
    in the result's ``warnings``), ``refuse`` (ModelError, nothing uploaded) or ``allow``."""
    reporter = reporter or Reporter()
    name, version = refs.parse_release(ref)
    tag_list = [refs.check_label(t, "tag") for t in tags_]

    if packed is None:
        root = Path(source)
        if root.is_dir():
            total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        else:
            total = root.stat().st_size if root.is_file() else 0
        with reporter.task("hashing", total) as advance:
            crc32 = chunk_crc32
            if crc32 is None:
                crc32 = isinstance(store, Store) and takes_chunk_crc32(store.url)
            store, packed = _pack_while_opening(
                root, store, name, version, tag_list, ignore, advance, cache, crc32, pickle
            )
    else:
        # Packed elsewhere (a Hub snapshot): the pickle guard still applies, before any upload.
        packed.warnings.extend(pickles.guard(packed.local, pickle))
        store = store if isinstance(store, Store) else store()
        _check_publishable(store, name, version, tag_list)
    for warning in packed.warnings:
        reporter.warn(warning)
    manifest = packed.manifest
    manifest.name, manifest.version = name, version
    manifest.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest.source = dict(source_info or {})
    bundle = None
    if signer is not None:
        bundle = sign_packed(packed, signer, model_name=name)
        manifest.signature = signer.method
    else:
        manifest.signature = "unsigned"
        reporter.warn(f"{name}:{version} is published unsigned; pass --key or --sigstore to sign it")

    # A version already there is fine when it is exactly this publish (a retried CI job):
    # the same files, the same signer. Anything else is refused before a byte moves.
    existing = _existing_release(store, name, version)
    if existing is not None:
        _check_same_release(existing, manifest, bundle, store.url)
    else:
        _check_not_removed(store, manifest, name, version)
    # Run in the retry case too: a re-run puts back a blob the store lost.
    up, skipped, n_up, n_skip = upload_blobs(store, packed, reporter)
    data = manifest.to_bytes()
    if existing is None:
        sig_key = signature_key(name, version, digest_of(data)) if bundle is not None else None
        if sig_key is not None:
            # Written before the manifest, under the manifest's own digest: a reader that finds
            # the manifest finds the signature made for exactly it, whoever else raced us.
            store.write(sig_key, bundle)
        try:
            store.write(manifest_key(name, version), data, exclusive=True)
        except ConflictError:
            if sig_key is not None:
                _drop_lost_signature(store, name, version, data, sig_key)
            # Lost the race: still a success if the winner published these very files.
            existing = load_release(store, name, version)
            _check_same_release(existing, manifest, bundle, store.url, concurrently=True)
        else:
            again, n_again = _ensure_blobs(store, packed, reporter)
            up, n_up = up + again, n_up + n_again
            skipped, n_skip = max(0, skipped - again), max(0, n_skip - n_again)
    if existing is not None:
        data = existing.manifest_bytes
    for t in tag_list:
        store.write(tag_key(name, t), version.encode())
    return PublishResult(
        name=name,
        version=version,
        digest=digest_of(data),
        tags=tag_list,
        signed=existing.manifest.signature if existing is not None else manifest.signature,
        files=len(manifest.files),
        total_bytes=manifest.total_size,
        bytes_uploaded=up,
        bytes_skipped=skipped,
        blobs_uploaded=n_up,
        blobs_skipped=n_skip,
        store=store.url,
        already_published=existing is not None,
        warnings=list(packed.warnings),
    )


def _existing_release(store: Store, name: str, version: str) -> Release | None:
    try:
        return load_release(store, name, version)
    except NotFoundError:
        return None


def _check_same_release(
    existing: Release, manifest: Manifest, bundle: bytes | None, where: str, *, concurrently: bool = False
) -> None:
    """Refuse, naming the version, unless ``existing`` holds exactly the files this publish
    packed (paths, sizes, sha256) and was signed by the same signer: the same key, the same
    certificate, or the same Sigstore identity. Not the same signature bytes: ECDSA signs
    differently every time, and the manifest's ``created`` and ``source`` differ too."""
    when = " (published concurrently)" if concurrently else ""
    hint = "versions are immutable: publish a new version"
    ours = {f.path: (f.size, f.sha256) for f in manifest.files}
    theirs = {f.path: (f.size, f.sha256) for f in existing.manifest.files}
    if ours != theirs:
        differ = sorted(p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p))
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ConflictError(f"{existing.ref} already exists in {where}{when} with different files ({shown})", hint)
    if _signer_identity(existing.signature) != _signer_identity(bundle):
        raise ConflictError(
            f"{existing.ref} already exists in {where}{when} with these files, signed by "
            f"{_signer_text(existing.signature)}, not by {_signer_text(bundle)}",
            hint,
        )


def _signer_identity(bundle: bytes | None) -> tuple[str, ...]:
    """Who signed a bundle, as far as "the same signer" goes (nothing is verified here)."""
    if bundle is None:
        return ("unsigned",)
    try:
        env = oms.read_bundle(bundle)
        kind = env.kind
        if kind == "key":
            return ("key", str(env.material["publicKey"]["hint"]))
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if kind == "certificate":
            raw = env.material["x509CertificateChain"]["certificates"][0]["rawBytes"]
        else:
            raw = env.material["certificate"]["rawBytes"]
        cert = x509.load_der_x509_certificate(oms.unb64(raw, "certificate"))
        if kind == "certificate":
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return ("certificate", cert.subject.rfc4514_string(), hashlib.sha256(spki).hexdigest())
        # Sigstore: a fresh key and certificate per signature; the identity is what stays.
        from weightship.trust.sigstore import cert_identities, cert_issuer

        return ("sigstore", cert_issuer(cert) or "", *sorted(cert_identities(cert)))
    except (SignatureError, KeyError, IndexError, TypeError, ValueError):
        # Unreadable: equal to nothing but itself.
        return ("unreadable", hashlib.sha256(bundle).hexdigest())


def _signer_text(bundle: bytes | None) -> str:
    if bundle is None:
        return "nobody (unsigned)"
    from weightship.trust.bundle import describe_unverified

    try:
        return describe_unverified(bundle).removesuffix(" (unverified)")
    except (SignatureError, KeyError, IndexError, TypeError, ValueError):
        return "an unreadable signature"


def _ensure_blobs(store: Store, packed: pack.PackedModel, reporter: Reporter) -> tuple[int, int]:
    """After the manifest commit: check that every blob of the release is still in the
    store, uploading again any that is not; return (bytes, blobs) uploaded again.

    A prune that listed the manifests before this commit may have deleted a blob this
    publish found in the store and skipped (or, in a publish that took longer than the
    grace period, uploaded). A prune in progress (a marker under prune/) issues each
    delete within PRUNE_RELIST s of such a listing, so once PRUNE_SETTLE s have passed
    since the commit, its deletes are behind us and the check below sees them."""
    if _prunes_in_progress(store):
        time.sleep(PRUNE_SETTLE)
    up, _, n_up, _ = upload_blobs(store, packed, reporter)
    return up, n_up


def _prunes_in_progress(store: Store) -> bool:
    try:
        markers = store.list_info(PRUNE_PREFIX)
    except StoreError:
        # A store that cannot say how old objects are: every marker counts.
        return bool(store.list(PRUNE_PREFIX))
    fresh = datetime.now(timezone.utc) - PRUNE_MARKER_STALE
    return any(m.modified > fresh for m in markers)


def _drop_lost_signature(store: Store, name: str, version: str, ours: bytes, sig_key: str) -> None:
    """Delete the signature of a manifest that lost the race for its version, unless the
    winner wrote the very same manifest (then the key is shared, and it stays)."""
    try:
        if store.read(manifest_key(name, version)) == ours:
            return
        store.delete(sig_key)
    except WeightshipError:
        pass  # an orphan signature is harmless: no manifest names it


def _pack_while_opening(
    root: Path,
    store: Store | Callable[[], Store],
    name: str,
    version: str,
    tag_list: list[str],
    ignore: Iterable[str | Path],
    progress: Callable[[int], None],
    cache: DigestCache | None,
    crc32: bool = False,
    pickle: str = pickles.DEFAULT_MODE,
) -> tuple[Store, pack.PackedModel]:
    """Hash the model in the background while the store is opened and checked here: a
    version that already exists is refused at once, not after the hashing."""
    cancel = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="weightship-pack") as bg:
        packing = bg.submit(
            pack.pack, root, ignore=ignore, progress=progress, cache=cache, cancel=cancel, crc32=crc32, pickle=pickle
        )
        try:
            opened = store if isinstance(store, Store) else store()
            _check_publishable(opened, name, version, tag_list)
        except BaseException:
            cancel.set()
            raise
        return opened, packing.result()


def _check_publishable(store: Store, name: str, version: str, tag_list: list[str]) -> None:
    # A version that exists already is compared with what was packed, once it is hashed
    # (publish: _check_same_release): a retry of the same publish succeeds.
    if store.exists(tag_key(name, version)):
        raise ConflictError(
            f"{version!r} is already a tag of {name}",
            "a version may not share a name with a tag: choose another version",
        )
    for t in tag_list:
        if t == version:
            continue
        if store.exists(manifest_key(name, t)):
            raise ConflictError(
                f"tag {t!r} would shadow version {name}:{t}",
                "a tag may not share a name with a version: choose another tag",
            )


@dataclass
class TagResult:
    """Where a tag now points, and where it pointed before (None: the tag is new)."""

    name: str
    tag: str
    version: str
    digest: str
    previous: str | None

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/tag.v1.json).
        return {"schema": "weightship.tag/v1", **self.__dict__}


def move_tag(store: Store, ref: str, tag: str) -> Release:
    """Point ``NAME:TAG`` at the release ``ref`` names (tags move; versions never do)."""
    return _move_tag(store, ref, tag)[0]


def tag(store: Store, ref: str, tag_name: str) -> TagResult:
    """Point ``NAME:TAG`` at the release ``ref`` names; say where it pointed before."""
    release, previous = _move_tag(store, ref, tag_name)
    return TagResult(release.name, tag_name, release.version, release.digest, previous)


def _move_tag(store: Store, ref: str, tag: str) -> tuple[Release, str | None]:
    refs.check_label(tag, "tag")
    release = resolve(store, ref)
    if store.exists(manifest_key(release.name, tag)):
        raise ConflictError(
            f"tag {tag!r} would shadow version {release.name}:{tag}",
            "a tag may not share a name with a version: choose another tag",
        )
    key = tag_key(release.name, tag)
    try:
        previous: str | None = store.read(key).decode().strip()
    except NotFoundError:
        previous = None
    store.write(key, release.version.encode())
    # An rm of the version may have run since it was resolved: a tag never points at nothing.
    if not store.exists(manifest_key(release.name, release.version)):
        _delete_tag_if(store, release.name, tag, release.version)
        raise NotFoundError(f"{release.ref} was removed while it was being tagged", "tag another release")
    return release, previous


def _delete_tag_if(store: Store, name: str, tag: str, version: str) -> bool:
    """Delete ``NAME:TAG`` if it (still) points at ``version``."""
    try:
        if store.read(tag_key(name, tag)).decode().strip() != version:
            return False
    except NotFoundError:
        return False
    store.delete(tag_key(name, tag))
    return True


# -- removing ----------------------------------------------------------------------------


@dataclass
class RemoveResult:
    name: str
    version: str
    digest: str
    tags_removed: list[str]
    store: str

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/rm.v1.json).
        return {"schema": "weightship.rm/v1", **self.__dict__, "release": f"{self.name}@{self.digest}"}


def rm(store: Store, ref: str | refs.Ref, *, force: bool = False) -> RemoveResult:
    """Remove the release ``NAME:VERSION`` (or ``NAME@sha256:HEX``).

    A release a tag points at is refused (ConflictError naming the tags) unless
    ``force``, which deletes those tags first. Then the manifest, the commit point: a
    reader finds the whole release or nothing. Its blobs and signature stay until
    :func:`prune` collects them after the grace period (docs/format.md, "Deleting")."""
    r = refs.Ref.parse(ref) if isinstance(ref, str) else ref
    if r.digest:
        rel = resolve(store, r)
        name, version, data = rel.name, rel.version, rel.manifest_bytes
    else:
        assert r.label is not None
        name, version = r.name, r.label
        try:
            # Only the bytes, for the digest: a release whose manifest or signature is
            # damaged can still be removed.
            data = store.read(manifest_key(name, version))
        except NotFoundError:
            if store.exists(tag_key(name, version)):
                raise UsageError(
                    f"{r} is a tag, not a version", f"remove the tag with weightship untag {r}, or name a version"
                ) from None
            raise NotFoundError(
                f"{r} not found: no version {version!r} of {name} in {store.url}", f"see weightship ls {name}"
            ) from None
    pointing = sorted(t for t, v in tags(store, name).items() if v == version)
    if pointing and not force:
        raise ConflictError(
            f"{name}:{version} is tagged {', '.join(pointing)}",
            "move or untag those tags first (weightship untag NAME:TAG), or pass --force to remove them too",
        )
    removed = [t for t in pointing if _delete_tag_if(store, name, t, version)]
    # Before the manifest goes: once it is gone, nothing else says what the version held,
    # and a node that still holds it refuses the version with other files forever.
    store.remember_removed(name, version, _removed_record(data))
    store.delete(manifest_key(name, version))
    # A tag moved onto the version while it was being removed would now point at nothing.
    removed += [t for t, v in tags(store, name).items() if v == version and _delete_tag_if(store, name, t, version)]
    return RemoveResult(name, version, digest_of(data), sorted(set(removed)), store.url)


def _removed_record(manifest_bytes: bytes) -> bytes:
    try:
        files: dict | None = {f.path: [f.size, f.sha256] for f in Manifest.from_bytes(manifest_bytes).files}
    except WeightshipError:
        files = None  # a damaged manifest: what it held is unknown, so nothing may come back
    return json.dumps(
        {
            "removed": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "digest": digest_of(manifest_bytes),
            "files": files,
        },
        sort_keys=True,
    ).encode()


def _check_not_removed(store: Store, manifest: Manifest, name: str, version: str) -> None:
    """A version removed by ``rm`` may come back only with the files it held: nodes that
    still hold it know it by its version, and versions never change."""
    raw = store.removed_record(name, version)
    if raw is None:
        return
    try:
        record = json.loads(raw)
        held = {p: tuple(v) for p, v in record["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        held, record = None, {}
    ours = {f.path: (f.size, f.sha256) for f in manifest.files}
    if held != ours:
        raise ConflictError(
            f"{name}:{version} was removed from {store.url} (on {record.get('removed', 'an earlier day')}) "
            "and held other files",
            "a version never names other files, even after rm: publish a new version",
        )


@dataclass
class UntagResult:
    name: str
    tag: str
    version: str  # what the tag pointed at
    store: str

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/untag.v1.json).
        return {"schema": "weightship.untag/v1", **self.__dict__}


def untag(store: Store, ref: str) -> UntagResult:
    """Delete the movable tag ``NAME:TAG``; a version is refused (UsageError: use rm)."""
    r = refs.Ref.parse(ref)
    if r.label is None:
        raise UsageError(f"{ref} names a digest, not a tag", "write NAME:TAG")
    if store.exists(manifest_key(r.name, r.label)):
        raise UsageError(f"{r} is a version, not a tag", f"remove a version with weightship rm {r}")
    try:
        version = store.read(tag_key(r.name, r.label)).decode().strip()
    except NotFoundError:
        raise NotFoundError(f"no tag {r.label!r} of {r.name} in {store.url}", f"see weightship ls {r.name}") from None
    store.delete(tag_key(r.name, r.label))
    return UntagResult(r.name, r.label, version, store.url)


@dataclass
class PruneResult:
    """What a prune deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool
    grace_seconds: int
    blobs: list[dict]  # {"sha256", "size", "modified"}
    signatures: list[dict]  # {"key", "size", "modified"}
    leftovers: list[dict]  # {"key", "size", "modified"}
    bytes_freed: int
    blobs_in_use: int  # referenced by a release: kept
    blobs_in_grace: int  # referenced by none but younger than the grace period: kept
    store: str

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/prune.v1.json).
        return {"schema": "weightship.prune/v1", **self.__dict__}


@dataclass(frozen=True)
class _Read:
    """A manifest as a listing found it: (modified, size) as listed, then what it names."""

    stamp: tuple[datetime, int]
    blobs: frozenset[str]
    digest: str


@dataclass
class _Releases:
    """The manifests of a store as one listing found them, read once each."""

    manifests: dict[str, _Read] = field(default_factory=dict)  # by manifest key
    signatures: list[ObjectInfo] = field(default_factory=list)

    def referenced(self) -> set[str]:
        return set().union(*(m.blobs for m in self.manifests.values()))

    def signature_stale(self, key: str) -> bool:
        """A signature no manifest of this listing pairs with (a removed release's, or
        the loser's of a publish race)."""
        parsed = parse_release_key(key)
        assert parsed is not None
        name, version, file = parsed
        read = self.manifests.get(manifest_key(name, version))
        if read is None:
            return True
        return file != pack.SIGNATURE_FILE and file != f"sha256-{read.digest.removeprefix('sha256:')}.sig"


def _scan_releases(store: Store, before: _Releases | None = None) -> _Releases:
    """List ``releases/`` and read every manifest not read by ``before`` already (new, or
    replaced since). A manifest that cannot be read stops the prune: which blobs it
    names is unknown, so deleting any could break it."""
    now = _Releases()
    to_read: list[tuple[ObjectInfo, str, str]] = []
    for info in store.list_info("releases/"):
        parsed = parse_release_key(info.key)
        if parsed is None:
            continue
        name, version, file = parsed
        if file == "manifest.json":
            known = before.manifests.get(info.key) if before is not None else None
            if known is not None and known.stamp == (info.modified, info.size):
                now.manifests[info.key] = known
            else:
                to_read.append((info, name, version))
        elif file.endswith(".sig"):
            now.signatures.append(info)

    def read(key: str) -> bytes | None:
        try:
            return store.read(key)
        except NotFoundError:
            return None  # removed since the listing

    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS * 2) as pool:
        for (info, name, version), data in zip(to_read, pool.map(read, [i.key for i, _, _ in to_read]), strict=True):
            if data is None:
                continue
            try:
                manifest = Manifest.from_bytes(data, where=f"manifest of {name}:{version}")
            except WeightshipError as e:
                raise StoreError(
                    f"prune stopped: cannot read the manifest of {name}:{version} ({e.message})",
                    f"remove the damaged release with weightship rm {name}:{version}, then prune again",
                ) from None
            now.manifests[info.key] = _Read((info.modified, info.size), frozenset(manifest.blobs()), digest_of(data))
    return now


def prune(
    store: Store,
    *,
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    reporter: Reporter | None = None,
) -> PruneResult:
    """Delete the blobs no release references, the signatures no manifest pairs with, and
    what interrupted uploads left, when last modified more than ``grace`` ago (by the
    store's clock): a publish in flight never loses a blob it uploaded. The rule, and how
    it is kept against a publish that reuses an unreferenced blob meanwhile, is in
    docs/format.md ("Deleting: rm and prune"). ``reporter`` is accepted as every command's
    is; prune reports nothing before its result."""
    if grace < timedelta(0):
        raise UsageError("the grace period cannot be negative", "e.g. --grace 24h")
    # Before anything is written: a store that cannot say how old objects are says so here.
    store.list_info(PRUNE_PREFIX)
    marker = None
    if not dry_run:
        # Publishers that commit while this is here wait PRUNE_SETTLE s before checking
        # their blobs (publish: _ensure_blobs).
        marker = f"{PRUNE_PREFIX}{uuid.uuid4().hex}"
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        store.write(marker, json.dumps({"started": started, "host": os.uname().nodename}).encode())
    try:
        return _prune(store, grace, dry_run, marker)
    finally:
        if marker is not None:
            # If this fails, the marker is stale after PRUNE_MARKER_STALE: a prune deletes it.
            with contextlib.suppress(WeightshipError):
                store.delete(marker)


def _prune(store: Store, grace: timedelta, dry_run: bool, marker: str | None) -> PruneResult:
    # Listed with --dry-run too: it reports the stale markers a prune would delete.
    markers = store.list_info(PRUNE_PREFIX)
    # Ages by the store's clock where it says (our marker was written just now).
    now = next((m.modified for m in markers if m.key == marker), datetime.now(timezone.utc))
    cutoff = now - grace
    # Blobs first: one uploaded after this listing is no candidate, whatever follows.
    blobs = list(store.list_blobs())
    listed_at = time.monotonic()
    releases = _scan_releases(store)
    referenced = releases.referenced()
    in_use = sum(1 for b in blobs if b.hexdigest in referenced)
    in_grace = sum(1 for b in blobs if b.hexdigest not in referenced and b.modified >= cutoff)
    todo: list[ObjectInfo] = [
        ObjectInfo(blob_key(b.hexdigest), b.size, b.modified)
        for b in blobs
        if b.hexdigest not in referenced and b.modified < cutoff
    ]
    todo += [s for s in releases.signatures if s.modified < cutoff and releases.signature_stale(s.key)]
    deleted: list[ObjectInfo] = []

    def still_unused(info: ObjectInfo) -> bool:
        if info.key.startswith("releases/"):
            return releases.signature_stale(info.key)
        return info.key.rsplit("/", 1)[1] not in referenced

    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS * 2) as pool:
        while todo:
            if time.monotonic() - listed_at > PRUNE_RELIST:
                # Every delete starts within PRUNE_RELIST s of a listing that showed it unused.
                listed_at = time.monotonic()
                releases = _scan_releases(store, releases)
                referenced = releases.referenced()
            todo = [i for i in todo if still_unused(i)]
            deadline = listed_at + PRUNE_RELIST

            def delete(info: ObjectInfo, deadline: float = deadline) -> bool:
                if time.monotonic() > deadline:
                    return False  # after the next listing
                if not dry_run:
                    store.delete(info.key)
                return True

            done = list(pool.map(delete, todo))
            if todo and not any(done):
                raise StoreError(
                    f"prune stopped: listing the releases of {store.url} takes longer than {PRUNE_RELIST:.0f} s",
                    "nothing was deleted that a release still needs; run prune again when the store is less busy",
                )
            deleted += [i for i, ok in zip(todo, done, strict=True) if ok]
            todo = [i for i, ok in zip(todo, done, strict=True) if not ok]
    leftovers = store.delete_leftovers(cutoff, dry_run=dry_run)
    # Markers of prunes that were killed: they would make every publish wait.
    stale = [m for m in markers if m.key != marker and m.modified < now - PRUNE_MARKER_STALE]
    for m in stale:
        if not dry_run:
            store.delete(m.key)
    leftovers += stale

    def row(info: ObjectInfo, **extra: str) -> dict:
        return {**extra, "size": info.size, "modified": info.modified.strftime("%Y-%m-%dT%H:%M:%SZ")}

    gone_blobs = [row(i, sha256=i.key.rsplit("/", 1)[1]) for i in deleted if not i.key.startswith("releases/")]
    gone_sigs = [row(i, key=i.key) for i in deleted if i.key.startswith("releases/")]
    return PruneResult(
        dry_run=dry_run,
        grace_seconds=int(grace.total_seconds()),
        blobs=sorted(gone_blobs, key=lambda d: d["sha256"]),
        signatures=sorted(gone_sigs, key=lambda d: d["key"]),
        leftovers=[row(i, key=i.key) for i in leftovers],
        bytes_freed=sum(i.size for i in deleted) + sum(i.size for i in leftovers),
        blobs_in_use=in_use,
        blobs_in_grace=in_grace,
        store=store.url,
    )


# -- pulling ---------------------------------------------------------------------------


@dataclass
class PullResult:
    ref: str
    version: str
    digest: str
    dest: str
    files: int
    total_bytes: int
    bytes_fetched: int
    signer: dict = field(default_factory=dict)
    # Only the files --include/--exclude selected were pulled (``files``, ``total_bytes``
    # count those); the signature was still checked against the whole manifest.
    partial: bool = False
    # DEST held something before, replaced with --force.
    replaced: bool = False

    def to_dict(self) -> dict:
        # The --json document (docs/json.md, weightship/schemas/pull.v1.json).
        return {"schema": "weightship.pull/v1", **self.__dict__}


def _recheck(blobs_dir: Path, blobs: dict[str, int]) -> None:
    """Hash the blobs an earlier pull finished; drop any that no longer match."""
    done = [blobs_dir / h for h in blobs if (blobs_dir / h).is_file()]
    if not done:
        return
    for path, (digest, _size) in hashing.sha256_files(done).items():
        if digest != path.name:
            path.unlink()


def _sync_tree(tree: Path) -> None:
    """fsync every file under ``tree``, then every directory, deepest first."""
    dirs = [tree]
    for dirpath, dirnames, filenames in os.walk(tree):
        dirs.extend(Path(dirpath) / d for d in dirnames)
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(d)


def pull(
    store: Store,
    ref: str,
    dest: Path | str,
    *,
    policy: TrustPolicy | None = None,
    reporter: Reporter | None = None,
    sync: bool = False,
    force: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> PullResult:
    """Materialise a release into ``dest``, verifying every byte before it appears.

    Blobs are downloaded into a staging directory beside ``dest`` (kept between runs, so
    an interrupted pull resumes); ``dest`` appears by one rename once everything has
    been verified, so a failed pull leaves no file in it.

    Like ``cp`` and every S3 download tool, a pull leaves writing its bytes out to the
    kernel unless ``sync`` (then every file and directory is fsynced before ``dest``
    appears, at the disk's speed). Either way nothing unverified is ever used: blobs an
    interrupted pull had finished are hashed again before they are taken.

    ``force`` replaces a ``dest`` that is not empty: its old content stays until the new
    is fetched and verified, then the two are swapped by one rename (an exchange, where
    the kernel and file system offer it) and the old removed. ``include``/``exclude``
    (globs on the release's paths, as publish's hf:// ones) pull part of a release; each
    pattern must match some path. The signature is checked against the whole manifest
    either way, and ``model.sig`` is written only into a whole release.
    """
    reporter = reporter or Reporter()
    policy = policy or TrustPolicy()
    dest = Path(dest)
    replace = False
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not force:
            raise UsageError(
                f"{dest} exists and is not empty", "pull into a new directory, or pass --force to replace it"
            )
        if dest.is_symlink() or not dest.is_dir():
            raise UsageError(
                f"{dest} is not a directory (or is a symbolic link)",
                "--force replaces a directory only: choose another DEST",
            )
        replace = True
    include, exclude = list(include), list(exclude)
    release = resolve(store, ref)
    files = _select_files(release, include, exclude)
    signer = check_signature(release, policy)
    if signer:
        reporter.info(f"{release.ref}: signature verified ({signer.describe()})")
    elif release.signature is None:
        reporter.warn(
            f"{release.ref} is unsigned and was checked against no trusted signer; to require one, pass "
            "--key or --identity/--issuer, or set [policy] in weightship.toml"
        )
    else:
        reporter.warn(
            f"{release.ref}: signature not checked against any trusted signer; pass --key or "
            "--identity/--issuer, or set [policy] in weightship.toml"
        )
    staging = dest.parent / f".{dest.name}.weightship-partial"
    blobs_dir = staging / "blobs"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fetched = 0
    blobs = {f.sha256: f.size for f in files}
    _recheck(blobs_dir, blobs)
    todo = {h: s for h, s in blobs.items() if not (blobs_dir / h).exists()}
    with (
        reporter.task("downloading", sum(todo.values())) as advance,
        ThreadPoolExecutor(max_workers=UPLOAD_WORKERS) as pool,
    ):

        def fetch(h: str) -> int:
            part = blobs_dir / f"{h}.part"
            try:
                n = store.scoped(release.name).get_blob(h, part, blobs[h], advance, sync=sync)
            except IntegrityError as e:
                # Stores speak of blobs; the person reading this knows files.
                files = ", ".join(f.path for f in release.manifest.files if f.sha256 == h)
                raise IntegrityError(f"{files}: {e.message}", e.hint or "re-publish the release") from None
            os.replace(part, blobs_dir / h)
            return n

        for n in pool.map(fetch, sorted(todo, key=lambda h: -todo[h])):
            fetched += n
    tree = staging / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    uses: dict[str, int] = {}
    for f in files:
        uses[f.sha256] = uses.get(f.sha256, 0) + 1
    for f in files:
        target = tree / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        uses[f.sha256] -= 1
        # A blob's last user takes it by rename; identical files before it get copies.
        if uses[f.sha256]:
            shutil.copyfile(blobs_dir / f.sha256, target)
        else:
            os.replace(blobs_dir / f.sha256, target)
    partial = len(files) < len(release.manifest.files)
    if release.signature is not None and not partial:
        # Not into part of a release: it covers files that are not there.
        write_new_file(tree / pack.SIGNATURE_FILE, release.signature)
    if sync:
        _sync_tree(tree)
    if replace:
        # The old content ends up at ``tree``, inside the staging directory removed below.
        _swap_dirs(tree, dest)
    else:
        if dest.exists():
            dest.rmdir()
        os.replace(tree, dest)
    if sync:
        fsync_dir(dest.parent)
    shutil.rmtree(staging, ignore_errors=True)
    return PullResult(
        ref=str(ref),
        version=release.version,
        digest=release.digest,
        dest=str(dest),
        files=len(files),
        total_bytes=sum(f.size for f in files),
        bytes_fetched=fetched,
        signer=signer.to_dict() if signer else {},
        partial=partial,
        replaced=replace,
    )


def _select_files(release: Release, include: list[str], exclude: list[str]) -> list[FileEntry]:
    """The files ``include``/``exclude`` select (all without them), with the Hub's glob
    semantics (huggingface_hub's filter_repo_objects, as publish hf:// --include uses);
    a pattern that matches no path of the release is a usage error naming it."""
    files = release.manifest.files
    if not include and not exclude:
        return list(files)
    from huggingface_hub.utils import filter_repo_objects

    paths = [f.path for f in files]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for p in patterns:
            if not list(filter_repo_objects(paths, allow_patterns=[p])):
                raise UsageError(
                    f"{flag} {p!r} matches no file of {release.ref}",
                    f"see its files with weightship show {release.ref}",
                )
    chosen = set(filter_repo_objects(paths, allow_patterns=include or None, ignore_patterns=exclude or None))
    if not chosen:
        raise UsageError(f"--include/--exclude leave no file of {release.ref} to pull", "loosen the patterns")
    return [f for f in files if f.path in chosen]


# renameat2(2) flag: swap the two paths atomically.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_dirs(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest`` and the old ``dest`` at ``new``: one atomic exchange where
    the kernel (Linux 3.15+) and the file system support it, so ``dest`` is never
    missing; else two renames, with ``dest`` absent for the moment between them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(dest), _RENAME_EXCHANGE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dest))
    old = new.parent / f"{new.name}.old"
    os.rename(dest, old)
    os.rename(new, dest)
    os.rename(old, new)
