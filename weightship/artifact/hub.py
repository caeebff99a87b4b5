"""Publishing from the Hugging Face Hub: a repo snapshot at one commit, packed for release.

huggingface-hub fetches the files into its cache (``HF_HOME``/``HF_HUB_CACHE``), where each
file lies once under ``models--ORG--NAME/blobs/<etag>`` and a commit's tree is rebuilt
under ``snapshots/<COMMIT>/`` from symlinks into ``blobs/``. The etag is the Hub's own
content address for the file: the sha256 for a Git LFS file, the git blob sha1 for a plain
one. So the bytes about to be signed are checked against what the Hub says they are even
with ``HF_HUB_OFFLINE=1``; online, the Hub's file metadata (``lfs.sha256``, ``blob_id``)
is checked as well.

A branch or tag is resolved to its commit (the snapshot folder is named after it) and the
commit is what the manifest records, so a release always says exactly which Hub bytes it
was made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from weightship.artifact import hashing, pack
from weightship.artifact.manifest import FileEntry, Manifest, check_relpath
from weightship.errors import IntegrityError, ModelError, UsageError, WeightshipError
from weightship.progress import Reporter

SCHEME = "hf://"
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The only revisions that contain a "/", as huggingface-hub's own hf:// grammar has it;
# anything else after a "/" would be a path inside the repo.
_SLASHED_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)$")
_OTHER_REPO_TYPES = ("datasets/", "spaces/", "kernels/", "buckets/")
_USAGE = "expected hf://ORG/MODEL or hf://ORG/MODEL@REVISION"


class HubError(WeightshipError):
    """The Hub (or its local cache) cannot give us the repo at the revision asked for."""


@dataclass(frozen=True)
class HubURL:
    """A parsed ``hf://ORG/MODEL[@REVISION]``; ``revision`` is ``main`` when none is given."""

    repo_id: str
    revision: str

    @property
    def pinned(self) -> bool:
        """True when the revision is a full commit hash: the only revision that cannot move."""
        return bool(_COMMIT.match(self.revision))

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}@{self.revision}"


def is_hub_url(source: str) -> bool:
    return source.startswith(SCHEME)


def parse_hub_url(url: str) -> HubURL:
    """Parse ``hf://[models/]ORG/MODEL[@REVISION]``; refuses other repo types and paths in a repo."""
    if not url.startswith(SCHEME):
        raise UsageError(f"{url}: not a Hub URL", _USAGE)
    body = url[len(SCHEME) :].rstrip("/")
    body = body.removeprefix("models/")
    if body.startswith(_OTHER_REPO_TYPES):
        raise UsageError(f"{url}: only model repos can be published", _USAGE)
    repo_id, at, rev = body.partition("@")
    if repo_id.count("/") != 1:
        hint = "a path inside the repo is not supported: use --include to pick files" if "/" in repo_id else _USAGE
        raise UsageError(f"{url}: the repo must be ORG/MODEL", hint)
    if at:
        if "/" in rev and not _SLASHED_REF.match(rev):
            raise UsageError(
                f"{url}: a path inside the repo is not supported",
                "use --include to pick files; a branch with a '/' is written with %2F",
            )
        rev = unquote(rev)
        if not rev:
            raise UsageError(f"{url}: empty revision after '@'", _USAGE)
    else:
        rev = DEFAULT_REVISION
    _check_repo_id(url, repo_id)
    # The revision names a file under the cache's refs/ offline, so it must not climb out.
    if any(c.isspace() or ord(c) < 32 for c in rev) or "\\" in rev or rev.startswith("/") or ".." in rev.split("/"):
        raise UsageError(f"{url}: invalid revision {rev!r}", "use a branch, tag or 40-hex commit")
    return HubURL(repo_id, rev)


