"""Packing: turn a model directory into a manifest (sha256 per file, safetensors checked)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from weightship.artifact import gguf, hashing, pickles, tensors
from weightship.artifact.digestcache import DigestCache
from weightship.artifact.manifest import (
    SIGNATURE_FILE,
    SINGLE_FILE_RESOURCE,
    FileEntry,
    GGUFSummary,
    Manifest,
    TensorSummary,
    check_relpath,
    path_sort_key,
)
from weightship.errors import ModelError, UsageError

# The reference signer leaves these out of every signature; so do we, so that a
# signature made by either tool verifies with the other.
DEFAULT_IGNORES = (".git", ".gitattributes", ".github", ".gitignore", SIGNATURE_FILE)
# What the reference signer records for a single file: its git defaults only, since the
# signature of a file lies outside it.
SINGLE_FILE_IGNORES = tuple(p for p in DEFAULT_IGNORES if p != SIGNATURE_FILE)


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
    # Packed from one file rather than a directory: ``root`` is that file, the manifest
    # lists it under its name, and the signature names it "." as model_signing does.
    single_file: bool = False
    # One line per thing worth a word that did not stop the pack (pickle files); the CLI
    # prints them as ``warning:`` lines.
    warnings: list[str] = field(default_factory=list)

    def path_of(self, relpath: str) -> Path:
        return self.local[relpath]

    def resources(self) -> dict[str, str]:
        """The OMS resources a signature of this model lists: name -> sha256 hex."""
        if self.single_file:
            (only,) = self.manifest.files
            return {SINGLE_FILE_RESOURCE: only.sha256}
        return self.manifest.digests()


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
        if not root.exists():
            raise ModelError(f"{root}: no such file or directory", "pass the model directory or file")
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
    pickle: str = pickles.DEFAULT_MODE,
) -> PackedModel:
    """Walk, check and hash a model directory, or one model file. Nothing is written.

    A single file (``model.gguf``, a lone ``.safetensors``…) packs as a model of that one
    file, under its name. Headers are checked (safetensors, GGUF, and every
    ``*.safetensors.index.json`` against its shards), and pickle files get the ``pickle``
    mode of :mod:`weightship.artifact.pickles` (``warn``, ``refuse``, ``allow``).

    With a digest ``cache``, files unchanged since they were last hashed are not read
    again (see weightship.digestcache), and the cache learns the rest. Setting ``cancel``
    stops the hashing; pack sets it too when it fails early. With ``crc32``, the files
    read also get their chunk CRC32s (``PackedModel.chunk_crc32``)."""
    root = Path(root)
    pickles.check_mode(pickle)
    single = root.is_file()
    if single:
        if list(ignore):
            raise UsageError(f"--ignore applies to a model directory, and {root} is a file")
        ignore_paths = list(SINGLE_FILE_IGNORES)
        local = {check_relpath(root.name): root}
        has_symlinks = root.is_symlink()
    else:
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
            summaries, ggufs, warnings = check_files(local, pickle)
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
        entries.append(FileEntry(rel, size, digest, summaries.get(rel), ggufs.get(rel)))
        if cache is not None and rel not in known and size == stats[rel].st_size:
            cache.remember(rel, stats[rel], digest, hashed_at)
    if cache is not None:
        cache.forget_others(set(local))
        cache.save()
    manifest = Manifest(files=entries, ignore_paths=list(ignore_paths))
    return PackedModel(root, manifest, local, ignore_paths, has_symlinks, crcs, single, warnings)


def check_files(
    local: Mapping[str, Path], pickle: str = pickles.DEFAULT_MODE
) -> tuple[dict[str, TensorSummary], dict[str, GGUFSummary], list[str]]:
    """Every check of a model's files (relative path -> local path) that reads headers
    only: safetensors and GGUF headers, sharded indexes against their shards, and the
    pickle guard. Returns the safetensors and GGUF summaries by path and the warnings;
    raises ModelError naming the first file at fault."""
    summaries: dict[str, TensorSummary] = {}
    names: dict[str, frozenset[str]] = {}
    for rel, path in local.items():
        if tensors.is_safetensors(rel):
            summaries[rel], names[rel] = tensors.inspect(path, rel)
    ggufs = {rel: gguf.summarise(path, rel) for rel, path in local.items() if gguf.is_gguf(rel)}
    for rel, path in sorted(local.items()):
        if tensors.is_index(rel):
            tensors.check_index(rel, path, local, names)
    warnings = pickles.guard(local, pickle)
    return summaries, ggufs, warnings
