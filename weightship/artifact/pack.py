"""Packing: turn a model directory into a manifest (sha256 per file, safetensors checked)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from weightship.artifact import hashing, tensors
from weightship.artifact.digestcache import DigestCache
from weightship.artifact.manifest import SIGNATURE_FILE, FileEntry, Manifest, check_relpath, path_sort_key
from weightship.errors import ModelError

# The reference signer leaves these out of every signature; so do we, so that a
# signature made by either tool verifies with the other.
DEFAULT_IGNORES = (".git", ".gitattributes", ".github", ".gitignore", SIGNATURE_FILE)


@dataclass
class PackedModel:
    """A packed model directory: its manifest and where each file lies on disk."""

    root: Path
    manifest: Manifest
    local: dict[str, Path]
    ignore_paths: list[str]
    has_symlinks: bool
    # CRC32 of every hashing.CRC_CHUNK bytes of the files hashed (not those taken from
    # the digest cache), read in the same pass as their sha256, when pack was asked.
    chunk_crc32: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def path_of(self, relpath: str) -> Path:
        return self.local[relpath]


def is_ignored(relpath: str, ignore_paths: Iterable[str]) -> bool:
    """True when relpath is an ignored path or lies below one (component-wise)."""
    parts = path_sort_key(relpath)
    for ign in ignore_paths:
        ip = path_sort_key(ign.strip("/"))
        if parts[: len(ip)] == ip:
            return True
    return False


def normalise_ignores(root: Path, extra: Iterable[str | Path] = ()) -> list[str]:
    """Default ignores plus user ones, as relative posix paths; refuses paths outside root."""
    out = list(DEFAULT_IGNORES)
    for raw in extra:
        p = Path(raw)
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                raise ModelError(f"--ignore {raw}: not inside {root}") from None
        else:
            rel = Path(os.path.normpath(str(raw))).as_posix()
        check_relpath(rel)
        if rel not in out:
            out.append(rel)
    return out


def walk(root: Path, ignore_paths: list[str]) -> tuple[dict[str, Path], bool]:
    """List the files of a model directory, refusing anything unsafe to publish."""
    if not root.is_dir():
        raise ModelError(f"{root}: not a directory", "pass the model directory")
    real_root = root.resolve()
    files: dict[str, Path] = {}
    has_symlinks = False
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            rel = rel_dir + d
            if is_ignored(rel, ignore_paths):
                dirnames.remove(d)
            elif (Path(dirpath) / d).is_symlink():
                raise ModelError(
                    f"{rel}: symlink to a directory refused",
                    "copy the directory in or add it with --ignore",
                )
        for name in filenames:
            rel = rel_dir + name
            if is_ignored(rel, ignore_paths):
                continue
            check_relpath(rel)
            full = Path(dirpath) / name
            if full.is_symlink():
                target = os.readlink(full)
                resolved = full.resolve()
                if os.path.isabs(target) or not resolved.is_relative_to(real_root):
                    raise ModelError(
                        f"{rel}: symlink points outside the model directory ({target})",
                        "replace it with the file itself",
                    )
                if not resolved.is_file():
                    raise ModelError(f"{rel}: symlink to a missing or special file ({target})")
                has_symlinks = True
            elif not full.is_file():
                raise ModelError(f"{rel}: not a regular file", "remove it or add it with --ignore")
            files[rel] = full
    if not files:
        raise ModelError(f"{root}: no files to pack")
    return files, has_symlinks


def pack(
    root: Path | str,
    *,
    ignore: Iterable[str | Path] = (),
    progress: hashing.Progress | None = None,
    workers: int | None = None,
    cache: DigestCache | None = None,
    cancel: threading.Event | None = None,
    crc32: bool = False,
) -> PackedModel:
    """Walk, check and hash a model directory. Nothing is written in it.

    With a digest ``cache``, files unchanged since they were last hashed are not read
    again (see weightship.digestcache), and the cache learns the rest. Setting ``cancel``
    stops the hashing; pack sets it too when it fails early. With ``crc32``, the files
    read also get their chunk CRC32s (``PackedModel.chunk_crc32``)."""
    root = Path(root)
    ignore_paths = normalise_ignores(root, ignore)
    local, has_symlinks = walk(root, ignore_paths)
    known: dict[str, tuple[str, int]] = {}
    stats: dict[str, os.stat_result] = {}
    if cache is not None:
        for rel, path in local.items():
            stats[rel] = st = path.stat()
            digest = cache.lookup(rel, st)
            if digest is not None:
                known[rel] = (digest, st.st_size)
                if progress:
                    progress(st.st_size)
    hashed_at = time.time_ns()
    todo = [path for rel, path in local.items() if rel not in known]
    # Headers are checked while the hashing threads run (hashlib releases the GIL): a
    # truncated shard still fails in milliseconds, and sets ``stop`` to end the hashing.
    stop = cancel if cancel is not None else threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="weightship-hash") as bg:
        hashed = bg.submit(hashing.digest_files, todo, progress=progress, workers=workers, cancel=stop, crc32=crc32)
        try:
            summaries = {
                rel: tensors.summarise(path, rel) for rel, path in local.items() if tensors.is_safetensors(rel)
            }
        except BaseException:
            stop.set()
            raise
        by_path = hashed.result()
    entries = []
    crcs: dict[str, tuple[int, ...]] = {}
    for rel, path in local.items():
        if rel in known:
            digest, size = known[rel]
        else:
            d = by_path[path]
            digest, size = d.sha256, d.size
            if d.chunk_crc32 is not None:
                crcs[rel] = d.chunk_crc32
        entries.append(FileEntry(rel, size, digest, summaries.get(rel)))
        if cache is not None and rel not in known and size == stats[rel].st_size:
            cache.remember(rel, stats[rel], digest, hashed_at)
    if cache is not None:
        cache.forget_others(set(local))
        cache.save()
    manifest = Manifest(files=entries, ignore_paths=list(ignore_paths))
    return PackedModel(root, manifest, local, ignore_paths, has_symlinks, crcs)
