"""OCI registries as a store: ``oci://HOST[:PORT]/NAMESPACE``.

Release ``NAME:VERSION`` is the artifact ``HOST[:PORT]/NAMESPACE/NAME:VERSION``, laid out
as the CNCF ModelPack specification says (docs/format.md, "OCI registries"): an image
manifest of artifactType ``application/vnd.cncf.model.manifest.v1+json``, a ModelPack
config, and one uncompressed layer per file, so that every layer's digest is the file's
sha256, which is its weightship blob name. weightship's own manifest travels in the image
manifest's ``dev.weightship.manifest`` annotation, byte for byte; the OMS signature is a
referrer of the image manifest (artifactType ``application/vnd.dev.sigstore.bundle.v0.3+json``),
found through the referrers API or, on registries without one, the referrers tag schema.

The store keys (weightship/store/layout.py) map onto the registry thus:

* ``releases/N/V/manifest.json``: the image manifest tagged ``V`` in repository ``NS/N``
  whose ``dev.weightship.version`` annotation is ``V`` (so a tag never passes for a version);
* ``releases/N/V/sha256-D.sig``: the bundle of the signature referrer of that manifest
  whose ``dev.weightship.manifest.digest`` annotation is ``D``;
* ``tags/N/T``: the OCI tag ``T`` of ``NS/N``, pointing at the very manifest (same digest)
  of the version it names;
* ``blobs/sha256/HEX``: the blob in the repository of the release being written or read:
  a registry keeps blobs per repository, so blob calls need :meth:`OciStore.scoped`.

The distribution API is spoken with httpx (why not the ``oras`` package: docs/architecture.md);
authentication follows docker (weightship/store/oci_auth.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from weightship.artifact.manifest import Manifest
from weightship.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    StoreError,
    UsageError,
    WeightshipError,
)
from weightship.store.base import ObjectInfo, Progress, Store, blob_key
from weightship.store.checked import CheckedFile
from weightship.store.layout import parse_release_key
from weightship.store.oci_auth import RegistryAuth, is_loopback, load_credentials
from weightship.store.writer import BlobWriter

MiB = 1024 * 1024

# -- media types and annotations (ModelPack, OCI image spec, Sigstore) ----------------------

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
CODE = "application/vnd.cncf.model.code.v1.raw"
DATASET = "application/vnd.cncf.model.dataset.v1.raw"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# What a tag points at for the moment it takes to delete it on a registry that deletes
# manifests by digest only (OciStore._delete_tag).
TOMBSTONE = "application/vnd.dev.weightship.deleted-tag.v1"
ACCEPT = ", ".join(
    [
        MANIFEST,
        INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
UNTESTED = "org.cncf.model.file.mediatype.untested"
CREATED = "org.opencontainers.image.created"
OCI_VERSION = "org.opencontainers.image.version"
A_MANIFEST = "dev.weightship.manifest"  # weightship's manifest, its exact bytes
A_VERSION = "dev.weightship.version"  # which tag of this manifest is its version
A_SIGNS = "dev.weightship.manifest.digest"  # on a signature: the weightship manifest it signs

# Registries refuse image manifests above 4 MiB (distribution, Harbor, ECR, GAR, ACR).
MAX_MANIFEST = 4 * MiB

_WEIGHT_EXT = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".h5", ".keras",
    ".msgpack", ".pb", ".tflite", ".mlmodel", ".npz", ".npy", ".params", ".engine", ".plan",
)  # fmt: skip
_CODE_EXT = (".py", ".sh", ".ipynb", ".js", ".ts", ".go", ".rs", ".c", ".cc", ".cpp", ".h", ".cu", ".java", ".rb")
_DATASET_EXT = (".csv", ".tsv", ".parquet", ".arrow", ".jsonl", ".tfrecord")
_DOC_EXT = (".md", ".rst", ".pdf", ".html", ".png", ".jpg", ".jpeg", ".gif", ".svg")
_DOC_NAMES = ("readme", "license", "licence", "notice", "copying", "citation", "changelog", "authors")
_WEIGHT_CONFIG_EXT = (".json", ".yaml", ".yml", ".txt", ".model", ".tiktoken", ".vocab", ".toml", ".ini", ".cfg")

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_REFERRERS_TAG = re.compile(r"^sha256-[0-9a-f]{64}$")
_SIG = re.compile(r"^sha256-([0-9a-f]{64})\.sig$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NEXT = re.compile(r'<([^>]+)>;\s*rel="?next"?')

# An exclusive manifest write (publishing a version) checks the tag is free, puts the
# manifest, waits, and reads the tag again: registries have no conditional write, so two
# publishers racing for one version both put, and the one whose manifest is still there
# after the wait is the only one that succeeds. The wait outlasts the gap between another
# publisher's check and put (one request) many times over.
SETTLE = 0.5
STREAM_CHUNK = 1 * MiB
# Uploads: parts of this size, one PATCH each (a registry may want 5 MiB at least, ECR).
# publish uploads 4 blobs at once: 32 MiB of part buffers whatever the model's size.
PART_SIZE = 8 * MiB
TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=60.0)
# httpx retries a connection that could not be made; a request that reached the registry
# is never sent twice (a retried upload would be a second upload).
CONNECT_RETRIES = 3


def media_type(path: str) -> tuple[str, bool]:
    """The ModelPack media type of a file, and whether the choice is a guess (the file's
    kind is not one ModelPack names: the ``untested`` annotation says so)."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(_WEIGHT_EXT):
        return WEIGHT, False
    if name.startswith(_DOC_NAMES) or name.endswith(_DOC_EXT):
        return DOC, False
    if name.endswith(_CODE_EXT):
        return CODE, False
    if name.endswith(_DATASET_EXT):
        return DATASET, False
    if name.endswith(_WEIGHT_CONFIG_EXT):
        return WEIGHT_CONFIG, False
    return WEIGHT_CONFIG, True


