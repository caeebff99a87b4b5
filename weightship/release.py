"""Releases in a store: publish, resolve, pull, list, tag.

The write order is what makes a store safe to read while it is written (see
docs/format.md): blobs first, then the signature, then the manifest (the commit point:
a version exists once its manifest does), then tags. A reader that finds a manifest
therefore finds every blob and the signature it names; a reader that finds a tag finds
a whole release.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from weightship.artifact import hashing, pack, refs
from weightship.artifact.digestcache import DigestCache
from weightship.artifact.manifest import Manifest
from weightship.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    PolicyError,
    SignatureError,
    UsageError,
    WeightshipError,
)
from weightship.progress import Reporter
from weightship.store import Store, takes_chunk_crc32
from weightship.store.file import fsync_dir, write_new_file
from weightship.store.layout import legacy_signature_key, manifest_key, signature_key, tag_key
from weightship.trust import oms
from weightship.trust.bundle import verify_bundle
from weightship.trust.policy import SignerInfo, TrustPolicy
from weightship.trust.signers import Signer
from weightship.trust.verify import compare, safe_ignores

UPLOAD_WORKERS = 4


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
    return {k[len(prefix) :]: store.read(k).decode().strip() for k in store.list(prefix)}


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
        packed.manifest.digests(),
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
) -> PublishResult:
    """Pack, sign, upload what is missing, then commit manifest and tags.

    ``store`` may be a function that opens it: it is then called while the model is
    being hashed, so that connecting (and for S3, starting botocore) costs no time of
    its own. ``cache`` lets files unchanged since the last publish skip hashing.
    ``chunk_crc32``: record CRC32s while hashing for the upload to send (Store.put_blob);
    by default when ``store`` is a store that takes them (pass it with a function)."""
    reporter = reporter or Reporter()
    name, version = refs.parse_release(ref)
    tag_list = [refs.check_label(t, "tag") for t in tags_]

    if packed is None:
        root = Path(source)
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        with reporter.task("hashing", total) as advance:
            crc32 = chunk_crc32
            if crc32 is None:
                crc32 = isinstance(store, Store) and takes_chunk_crc32(store.url)
            store, packed = _pack_while_opening(root, store, name, version, tag_list, ignore, advance, cache, crc32)
    else:
        store = store if isinstance(store, Store) else store()
        _check_publishable(store, name, version, tag_list)
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

    up, skipped, n_up, n_skip = upload_blobs(store, packed, reporter)
    data = manifest.to_bytes()
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
        raise ConflictError(
            f"{name}:{version} already exists (published concurrently)",
            "versions are immutable: publish a new version",
        ) from None
    for t in tag_list:
        store.write(tag_key(name, t), version.encode())
    return PublishResult(
        name=name,
        version=version,
        digest=digest_of(data),
        tags=tag_list,
        signed=manifest.signature,
        files=len(manifest.files),
        total_bytes=manifest.total_size,
        bytes_uploaded=up,
        bytes_skipped=skipped,
        blobs_uploaded=n_up,
        blobs_skipped=n_skip,
        store=store.url,
    )


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
) -> tuple[Store, pack.PackedModel]:
    """Hash the model in the background while the store is opened and checked here: a
    version that already exists is refused at once, not after the hashing."""
    cancel = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="weightship-pack") as bg:
        packing = bg.submit(pack.pack, root, ignore=ignore, progress=progress, cache=cache, cancel=cancel, crc32=crc32)
        try:
            opened = store if isinstance(store, Store) else store()
            _check_publishable(opened, name, version, tag_list)
        except BaseException:
            cancel.set()
            raise
        return opened, packing.result()


def _check_publishable(store: Store, name: str, version: str, tag_list: list[str]) -> None:
    if store.exists(manifest_key(name, version)):
        raise ConflictError(
            f"{name}:{version} already exists in {store.url}",
            "versions are immutable: publish a new version",
        )
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


def move_tag(store: Store, ref: str, tag: str) -> Release:
    """Point ``NAME:TAG`` at the release ``ref`` names (tags move; versions never do)."""
    refs.check_label(tag, "tag")
    release = resolve(store, ref)
    if store.exists(manifest_key(release.name, tag)):
        raise ConflictError(
            f"tag {tag!r} would shadow version {release.name}:{tag}",
            "a tag may not share a name with a version: choose another tag",
        )
    store.write(tag_key(release.name, tag), release.version.encode())
    return release


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
) -> PullResult:
    """Materialise a release into ``dest``, verifying every byte before it appears.

    Blobs are downloaded into a staging directory beside ``dest`` (kept between runs, so
    an interrupted pull resumes); ``dest`` appears by one rename once everything has
    been verified, so a failed pull leaves no file in it.

    Like ``cp`` and every S3 download tool, a pull leaves writing its bytes out to the
    kernel unless ``sync`` (then every file and directory is fsynced before ``dest``
    appears, at the disk's speed). Either way nothing unverified is ever used: blobs an
    interrupted pull had finished are hashed again before they are taken.
    """
    reporter = reporter or Reporter()
    policy = policy or TrustPolicy()
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not empty", "pull into a new directory")
    release = resolve(store, ref)
    signer = check_signature(release, policy)
    if signer:
        reporter.info(f"{release.ref}: signature verified ({signer.describe()})")
    staging = dest.parent / f".{dest.name}.weightship-partial"
    blobs_dir = staging / "blobs"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fetched = 0
    blobs = release.manifest.blobs()
    _recheck(blobs_dir, blobs)
    todo = {h: s for h, s in blobs.items() if not (blobs_dir / h).exists()}
    with (
        reporter.task("downloading", sum(todo.values())) as advance,
        ThreadPoolExecutor(max_workers=UPLOAD_WORKERS) as pool,
    ):

        def fetch(h: str) -> int:
            part = blobs_dir / f"{h}.part"
            try:
                n = store.get_blob(h, part, blobs[h], advance, sync=sync)
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
    for f in release.manifest.files:
        uses[f.sha256] = uses.get(f.sha256, 0) + 1
    for f in release.manifest.files:
        target = tree / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        uses[f.sha256] -= 1
        # A blob's last user takes it by rename; identical files before it get copies.
        if uses[f.sha256]:
            shutil.copyfile(blobs_dir / f.sha256, target)
        else:
            os.replace(blobs_dir / f.sha256, target)
    if release.signature is not None:
        write_new_file(tree / pack.SIGNATURE_FILE, release.signature)
    if sync:
        _sync_tree(tree)
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
        files=len(release.manifest.files),
        total_bytes=release.manifest.total_size,
        bytes_fetched=fetched,
        signer=signer.to_dict() if signer else {},
    )
