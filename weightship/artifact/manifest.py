"""The release manifest: what a release contains, as canonical JSON.

The manifest is the one document a node trusts after the signature: it lists every
file with its size and sha256, and the release digest is the sha256 of its canonical
bytes. Anything read from a store is untrusted input, so :meth:`Manifest.from_bytes`
validates every field, and every path must stay inside the model directory.
The format is written down in docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from weightship.errors import IntegrityError, ModelError

SCHEMA = "weightship.manifest/v1"
# What pull and node caches write into a release directory themselves: no file of the
# release may take these names (its bytes would be written over, or over them).
# The signature's name in a model directory (OMS, as model_signing writes it).
SIGNATURE_FILE = "model.sig"
RESERVED_PATHS = frozenset({SIGNATURE_FILE})
# The OMS resource name of a model that is one file, as the reference signer writes it:
# the file's path relative to itself.
SINGLE_FILE_RESOURCE = "."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# A path must fit wherever a release lands: S3 keys stop at 1024 bytes, and a node or
# file:// store writes each file under a temporary name of the component plus about 20
# bytes (".tmp-NAME-RANDOM"), which must stay within the 255 bytes of a file name.
MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 200


def check_relpath(path: str) -> str:
    """Refuse a path that could escape the directory it is materialised into, or that
    stores and node caches could not hold (not UTF-8, too long)."""
    if not path or "\x00" in path or "\\" in path:
        raise ModelError(f"unsafe path {path!r} in model", "paths must be plain relative paths")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        # os.walk hands undecodable bytes over as lone surrogates; show them as \xNN.
        try:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            shown = path.encode("utf-8", "backslashreplace").decode()
        raise ModelError(
            f"file name '{shown}' is not valid UTF-8",
            "rename it: manifests, signatures and stores hold UTF-8 paths",
        ) from None

    def abbreviated(text: str) -> str:
        return text if len(text) <= 160 else f"{text[:100]}…{text[-40:]}"

    if len(encoded) > MAX_PATH_BYTES:
        raise ModelError(
            f"path '{abbreviated(path)}' is {len(encoded)} bytes long, more than the {MAX_PATH_BYTES} "
            "bytes a path in a release may have",
            "shorten it or its directories: stores and node caches could not hold it",
        )
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith("/"):
        raise ModelError(f"absolute path {path!r} refused", "paths must be relative")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ModelError(
            f"path {path!r} refused: it contains '..', '.' or an empty component",
            "paths must stay inside the model directory",
        )
    for part in parts:
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise ModelError(
                f"file name '{abbreviated(part)}'{'' if part == path else f' in {abbreviated(path)!r}'} is "
                f"{len(part.encode())} bytes long, "
                f"more than the {MAX_COMPONENT_BYTES} bytes a name in a release may have",
                "shorten it: stores and node caches add a temporary suffix that must still fit in 255 bytes",
            )
    return path


def path_sort_key(path: str) -> tuple[str, ...]:
    """Order paths by their components, as the OMS resource list is ordered."""
    return tuple(path.split("/"))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class TensorSummary:
    """What a safetensors header says, without reading any tensor data."""

    tensors: int
    parameters: int
    dtypes: dict[str, int]
    header_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "parameters": self.parameters,
            "dtypes": dict(sorted(self.dtypes.items())),
            "header_bytes": self.header_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSummary:
        return cls(
            tensors=int(d["tensors"]),
            parameters=int(d["parameters"]),
            dtypes={str(k): int(v) for k, v in d["dtypes"].items()},
            header_bytes=int(d["header_bytes"]),
        )


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF header says (docs/format.md), without reading any tensor data."""

    version: int
    tensors: int
    parameters: int
    # Tensors per ggml type name ("Q4_K", "F32"; "type-N" for a type weightship does not know).
    types: dict[str, int]
    metadata_kvs: int
    # general.architecture when the file names one ("llama"), else None.
    architecture: str | None
    header_bytes: int

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "types": dict(sorted(self.types.items())),
            "metadata_kvs": self.metadata_kvs,
            "header_bytes": self.header_bytes,
        }
        if self.architecture is not None:
            d["architecture"] = self.architecture
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GGUFSummary:
        arch = d.get("architecture")
        return cls(
            version=int(d["version"]),
            tensors=int(d["tensors"]),
            parameters=int(d["parameters"]),
            types={str(k): int(v) for k, v in d["types"].items()},
            metadata_kvs=int(d["metadata_kvs"]),
            architecture=None if arch is None else str(arch),
            header_bytes=int(d["header_bytes"]),
        )


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    safetensors: TensorSummary | None = None
    # Only for *.gguf; absent from manifests written before weightship read GGUF headers.
    gguf: GGUFSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.safetensors is not None:
            d["safetensors"] = self.safetensors.to_dict()
        if self.gguf is not None:
            d["gguf"] = self.gguf.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        path = check_relpath(str(d["path"]))
        sha = str(d["sha256"])
        if not _HEX64.match(sha):
            raise IntegrityError(f"manifest entry {path!r} has a malformed sha256 {sha!r}")
        size = d["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"manifest entry {path!r} has an invalid size {size!r}")
        st = d.get("safetensors")
        gg = d.get("gguf")
        return cls(
            path, size, sha, TensorSummary.from_dict(st) if st else None, GGUFSummary.from_dict(gg) if gg else None
        )


@dataclass
class Manifest:
    """A release's file list plus the metadata OMS has no field for."""

    files: list[FileEntry]
    name: str | None = None
    version: str | None = None
    created: str | None = None
    # "unsigned", or the OMS method that signed the files: "key", "certificate", "sigstore".
    signature: str = "unsigned"
    ignore_paths: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = sorted(self.files, key=lambda f: path_sort_key(f.path))
        seen: set[str] = set()
        for f in self.files:
            if f.path in RESERVED_PATHS:
                raise ModelError(
                    f"path {f.path!r} is reserved: weightship writes the release's signature there",
                    "rename the file; a release cannot carry a file of that name",
                )
            if f.path in seen:
                raise ModelError(f"path {f.path!r} appears twice in the manifest")
            seen.add(f.path)
        # A path that is both a file and a directory cannot be materialised.
        for f in self.files:
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in seen:
                    raise ModelError(f"path {f.path!r} lies under a file of the same release")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def digests(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}

    def blobs(self) -> dict[str, int]:
        """Distinct blobs (sha256 hex -> size): identical files are stored once."""
        return {f.sha256: f.size for f in self.files}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "signature": self.signature,
            "ignore_paths": sorted(self.ignore_paths),
            "files": [f.to_dict() for f in self.files],
            "total_size": self.total_size,
        }
        if self.source:
            d["source"] = dict(sorted(self.source.items()))
        return d

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise IntegrityError(
                f"{where} is not a {SCHEMA} document",
                "upgrade weightship if the store was written by a newer version",
            )
        try:
            files = [FileEntry.from_dict(f) for f in d["files"]]
            m = cls(
                files=files,
                name=d.get("name"),
                version=d.get("version"),
                created=d.get("created"),
                signature=str(d.get("signature", "unsigned")),
                ignore_paths=[str(p) for p in d.get("ignore_paths", [])],
                source={str(k): str(v) for k, v in (d.get("source") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(f"{where} is malformed ({e!r})") from None
        if d.get("total_size") != m.total_size:
            raise IntegrityError(f"{where} total_size does not add up")
        return m