def oci_tag(label: str) -> str:
    """The OCI tag of a weightship version or tag: OCI tags have no ``+`` (semver build
    metadata), so it becomes ``_``, as Helm does. The true label is in the manifest."""
    return label.replace("+", "_")


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media, "digest": _digest(data), "size": len(data), **extra}


def model_config(m: Manifest) -> bytes:
    """The ModelPack config of a release: a pure function of its manifest, so that two
    publishes of one manifest make one artifact."""
    descriptor: dict[str, Any] = {"name": m.name, "version": m.version}
    if m.created:
        descriptor["createdAt"] = m.created
    if m.source.get("commit"):
        descriptor["revision"] = m.source["commit"]
    if m.source.get("repository"):
        descriptor["sourceURL"] = m.source["repository"]
    config: dict[str, Any] = {}
    if any(f.safetensors for f in m.files):
        config["format"] = "safetensors"
    elif any(f.gguf for f in m.files):
        config["format"] = "gguf"
    diff_ids = [f"sha256:{f.sha256}" for f in m.files] or [_digest(b"")]
    return _canonical({"descriptor": descriptor, "modelfs": {"type": "layers", "diffIds": diff_ids}, "config": config})


def image_manifest(m: Manifest, data: bytes, config: bytes) -> bytes:
    """The image manifest of a release whose weightship manifest is ``data``."""
    layers = []
    for f in m.files:
        mt, guessed = media_type(f.path)
        notes = {TITLE: f.path, FILEPATH: f.path}
        if guessed:
            notes[UNTESTED] = "true"
        layers.append({"mediaType": mt, "digest": f"sha256:{f.sha256}", "size": f.size, "annotations": notes})
    notes = {A_MANIFEST: data.decode(), A_VERSION: str(m.version), OCI_VERSION: str(m.version)}
    if m.created:
        notes[CREATED] = m.created
    return _canonical(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": MODEL_ARTIFACT,
            "config": _descriptor(MODEL_CONFIG, config),
            "layers": layers,
            "annotations": notes,
        }
    )


@dataclass(frozen=True)
class Image:
    """A manifest as the registry served it."""

    raw: bytes
    media_type: str
    doc: dict[str, Any]

    @property
    def digest(self) -> str:
        return _digest(self.raw)

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.raw)}

    @property
    def annotations(self) -> dict[str, str]:
        a = self.doc.get("annotations")
        return a if isinstance(a, dict) else {}

    @property
    def version(self) -> str | None:
        """The weightship version this manifest is, or None if it is no weightship release."""
        if self.doc.get("artifactType") != MODEL_ARTIFACT or A_MANIFEST not in self.annotations:
            return None
        v = self.annotations.get(A_VERSION)
        return v if isinstance(v, str) else None

    @property
    def weightship(self) -> bytes:
        return str(self.annotations[A_MANIFEST]).encode()


@dataclass(frozen=True)
class _Key:
    kind: str  # manifest, sig, tag, blob, other (a registry has no place for it)
    name: str = ""
    label: str = ""
    digest: str = ""


def _parse_key(key: str) -> _Key:
    if release := parse_release_key(key):
        name, version, file = release
        if file == "manifest.json":
            return _Key("manifest", name, version)
        if m := _SIG.match(file):
            return _Key("sig", name, version, "sha256:" + m.group(1))
        return _Key("other")
    p = key.split("/")
    if len(p) == 3 and p[0] == "tags" and p[1] and p[2]:
        return _Key("tag", p[1], p[2])
    if len(p) == 3 and p[0] == "blobs" and p[1] == "sha256" and _HEX64.match(p[2]):
        return _Key("blob", digest=p[2])
    return _Key("other")


class _Registry:
    """One registry host: the HTTP client, its authentication, and shared caches."""

    def __init__(self, host: str, *, insecure: bool) -> None:
        self.host = host
        plain = insecure or is_loopback(host)
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.auth = RegistryAuth(host, load_credentials(host))
        self.client = httpx.Client(
            base_url=self.base,
            auth=self.auth,
            timeout=TIMEOUT,
            transport=httpx.HTTPTransport(retries=CONNECT_RETRIES),
            follow_redirects=True,
            trust_env=True,
        )
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, str, str], dict[str, Any]] = {}  # signatures awaiting their manifest
        self.present: set[tuple[str, str]] = set()  # (repo, digest) known to be in the registry
        self.node_access: dict[str, str | None] = {}  # repo -> how nodes pull it (OciStore._node_access)