def _check_repo_id(url: str, repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{url}: invalid repo id {repo_id!r}: {_first_line(e)}", _USAGE) from None


@dataclass
class HubSnapshot:
    """A Hub repo at one commit, packed: pass ``packed`` and ``source_info`` to ``release.publish``."""

    repo_id: str
    requested: str
    commit: str
    path: Path
    packed: pack.PackedModel

    @property
    def source_info(self) -> dict[str, str]:
        """What the manifest's ``source`` records about the Hub origin."""
        return {"hub_repo": self.repo_id, "hub_revision": self.commit, "hub_requested": self.requested}


def snapshot(
    url: str,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    token: str | None = None,
    *,
    ignore: Iterable[str] = (),
    cache_dir: Path | str | None = None,
    offline: bool | None = None,
    reporter: Reporter | None = None,
) -> HubSnapshot:
    """Fetch (or find in the cache) a Hub repo at a revision, check every file, and pack it.

    ``include``/``exclude`` are the Hub's allow/ignore glob patterns. ``token`` defaults
    to huggingface-hub's own (``HF_TOKEN`` or the saved login), ``cache_dir`` to its
    cache (``HF_HUB_CACHE`` or ``HF_HOME/hub``), and ``offline`` to ``HF_HUB_OFFLINE``.
    ``ignore`` adds to weightship's default ignores (``.gitattributes``, ``model.sig``…),
    which apply as they do to a directory, so a signature verifies the same either way.
    """
    from huggingface_hub import constants

    hub_url = parse_hub_url(url)
    include, exclude = list(include), list(exclude)
    reporter = reporter or Reporter()
    if offline is None:
        # Read at call time too: huggingface-hub reads it once, when it is first imported.
        offline = bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    storage = cache / ("models--" + hub_url.repo_id.replace("/", "--"))

    snap_dir = _download(hub_url, include, exclude, token, cache, storage, offline, reporter)
    commit = snap_dir.name
    if not _COMMIT.match(commit) or (hub_url.pinned and commit != hub_url.revision):
        raise HubError(f"{hub_url}: huggingface-hub returned {snap_dir}, which is not a snapshot of that commit")
    where = f"{SCHEME}{hub_url.repo_id}@{commit}"

    ignore_paths = pack.normalise_ignores(snap_dir, ignore)
    files = _walk_snapshot(snap_dir, storage / "blobs", where)
    selected = _select(list(files), include, exclude, ignore_paths)
    if not selected:
        raise ModelError(
            f"{where}: no files to publish after --include/--exclude",
            f"the snapshot has: {', '.join(sorted(files)[:8])}",
        )
    remote = None if offline else _remote_metadata(hub_url, commit, token, cache, storage)
    if remote is not None:
        missing = sorted(set(_select(list(remote), include, exclude, ignore_paths)) - set(selected))
        if missing:
            raise HubError(
                f"{where}: the cached snapshot lacks {', '.join(missing[:5])}",
                "delete that snapshot folder from the Hub cache and publish again",
            )

    local = {rel: files[rel] for rel in selected}
    # The header checks a directory gets (safetensors, GGUF, sharded indexes), before any
    # hashing. The pickle guard is left to release.publish, which knows the configured mode
    # and applies it to every packed model: running it here too would warn twice.
    summaries, ggufs, _ = pack.check_files(local, pickle="allow")
    with reporter.task("hashing", sum(p.stat().st_size for p in set(local.values()))) as advance:
        by_path = hashing.sha256_files(set(local.values()), progress=advance)
    entries = []
    for rel, path in local.items():
        digest, size = by_path[path]
        _check_against_hub(where, rel, path, digest, size, remote)
        entries.append(FileEntry(rel, size, digest, summaries.get(rel), ggufs.get(rel)))
    manifest = Manifest(files=entries, ignore_paths=list(ignore_paths))
    # The release materialises as plain files, so the signature does not claim symlinks.
    packed = pack.PackedModel(snap_dir, manifest, local, list(ignore_paths), has_symlinks=False)
    return HubSnapshot(hub_url.repo_id, hub_url.revision, commit, snap_dir, packed)


# -- fetching --------------------------------------------------------------------------


def _download(
    hub_url: HubURL,
    include: list[str],
    exclude: list[str],
    token: str | None,
    cache: Path,
    storage: Path,
    offline: bool,
    reporter: Reporter,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    reporter.info(f"{hub_url}: {'reading the local Hub cache' if offline else 'fetching from the Hub'}")
    # huggingface-hub's tqdm bars turn into carriage-return noise in a CI log; keep them for terminals.
    mute = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if mute:
        disable_progress_bars()
    try:
        with _hub_errors(hub_url, cache, storage, offline):
            path = snapshot_download(
                hub_url.repo_id,
                repo_type="model",
                revision=hub_url.revision,
                cache_dir=str(cache),
                token=token,
                local_files_only=offline,
                # Offline these are ignored (the whole cached snapshot comes back); _select applies them.
                allow_patterns=include or None,
                ignore_patterns=exclude or None,
            )
    finally:
        if mute:
            enable_progress_bars()
    return Path(path)


def _remote_metadata(
    hub_url: HubURL, commit: str, token: str | None, cache: Path, storage: Path
) -> dict[str, tuple[str | None, str | None, int | None]]:
    """The Hub's own record of each file at the commit: (lfs sha256, git blob sha1, size)."""
    from huggingface_hub import HfApi

    with _hub_errors(hub_url, cache, storage, offline=False):
        info = HfApi(token=token).model_info(hub_url.repo_id, revision=commit, files_metadata=True)
    out: dict[str, tuple[str | None, str | None, int | None]] = {}
    for s in info.siblings or []:
        lfs = s.lfs
        if lfs is None:
            out[s.rfilename] = (None, s.blob_id, s.size)
        else:
            # BlobLfsInfo is a plain dataclass in some huggingface-hub releases and a dict in others.
            field = lfs.get if isinstance(lfs, dict) else lambda k, lfs=lfs: getattr(lfs, k, None)
            out[s.rfilename] = (field("sha256"), None, field("size"))
    return out


@contextlib.contextmanager
def _hub_errors(hub_url: HubURL, cache: Path, storage: Path, offline: bool) -> Iterator[None]:
    """Turn huggingface-hub's exceptions into one line that says what to do."""
    # huggingface_hub.utils re-exports these in every release we support (errors moved modules over time).
    from huggingface_hub import utils as hf_errors

    try:
        from huggingface_hub.errors import IncompleteSnapshotError as incomplete
    except ImportError:  # older releases never raise it
        incomplete = None

    try:
        yield
    except hf_errors.GatedRepoError:
        raise HubError(
            f"{hub_url.repo_id} is a gated repo and this token has no access to it",
            "accept its terms on the Hub, then set HF_TOKEN to a token of that account",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"Hub repo {hub_url.repo_id} not found (or it is private and the token cannot see it)",
            "check ORG/MODEL; for a private repo set HF_TOKEN",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(
            f"revision {hub_url.revision!r} not found in Hub repo {hub_url.repo_id}",
            "use a branch, tag or full commit hash of that repo",
        ) from None
    except hf_errors.LocalEntryNotFoundError as e:
        if offline or _truthy(os.environ.get("HF_HUB_OFFLINE")):
            raise _offline_error(hub_url, cache, storage) from None
        raise HubError(
            f"cannot reach the Hub for {hub_url}: {_first_line(e.__cause__ or e)}",
            "check the network, or set HF_HUB_OFFLINE=1 to publish from the local Hub cache",
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"Hub request for {hub_url} failed: {_first_line(e)}") from None
    except Exception as e:
        if incomplete is not None and isinstance(e, incomplete):
            raise HubError(
                f"{hub_url}: the cached snapshot is incomplete",
                "publish once with network access (unset HF_HUB_OFFLINE) to complete it",
            ) from None
        if isinstance(e, hf_errors.HFValidationError):
            raise UsageError(f"{hub_url}: {_first_line(e)}") from None
        if _is_network_error(e):
            raise HubError(
                f"cannot reach the Hub for {hub_url}: {type(e).__name__}: {_first_line(e)}",
                "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to publish from the local Hub cache",
            ) from None
        raise


def _is_network_error(e: BaseException) -> bool:
    # huggingface-hub has used requests, httpx and its own httpx fork over the releases we support:
    # recognise their transport errors by package rather than import each of them.
    package = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or package in {
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "requests",
        "urllib3",
    }


def _offline_error(hub_url: HubURL, cache: Path, storage: Path) -> HubError:
    """Say which part of the offline cache is missing: the repo, the ref, or the snapshot."""
    fetch_hint = f"fetch it first with network access (hf download {hub_url.repo_id}), or unset HF_HUB_OFFLINE"
    if not storage.is_dir():
        return HubError(
            f"{hub_url.repo_id} is not in the Hugging Face cache {cache} (HF_HUB_OFFLINE is set)", fetch_hint
        )
    cached = sorted(p.name for p in (storage / "snapshots").glob("*") if p.is_dir())
    refs_dir = storage / "refs"
    refs = sorted(p.relative_to(refs_dir).as_posix() for p in refs_dir.rglob("*") if p.is_file())
    have = f"cached refs: {', '.join(refs) or 'none'}; commits: {', '.join(cached) or 'none'}"
    ref_file = refs_dir / hub_url.revision
    if not hub_url.pinned and ref_file.is_file():
        commit = ref_file.read_text().strip()
        return HubError(
            f"{hub_url}: refs/{hub_url.revision} in the Hub cache points at {commit}, whose snapshot is missing",
            fetch_hint,
        )
    return HubError(f"{hub_url}: revision {hub_url.revision!r} is not in the Hugging Face cache ({have})", fetch_hint)


# -- reading the snapshot --------------------------------------------------------------


def _walk_snapshot(snap_dir: Path, blobs_dir: Path, where: str) -> dict[str, Path]:
    """Every file of a snapshot folder, each resolved to the blob it links to.

    A symlink must land in this repo's own ``blobs/`` folder: a cache someone tampered
    with could otherwise make us publish any file on the machine under a model's name.
    """
    real_blobs = Path(os.path.realpath(blobs_dir))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(snap_dir, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(snap_dir).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in dirnames:
            if (here / d).is_symlink():
                raise ModelError(f"{where}: {prefix}{d} is a symlinked directory in the Hub cache", "re-download it")
        for name in filenames:
            rel = check_relpath(prefix + name)
            full = here / name
            if full.is_symlink():
                resolved = Path(os.path.realpath(full))
                if resolved.parent != real_blobs:
                    raise ModelError(
                        f"{where}: {rel} links to {os.readlink(full)}, outside the repo's blobs/ in the Hub cache",
                        "delete the snapshot folder and download it again",
                    )
                if not resolved.is_file():
                    raise ModelError(
                        f"{where}: {rel} links to a missing blob {resolved.name} in the Hub cache",
                        "delete the snapshot folder and download it again",
                    )
                files[rel] = resolved
            elif full.is_file():
                # huggingface-hub copies instead of linking where symlinks are unavailable.
                files[rel] = full
            else:
                raise ModelError(f"{where}: {rel} is not a regular file")
    return files


def _select(paths: list[str], include: list[str], exclude: list[str], ignore_paths: list[str]) -> list[str]:
    """The Hub's own glob semantics for --include/--exclude, then weightship's ignores."""
    from huggingface_hub.utils import filter_repo_objects

    chosen = filter_repo_objects(paths, allow_patterns=include or None, ignore_patterns=exclude or None)
    return sorted(p for p in chosen if not pack.is_ignored(p, ignore_paths))


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's contents: what the Hub names a plain (non-LFS) file by."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        while chunk := fh.read(hashing.CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_against_hub(
    where: str,
    rel: str,
    path: Path,
    digest: str,
    size: int,
    remote: dict[str, tuple[str | None, str | None, int | None]] | None,
) -> None:
    hint = "the Hub cache is corrupt: delete that blob and the snapshot folder, then download again"
    name = path.name if path.parent.name == "blobs" else ""
    if _SHA256.match(name) and name != digest:
        raise IntegrityError(
            f"{where}: {rel} does not match its Hub LFS sha256: blob {name} holds bytes with sha256 {digest}", hint
        )
    if _COMMIT.match(name) and git_blob_sha1(path) != name:
        raise IntegrityError(f"{where}: {rel} does not match its Hub git blob id {name}", hint)
    if remote is None or rel not in remote:
        return
    lfs_sha, blob_id, remote_size = remote[rel]
    if lfs_sha and lfs_sha != digest:
        raise IntegrityError(f"{where}: {rel} has sha256 {digest} but the Hub's LFS sha256 is {lfs_sha}", hint)
    if blob_id and not lfs_sha and git_blob_sha1(path) != blob_id:
        raise IntegrityError(f"{where}: {rel} does not match the Hub's git blob id {blob_id}", hint)
    if remote_size is not None and remote_size != size:
        raise IntegrityError(f"{where}: {rel} is {size} bytes but the Hub says {remote_size}", hint)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