class OciStore(Store):
    """Releases as ModelPack artifacts in a registry (see the module doc)."""

    def __init__(
        self, registry: _Registry, namespace: str, *, insecure: bool, name: str | None = None, owner: bool = True
    ) -> None:
        self._reg = registry
        self.namespace = namespace
        self.insecure = insecure
        self.name = name
        self._owner = owner  # closes the registry's connections (scoped views share them)
        query = [f"name={name}"] if name else []
        if insecure:
            query.append("insecure=true")
        self.url = f"oci://{registry.host}/{namespace}".rstrip("/") + ("?" + "&".join(query) if query else "")

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> OciStore:
        u = urlsplit(url)
        if u.scheme != "oci" or not u.netloc or u.fragment or "@" in u.netloc:
            raise UsageError(f"store URL {url!r} is malformed", "write oci://HOST[:PORT]/NAMESPACE")
        query = parse_qs(u.query, keep_blank_values=True)
        unknown = set(query) - {"name", "insecure"}
        if unknown:
            raise UsageError(
                f"store URL {url!r} has an unknown setting {sorted(unknown)[0]!r}", "the settings are name and insecure"
            )
        insecure = query.get("insecure", ["false"])[-1].lower() in ("1", "true", "yes")
        namespace = u.path.strip("/")
        for part in namespace.split("/") if namespace else []:
            if not _REPO_COMPONENT.match(part):
                raise UsageError(
                    f"store URL {url!r}: {part!r} cannot be part of a registry repository name",
                    "use lowercase letters, digits and . _ - between them",
                )
        name = query.get("name", [None])[-1]
        store = cls(_Registry(u.netloc.lower(), insecure=insecure), namespace, insecure=insecure, name=name)
        if name:
            store._repo(name)
        return store

    def scoped(self, name: str) -> OciStore:
        """This store, reading and writing blobs in release ``name``'s repository."""
        self._repo(name)  # refuse a name the registry cannot hold, now
        return OciStore(self._reg, self.namespace, insecure=self.insecure, name=name, owner=False)

    def close(self) -> None:
        if self._owner:
            self._reg.client.close()

    def _repo(self, name: str) -> str:
        if not _REPO_COMPONENT.match(name):
            raise UsageError(
                f"{name!r} cannot be a repository name in a registry",
                "name the model in lowercase letters, digits and . _ - between them",
            )
        return f"{self.namespace}/{name}" if self.namespace else name

    def _blob_repo(self) -> str:
        if self.name is None:
            raise UsageError(
                f"{self.url} keeps blobs per release: the blob calls need the release's name",
                "open the store with ?name=NAME, or call scoped(NAME)",
            )
        return self._repo(self.name)

    # -- HTTP --------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        ok: Sequence[int] = (200,),
        missing_ok: bool = False,
        **kw: Any,
    ) -> httpx.Response | None:
        """One request; the response when its status is in ``ok``, None for a 404 when
        ``missing_ok``, else the one-line error that says what to fix."""
        try:
            r = self._reg.client.request(method, path, **kw)
        except WeightshipError:
            raise
        except httpx.HTTPError as e:
            raise StoreError(
                f"cannot reach the registry {self._reg.host} to {what} ({type(e).__name__}: {e})",
                "check the store URL and the network" + ("" if self._reg.base.startswith("https") else " (plain HTTP)"),
            ) from None
        if r.status_code in ok:
            return r
        if r.status_code == 404 and missing_ok:
            return None
        raise self._error(r, what)

    def _error(self, r: httpx.Response, what: str) -> StoreError:
        codes = ""
        try:
            errors = r.json().get("errors") or []
            codes = ", ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            pass
        detail = f" ({codes})" if codes else ""
        host = self._reg.host
        if r.status_code == 401:
            who = "the credentials from the docker configuration" if self._reg.auth.credentials else "anonymous access"
            return StoreError(
                f"the registry {host} refused {who} to {what}{detail}",
                f"run docker login {host}, or set DOCKER_CONFIG to a configuration with credentials for it",
            )
        if r.status_code == 403:
            return StoreError(
                f"no permission to {what} on the registry {host}{detail}", "grant these credentials access to it"
            )
        if r.status_code == 404:
            return NotFoundError(f"cannot {what}: not found in {self.url}{detail}")
        if r.status_code == 405 or "UNSUPPORTED" in codes:
            return StoreError(
                f"the registry {host} does not allow this: {what}{detail}",
                "enable deletes in the registry (distribution: storage.delete.enabled) or use its own tools",
            )
        return StoreError(f"the registry {host} answered HTTP {r.status_code} to {what}{detail}")

    # -- manifests ---------------------------------------------------------------------

    def _image(self, repo: str, ref: str) -> Image | None:
        r = self._send(
            "GET", f"/v2/{repo}/manifests/{ref}", f"read {repo}:{ref}", missing_ok=True, headers={"Accept": ACCEPT}
        )
        if r is None:
            return None
        raw = r.content
        if ref.startswith("sha256:") and _digest(raw) != ref:
            raise IntegrityError(f"the registry {self._reg.host} served {repo}@{ref} with other bytes")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise StoreError(f"{repo}:{ref} in {self._reg.host} is not JSON") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{repo}:{ref} in {self._reg.host} is not a manifest")
        media = r.headers.get("Content-Type", "").split(";")[0].strip() or str(doc.get("mediaType", MANIFEST))
        return Image(raw, media, doc)

    def _release(self, name: str, version: str) -> Image | None:
        """The manifest that is version ``version`` of ``name``, or None."""
        img = self._image(self._repo(name), oci_tag(version))
        if img is None or img.version != version:
            return None
        return img

    def _put_manifest(self, repo: str, ref: str, raw: bytes, media: str) -> httpx.Response:
        r = self._send(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            f"write {repo}:{ref}",
            ok=(200, 201, 202),
            content=raw,
            headers={"Content-Type": media},
        )
        assert r is not None
        return r

    def _tags(self, repo: str) -> list[str]:
        out: list[str] = []
        path: str | None = f"/v2/{repo}/tags/list?n=1000"
        while path:
            r = self._send("GET", path, f"list the tags of {repo}", missing_ok=True)
            if r is None:
                return out
            out.extend((r.json() or {}).get("tags") or [])
            m = _NEXT.search(r.headers.get("Link", ""))
            path = m.group(1) if m else None
        return out

    def _names(self) -> list[str]:
        """The release names under the namespace, from the registry's catalog."""
        prefix = f"{self.namespace}/" if self.namespace else ""
        out: list[str] = []
        path: str | None = "/v2/_catalog?n=1000"
        while path:
            try:
                r = self._send("GET", path, "list the repositories")
            except StoreError:
                # Refused credentials are said as such; a registry that keeps its
                # catalog to itself (Docker Hub, GAR) answers /v2/ all the same.
                self._send("GET", "/v2/", "connect")
                raise StoreError(
                    f"the registry {self._reg.host} does not list its repositories (catalog)",
                    "name the model: weightship ls NAME",
                ) from None
            assert r is not None
            for repo in (r.json() or {}).get("repositories") or []:
                rest = repo[len(prefix) :] if repo.startswith(prefix) else None
                if rest and "/" not in rest:
                    out.append(rest)
            m = _NEXT.search(r.headers.get("Link", ""))
            path = m.group(1) if m else None
        return sorted(out)

    # -- referrers (signatures) --------------------------------------------------------

    def _referrers(self, repo: str, subject: str) -> list[dict[str, Any]]:
        """Descriptors of the signatures whose subject is ``subject``: the referrers API,
        else the referrers tag schema (``sha256-HEX``, for registries without the API)."""
        r = self._send(
            "GET",
            f"/v2/{repo}/referrers/{subject}",
            f"list the referrers of {repo}@{subject}",
            ok=(200, 400, 404, 405),
            params={"artifactType": BUNDLE},
        )
        assert r is not None
        found: list[dict[str, Any]] = []
        if r.status_code == 200 and r.headers.get("Content-Type", "").startswith(INDEX):
            found = list(r.json().get("manifests") or [])
        if not found:
            index = self._image(repo, subject.replace(":", "-"))
            found = list(index.doc.get("manifests") or []) if index is not None else []
        return [d for d in found if isinstance(d, dict) and d.get("artifactType") == BUNDLE]

    def _empty_config_artifact(self, repo: str, artifact_type: str, layer: dict[str, Any], **fields: Any) -> bytes:
        """An image manifest of ``artifact_type`` with the empty config (pushed here) and
        one layer: what the OCI image spec recommends for artifacts that are no image."""
        self._push_bytes(repo, EMPTY_JSON)
        return _canonical(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "artifactType": artifact_type,
                "config": _descriptor(EMPTY, EMPTY_JSON),
                "layers": [layer],
                **fields,
            }
        )

    def _push_signature(self, repo: str, subject: Image, bundle: dict[str, Any], signs: str) -> None:
        raw = self._empty_config_artifact(
            repo, BUNDLE, bundle, subject=subject.descriptor, annotations={A_SIGNS: signs}
        )
        r = self._put_manifest(repo, _digest(raw), raw, MANIFEST)
        if "OCI-Subject" in r.headers:
            return  # the registry indexes referrers itself
        entry = _descriptor(MANIFEST, raw, artifactType=BUNDLE, annotations={A_SIGNS: signs})
        self._edit_referrers_tag(repo, subject.digest, add=entry)

    def _edit_referrers_tag(
        self, repo: str, subject: str, *, add: dict[str, Any] | None = None, drop: str | None = None
    ) -> None:
        tag = subject.replace(":", "-")
        with self._reg.lock:  # one writer per process; across processes the last one wins
            index = self._image(repo, tag)
            entries = list(index.doc.get("manifests") or []) if index is not None else []
            gone = {drop, add["digest"] if add else None}
            kept = [] if drop == "*" else [e for e in entries if e.get("digest") not in gone]
            if add is not None:
                kept.append(add)
            if index is not None and kept == entries:
                return
            if not kept:
                if index is not None:
                    self._send("DELETE", f"/v2/{repo}/manifests/{index.digest}", "delete a referrers index",
                               ok=(200, 202), missing_ok=True)  # fmt: skip
                return
            raw = _canonical({"schemaVersion": 2, "mediaType": INDEX, "manifests": kept})
            self._put_manifest(repo, tag, raw, INDEX)

    def _signature(self, repo: str, subject: Image, signs: str) -> tuple[Image, dict[str, Any]] | None:
        """The signature referrer of ``subject`` made for weightship manifest ``signs``,
        and its bundle's descriptor."""
        for d in self._referrers(repo, subject.digest):
            notes = d.get("annotations") or {}
            if notes and notes.get(A_SIGNS) != signs:
                continue
            sig = self._image(repo, str(d.get("digest")))
            if sig is None or sig.annotations.get(A_SIGNS) != signs:
                continue
            if (sig.doc.get("subject") or {}).get("digest") != subject.digest:
                continue
            layers = sig.doc.get("layers") or []
            if layers and isinstance(layers[0], dict) and layers[0].get("mediaType") == BUNDLE:
                return sig, layers[0]
        return None

    # -- the Store interface: small objects --------------------------------------------

    def read(self, key: str) -> bytes:
        k = _parse_key(key)
        if k.kind == "manifest":
            img = self._release(k.name, k.label)
            if img is not None:
                return img.weightship
        elif k.kind == "sig":
            img = self._release(k.name, k.label)
            if img is not None and _digest(img.weightship) == k.digest:
                found = self._signature(self._repo(k.name), img, k.digest)
                if found is not None:
                    return self._read_blob(self._repo(k.name), found[1])
        elif k.kind == "tag":
            img = self._image(self._repo(k.name), oci_tag(k.label))
            if img is not None and img.version is not None and oci_tag(img.version) != oci_tag(k.label):
                return img.version.encode()
        elif k.kind == "blob":
            return self._read_blob(self._blob_repo(), {"digest": f"sha256:{k.digest}", "size": -1})
        raise NotFoundError(f"{key} not found in {self.url}")

    def exists(self, key: str) -> bool:
        k = _parse_key(key)
        if k.kind == "blob":
            return self.has_blob(k.digest)
        try:
            self.read(key)
            return True
        except NotFoundError:
            return False

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        k = _parse_key(key)
        if k.kind == "manifest":
            self._write_release(k.name, k.label, data, exclusive)
        elif k.kind == "sig":
            self._write_signature(k.name, k.label, k.digest, data)
        elif k.kind == "tag":
            self._write_tag(k.name, k.label, data.decode(), exclusive)
        else:
            raise StoreError(
                f"{key} has no place in a registry", "an oci:// store holds releases, their signatures and tags only"
            )

    def _write_release(self, name: str, version: str, data: bytes, exclusive: bool) -> None:
        m = Manifest.from_bytes(data, where=f"manifest of {name}:{version}")
        if m.name != name or m.version != version:
            raise IntegrityError(f"the manifest written as {name}:{version} says it is {m.name}:{m.version}")
        repo = self._repo(name)
        config = model_config(m)
        raw = image_manifest(m, data, config)
        if len(raw) > MAX_MANIFEST:
            raise StoreError(
                f"{name}:{version} needs an image manifest of {len(raw)} bytes; registries take at most {MAX_MANIFEST}",
                "publish fewer files (pack them into fewer shards)",
            )
        ours = Image(raw, MANIFEST, json.loads(raw))
        signs = _digest(data)
        tag = oci_tag(version)
        existing = self._image(repo, tag)
        if existing is not None and existing.version is not None and existing.version != version:
            # Not a race for this version: another version already has its OCI tag.
            raise StoreError(
                f"{name}:{version} would be the registry tag {tag}, which {name}:{existing.version} already is",
                "OCI tags have no '+': choose a version that differs in more than '+' and '_'",
            )
        if existing is not None and existing.digest != ours.digest and exclusive:
            raise ConflictError(f"releases/{name}/{version}/manifest.json already exists in {self.url}")
        self._push_bytes(repo, config)
        with self._reg.lock:
            bundle = self._reg.pending.pop((repo, version, signs), None)
        if bundle is not None:
            # The signature first, as every store writes it: a reader who finds the
            # manifest finds the signature made for it.
            self._push_signature(repo, ours, bundle, signs)
        if existing is not None and existing.digest == ours.digest:
            return  # the same bytes again: a retry, not a conflict
        self._put_manifest(repo, tag, raw, MANIFEST)
        if exclusive:
            time.sleep(SETTLE)
            now = self._image(repo, tag)
            if now is None or now.digest != ours.digest:
                if bundle is not None:
                    # Its signature names a manifest no tag holds: it would stay forever,
                    # kept by its referrers tag (the tag schema).
                    self._drop_signatures(repo, ours.digest, f"delete the signature of a lost {repo}:{tag}")
                raise ConflictError(f"{repo}:{tag} already exists in {self.url} (published concurrently)")

    def _write_signature(self, name: str, version: str, signs: str, data: bytes) -> None:
        repo = self._repo(name)
        self._push_bytes(repo, data)
        bundle = _descriptor(BUNDLE, data)
        img = self._release(name, version)
        if img is not None and _digest(img.weightship) == signs:
            self._push_signature(repo, img, bundle, signs)
            return
        # The manifest is not there yet (publish writes the signature first): it is
        # attached when the manifest is written, before the manifest is tagged.
        with self._reg.lock:
            self._reg.pending[(repo, version, signs)] = bundle

    def _write_tag(self, name: str, tag: str, version: str, exclusive: bool) -> None:
        repo = self._repo(name)
        img = self._release(name, version)
        if img is None:
            raise NotFoundError(f"{name}:{version} not found in {self.url}", f"see weightship ls {name}")
        existing = self._image(repo, oci_tag(tag))
        if existing is not None:
            if existing.version is not None and oci_tag(existing.version) == oci_tag(tag):
                raise ConflictError(
                    f"tag {tag!r} would replace version {name}:{existing.version} in {self.url}",
                    "a tag may not share a name with a version: choose another tag",
                )
            if exclusive:
                raise ConflictError(f"tags/{name}/{tag} already exists in {self.url}")
            if existing.digest == img.digest:
                return
        self._put_manifest(repo, oci_tag(tag), img.raw, img.media_type)

    def delete(self, key: str) -> None:
        k = _parse_key(key)
        if k.kind == "manifest":
            img = self._release(k.name, k.label)
            if img is None:
                return
            repo = self._repo(k.name)
            self._drop_signatures(repo, img.digest, f"delete a signature of {k.name}:{k.label}")
            # By digest: the registry drops the version's tag (and any tag still on it).
            self._delete_manifest(repo, img.digest, f"delete {k.name}:{k.label}")
        elif k.kind == "sig":
            img = self._release(k.name, k.label)
            if img is None:
                return
            repo = self._repo(k.name)
            found = self._signature(repo, img, k.digest)
            if found is not None:
                self._delete_manifest(repo, found[0].digest, f"delete the signature of {k.name}:{k.label}")
                self._edit_referrers_tag(repo, img.digest, drop=found[0].digest)
        elif k.kind == "tag":
            repo = self._repo(k.name)
            img = self._image(repo, oci_tag(k.label))
            if img is None or (img.version is not None and oci_tag(img.version) == oci_tag(k.label)):
                return  # no such tag (a version is not a tag)
            self._delete_tag(repo, oci_tag(k.label), f"delete the tag {k.name}:{k.label}")

    def _delete_tag(self, repo: str, tag: str, what: str) -> None:
        """Delete one tag and nothing else. OCI distribution 1.1 deletes a tag by name;
        older registries (distribution 2.x) delete manifests by digest only, which would
        take every other tag of the release with it. There the tag is first pointed at a
        manifest of its own (an empty artifact naming the tag), which is then deleted by
        digest: the tag goes with it, the release and its other tags stay."""
        r = self._send("DELETE", f"/v2/{repo}/manifests/{tag}", what, ok=(200, 202, 400, 405), missing_ok=True)
        if r is None or r.status_code in (200, 202):
            return
        raw = self._empty_config_artifact(
            repo, TOMBSTONE, _descriptor(EMPTY, EMPTY_JSON), annotations={TOMBSTONE: f"{repo}:{tag} {time.time_ns()}"}
        )
        self._put_manifest(repo, tag, raw, MANIFEST)
        self._delete_manifest(repo, _digest(raw), what)

    def _drop_signatures(self, repo: str, subject: str, what: str) -> None:
        """Delete every signature referrer of manifest ``subject``, and its referrers index."""
        for d in self._referrers(repo, subject):
            self._delete_manifest(repo, str(d.get("digest")), what)
        self._edit_referrers_tag(repo, subject, drop="*")

    def _delete_manifest(self, repo: str, ref: str, what: str) -> None:
        self._send("DELETE", f"/v2/{repo}/manifests/{ref}", what, ok=(200, 202), missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        parts = prefix.split("/")
        top = parts[0]
        if top == "blobs":
            return sorted(k for k in self._referenced_blobs() if k.startswith(prefix))
        if top not in ("releases", "tags") and prefix:
            return []
        names = [parts[1]] if len(parts) > 2 and parts[1] else self._names()
        out: list[str] = []
        for name, tag, version, img in self._tagged(names):
            if oci_tag(version) == tag:
                out.append(f"releases/{name}/{version}/manifest.json")
                if Manifest.from_bytes(img.weightship).signature != "unsigned":
                    out.append(f"releases/{name}/{version}/sha256-{_digest(img.weightship)[7:]}.sig")
            else:
                out.append(f"tags/{name}/{tag}")
        return sorted(k for k in out if k.startswith(prefix))

    def _tagged(self, names: Sequence[str]) -> Iterator[tuple[str, str, str, Image]]:
        """(name, OCI tag, version, manifest) for every tag of the repositories of
        ``names`` that is on a weightship release: the version's own tag (the OCI tag of
        ``version``), or a movable tag."""
        for name in names:
            repo = self._repo(name)
            for tag in self._tags(repo):
                if _REFERRERS_TAG.match(tag):
                    continue
                img = self._image(repo, tag)
                if img is not None and img.version is not None:  # else another tool's artifact
                    yield name, tag, img.version, img

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        raise StoreError(
            f"{self.url} is a registry: the distribution API lists no blobs, and the registry's own "
            "garbage collector removes those no manifest names",
            "run it there (distribution: registry garbage-collect; Harbor: garbage collection)",
        )

    def remember_removed(self, name: str, version: str, record: bytes) -> None:
        """Nothing: a registry has no place for it (every tag is a manifest other tools
        list). Keeping a removed version's tag from returning with other files is the
        registry's tag immutability rule (Harbor, ECR; docs/format.md)."""

    def removed_record(self, name: str, version: str) -> bytes | None:
        return None

    def _referenced_blobs(self) -> set[str]:
        """Blob keys the releases in the store name: a registry cannot list the blobs it
        holds, only the manifests that refer to them."""
        out: set[str] = set()
        for _, tag, version, img in self._tagged([self.name] if self.name else self._names()):
            if oci_tag(version) == tag:  # a movable tag names a version's manifest again
                out.update(blob_key(f.sha256) for f in Manifest.from_bytes(img.weightship).files)
        return out

    # -- blobs -------------------------------------------------------------------------

    def has_blob(self, hexdigest: str) -> bool:
        repo = self._blob_repo()
        r = self._send(
            "HEAD", f"/v2/{repo}/blobs/sha256:{hexdigest}", f"look for blob {hexdigest[:12]}… in {repo}",
            missing_ok=True,
        )  # fmt: skip
        return r is not None

    def _push_bytes(self, repo: str, data: bytes) -> None:
        """Upload a small blob (a config, a signature bundle) unless the registry has it."""
        digest = _digest(data)
        if (repo, digest) in self._reg.present:
            return
        r = self._send("HEAD", f"/v2/{repo}/blobs/{digest}", f"look for {digest[:19]}… in {repo}", missing_ok=True)
        if r is None:
            loc = self._start_upload(repo)
            url = httpx.URL(loc).copy_merge_params({"digest": digest})
            self._send("PUT", str(url), f"upload {digest[:19]}… to {repo}", ok=(201,), content=data,
                       headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        with self._reg.lock:
            self._reg.present.add((repo, digest))

    def _start_upload(self, repo: str) -> str:
        r = self._send("POST", f"/v2/{repo}/blobs/uploads/", f"start an upload to {repo}", ok=(202,),
                       headers={"Content-Length": "0"})  # fmt: skip
        assert r is not None
        loc = r.headers.get("Location")
        if not loc:
            raise StoreError(f"the registry {self._reg.host} started an upload without saying where")
        return str(httpx.URL(self._reg.base).join(loc))

    def put_blob(
        self,
        hexdigest: str,
        src: Path,
        size: int,
        progress: Progress | None = None,
        *,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        repo = self._blob_repo()
        if self.has_blob(hexdigest):
            return 0
        reader = CheckedFile(Path(src), hexdigest, size, progress, chunk_crc32)
        if not Path(src).is_file():
            raise StoreError(f"cannot read {src}: no such file")
        loc = self._start_upload(repo)
        try:
            # A chunked upload (distribution spec): PART_SIZE bytes per PATCH, each read
            # and checked before it is sent, the last one only once the whole file is
            # known to hash to its name; then a PUT naming the digest, which the registry
            # checks too before the blob exists. A file that changed fails between two
            # requests, never inside one, so the session is cancelled cleanly.
            offset = 0
            for part in _parts(iter(reader), PART_SIZE):
                r = self._send(
                    "PATCH", loc, f"upload blob {hexdigest[:12]}… to {repo}", ok=(202,), content=part,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(part) - 1}",
                    },
                )  # fmt: skip
                assert r is not None
                offset += len(part)
                loc = str(httpx.URL(loc).join(r.headers.get("Location") or loc))
            url = httpx.URL(loc).copy_merge_params({"digest": f"sha256:{hexdigest}"})
            self._send("PUT", str(url), f"commit blob {hexdigest[:12]}… in {repo}", ok=(201,),
                       headers={"Content-Length": "0"})  # fmt: skip
        except BaseException as e:
            # Abandon the upload session: the registry keeps nothing of it.
            with contextlib.suppress(httpx.HTTPError):
                self._reg.client.delete(loc)
            if reader.error is not None:
                raise reader.error from None
            if isinstance(e, OSError):
                raise StoreError(f"cannot read {src}: {e.strerror}") from None
            raise
        with self._reg.lock:
            self._reg.present.add((repo, f"sha256:{hexdigest}"))
        return size

    def _read_blob(self, repo: str, desc: dict[str, Any]) -> bytes:
        digest = str(desc["digest"])
        r = self._send("GET", f"/v2/{repo}/blobs/{digest}", f"read blob {digest[:19]}… of {repo}", missing_ok=True)
        if r is None:
            raise NotFoundError(f"blob {digest[:19]}… not found in {repo} at {self._reg.host}")
        if _digest(r.content) != digest:
            raise IntegrityError(f"blob {digest[:19]}… in {repo} at {self._reg.host} is corrupt")
        return r.content

    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        repo = self._blob_repo()
        path = f"/v2/{repo}/blobs/sha256:{hexdigest}"
        what = f"download blob {hexdigest[:12]}… of {repo}"
        with BlobWriter(dest, hexdigest, size, sync=sync) as w:
            if w.complete:
                return 0
            start = w.have
            try:
                if size == 0:
                    if self._send("HEAD", path, what, missing_ok=True) is None:
                        raise NotFoundError(f"blob {hexdigest[:12]}… missing from {self.url}")
                else:
                    # The declared range only: a longer blob is never written past its size.
                    headers = {"Range": f"bytes={start}-{size - 1}"}
                    with self._reg.client.stream("GET", path, headers=headers) as r:
                        if r.status_code == 404:
                            raise NotFoundError(f"blob {hexdigest[:12]}… missing from {self.url}")
                        if r.status_code == 416:
                            raise IntegrityError(f"blob {hexdigest[:12]}… in {self.url} is corrupt (too short)")
                        if r.status_code not in (200, 206):
                            r.read()
                            raise self._error(r, what)
                        if r.status_code == 200 and w.have:
                            w.restart()  # the registry ignored the range: take it whole
                        for chunk in r.iter_bytes(STREAM_CHUNK):
                            w.append(chunk)
                            if progress:
                                progress(len(chunk))
            except WeightshipError:
                if w.have == 0:
                    w.discard()
                raise
            except httpx.HTTPError as e:
                if w.have == 0:
                    w.discard()
                else:
                    w.flush()  # what arrived is kept: the next attempt resumes from it
                raise StoreError(
                    f"cannot {what} from the registry {self._reg.host} ({type(e).__name__})",
                    "check the network; a retry resumes",
                ) from None
            w.check(f" in {self.url}")
            w.flush()
            return size - start

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        """A URL nodes can GET the blob from without the publisher's credentials: where
        the registry redirects blob reads (object storage, presigned: ECR, GAR, ACR,
        Harbor on S3); the registry's own URL when it lets anyone pull; or that URL with
        a token from the registry's token service that allows pulling this repository
        and nothing else, for as long as the token service says (``#bearer=TOKEN``).
        None when only the nodes' own credentials can do (``--credentials node``): a
        registry that takes passwords only (Basic)."""
        repo = self._blob_repo()
        path = f"/v2/{repo}/blobs/sha256:{hexdigest}"
        try:
            with self._reg.client.stream("GET", path, follow_redirects=False) as r:
                location = r.headers.get("Location")
                status = r.status_code
            if status in (301, 302, 303, 307, 308) and location:
                return str(httpx.URL(self._reg.base + path).join(location))
            if status == 404:
                raise NotFoundError(f"blob {hexdigest[:12]}… missing from {self.url}")
            access = self._node_access(repo, path)
        except httpx.HTTPError as e:
            raise StoreError(f"cannot reach the registry {self._reg.host} ({type(e).__name__})") from None
        if access is None:
            return None
        # A token goes in the fragment, which no client sends: the node's fetch puts it in a header.
        return f"{self._reg.base}{path}" + (f"#bearer={access}" if access else "")

    def _node_access(self, repo: str, path: str) -> str | None:
        """How a node may pull ``repo`` without the publisher's credentials: "" when the
        registry lets anyone pull it (an anonymous HEAD of the blob at ``path`` answers
        200), a pull-only token, or None. Asked once per repository, for every blob URL
        of a warm."""
        with self._reg.lock:
            if repo in self._reg.node_access:
                return self._reg.node_access[repo]
        with httpx.Client(timeout=TIMEOUT, trust_env=True) as anonymous:
            public = anonymous.head(self._reg.base + path).status_code == 200
        access: str | None = ""
        if not public:
            token = self._reg.auth.pull_token(repo, self._reg.base)
            access = token[0] if token else None
        with self._reg.lock:
            self._reg.node_access[repo] = access
        return access


def _parts(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """``pieces`` regrouped into parts of ``size`` bytes (the last one shorter)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        if len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


__all__ = ["MODEL_ARTIFACT", "MODEL_CONFIG", "OciStore", "image_manifest", "media_type", "model_config", "oci_tag"]
