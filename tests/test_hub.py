"""Publishing from the Hugging Face Hub, offline, from a Hub cache built out of the real MiniLM files.

The cache is laid out exactly as huggingface-hub writes it: ``blobs/<etag>`` (the sha256 for
a Git LFS file, the git blob sha1 for a plain one), ``snapshots/<COMMIT>/`` of relative
symlinks into ``blobs/``, and ``refs/main`` holding the commit. With ``HF_HUB_OFFLINE=1``
huggingface-hub reads it without any network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.helpers import assert_reference_verifies_key, error_line, minilm_source, run_cli, tree_digest

REPO = "sentence-transformers/all-MiniLM-L6-v2"
URL = f"hf://{REPO}"
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
OTHER_COMMIT = "0" * 39 + "1"


def lfs_patterns(model: Path) -> list[str]:
    """The repo's own .gitattributes decides which files the Hub keeps in Git LFS."""
    lines = (model / ".gitattributes").read_text().splitlines()
    return [ln.split()[0] for ln in lines if "filter=lfs" in ln]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def build_hub_cache(hf_home: Path, commit: str = COMMIT) -> Path:
    """HF_HOME/hub/models--sentence-transformers--all-MiniLM-L6-v2 from the PyPI copy of the model."""
    src = minilm_source()
    storage = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    blobs, snap = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    patterns = lfs_patterns(src)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        data = path.read_bytes()
        lfs = any(fnmatch.fnmatch(path.name, pat) or fnmatch.fnmatch(rel, pat) for pat in patterns)
        blob = blobs / (hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data))
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)  # huggingface-hub writes it without a newline
    return storage


def blob_of(storage: Path, rel: str, commit: str = COMMIT) -> Path:
    return Path(os.path.realpath(storage / "snapshots" / commit / rel))


def originals(exclude: tuple[str, ...] = (".gitattributes",)) -> dict[str, str]:
    """What a pull must reproduce: the model's files less those weightship never publishes."""
    return {k: v for k, v in tree_digest(minilm_source()).items() if k not in exclude}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One read-only Hub cache for the tests that do not damage it (it holds 90 MB)."""
    home = tmp_path_factory.mktemp("hf-home")
    build_hub_cache(home)
    return home


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch):
    """Point the weightship subprocesses at a Hub cache, with huggingface-hub offline."""

    def use(home: Path) -> None:
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT"):
            monkeypatch.delenv(var, raising=False)

    return use


def publish(*args: str | os.PathLike, cwd: Path) -> dict:
    proc = run_cli("publish", *args, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def pulled_tree(ref: str, store: str, dest: Path, *extra: str | os.PathLike) -> dict[str, str]:
    proc = run_cli("pull", ref, dest, "--store", store, *extra, cwd=dest.parent)
    assert proc.returncode == 0, proc.stderr
    return {k: v for k, v in tree_digest(dest).items() if k != "model.sig"}


def test_offline_publish_records_repo_and_commit_and_pulls_identical(
    hub_home: Path, offline, keypair, file_store: str, tmp_path: Path
):
    offline(hub_home)
    key, pub = keypair
    result = publish(URL, "minilm:1", "--key", key, "--tag", "prod", "--store", file_store, cwd=tmp_path)
    assert result["signed"] == "key"
    assert result["files"] == len(originals())

    shown = run_cli("show", "minilm:1", "--store", file_store, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["digest"] == result["digest"]
    assert doc["source"]["hub_repo"] == REPO
    assert doc["source"]["hub_revision"] == COMMIT
    assert doc["source"]["hub_requested"] == "main"
    shard = next(f for f in doc["files"] if f["path"] == "model.safetensors")
    # The Hub's LFS sha256 is the blob's name in the cache: the manifest agrees with it.
    assert shard["sha256"] == blob_of(hub_home / "hub" / f"models--{REPO.replace('/', '--')}", "model.safetensors").name
    assert shard["safetensors"]["tensors"] == 104

    dest = tmp_path / "pulled"
    assert pulled_tree("minilm:prod", file_store, dest, "--key", pub) == originals()
    # The signature over Hub bytes is plain OMS: the reference verifier accepts the pulled tree.
    assert_reference_verifies_key(dest, pub)


def test_pinned_commit_and_patterns(hub_home: Path, offline, file_store: str, tmp_path: Path):
    offline(hub_home)
    pinned = publish(f"{URL}@{COMMIT}", "minilm:pinned", "--store", file_store, cwd=tmp_path)
    doc = json.loads(run_cli("show", "minilm:pinned", "--store", file_store, "--json", cwd=tmp_path).stdout)
    assert doc["source"]["hub_revision"] == doc["source"]["hub_requested"] == COMMIT
    assert pinned["files"] == len(originals())

    # The Hub's glob semantics: "*" crosses "/", so 1_Pooling/config.json is a "*.json".
    publish(URL, "minilm:json", "--include", "*.json", "--store", file_store, cwd=tmp_path)
    want = {k: v for k, v in originals().items() if k.endswith(".json")}
    assert "1_Pooling/config.json" in want
    assert pulled_tree("minilm:json", file_store, tmp_path / "json") == want

    lean = publish(
        URL, "minilm:lean", "--exclude", "*.safetensors", "--exclude", "README.md", "--store", file_store, cwd=tmp_path
    )
    # Every file left was stored by the first publish: nothing moves again.
    assert lean["bytes_uploaded"] == 0 and lean["blobs_skipped"] == lean["files"]
    want = {k: v for k, v in originals().items() if k not in ("model.safetensors", "README.md")}
    assert pulled_tree("minilm:lean", file_store, tmp_path / "lean") == want

    nothing = run_cli("publish", URL, "minilm:none", "--include", "*.onnx", "--store", file_store, cwd=tmp_path)
    assert nothing.returncode == 1
    assert "no files to publish" in error_line(nothing)


@pytest.fixture
def own_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A Hub cache this test may damage: (HF_HOME, models--… folder)."""
    home = tmp_path / "hf-home"
    return home, build_hub_cache(home)


def test_lfs_blob_not_matching_its_sha256_is_refused(own_cache, offline, file_store: str, tmp_path: Path):
    home, storage = own_cache
    offline(home)
    blob = blob_of(storage, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # in the tensor data, so the header still parses: only the hash can tell
    blob.write_bytes(bytes(data))

    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "model.safetensors" in line and "LFS sha256" in line and blob.name in line
    assert not (tmp_path / "store" / "releases").exists()


def test_plain_blob_not_matching_its_git_id_is_refused(own_cache, offline, file_store: str, tmp_path: Path):
    home, storage = own_cache
    offline(home)
    blob_of(storage, "1_Pooling/config.json").write_text('{"pooling_mode_max_tokens": true}')
    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "1_Pooling/config.json" in line and "git blob id" in line


def test_snapshot_link_out_of_the_blobs_folder_is_refused(own_cache, offline, file_store: str, tmp_path: Path):
    home, storage = own_cache
    offline(home)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    link = storage / "snapshots" / COMMIT / "vocab.txt"
    link.unlink()
    link.symlink_to(os.path.relpath(secret, link.parent))
    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "vocab.txt" in line and "blobs/" in line


def test_offline_cache_misses_are_one_line(hub_home: Path, offline, file_store: str, tmp_path: Path):
    offline(hub_home)
    cases = {
        "hf://sentence-transformers/no-such-model": "is not in the Hugging Face cache",
        f"{URL}@v9.9": "revision 'v9.9' is not in the Hugging Face cache",
        f"{URL}@{OTHER_COMMIT}": f"revision '{OTHER_COMMIT}' is not in the Hugging Face cache",
    }
    for url, expected in cases.items():
        proc = run_cli("publish", url, "minilm:1", "--store", file_store, cwd=tmp_path)
        assert proc.returncode == 1, (url, proc.stderr)
        line = error_line(proc)
        assert expected in line and "HF_HUB_OFFLINE" in line, line
    # The cached refs and commits are named, so the fix is obvious.
    assert "main" in line and COMMIT in line

    bad = run_cli("publish", "hf://datasets/org/data", "minilm:1", "--store", file_store, cwd=tmp_path)
    assert bad.returncode == 2 and "only model repos" in error_line(bad)
    assert not (tmp_path / "store" / "releases").exists()


def test_ref_pointing_at_a_missing_snapshot(own_cache, offline, file_store: str, tmp_path: Path):
    home, storage = own_cache
    offline(home)
    (storage / "refs" / "main").write_text(OTHER_COMMIT)
    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"points at {OTHER_COMMIT}, whose snapshot is missing" in error_line(proc)


# -- online, against a stand-in for the Hub's HTTP API on loopback ----------------------------


class FakeHub(ThreadingHTTPServer):
    """The few Hub endpoints huggingface-hub calls to download a snapshot and read file metadata.

    Serves the MiniLM files at COMMIT (branch ``main``) the way the Hub does: ``ETag`` is the
    git blob id, and an LFS file adds ``X-Linked-Etag`` (its sha256) and ``lfs`` metadata.
    ``claimed_lfs`` makes the metadata API claim another sha256 for a file, as a Hub that
    disagrees with the bytes served would.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        src = minilm_source()
        self.files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
        patterns = lfs_patterns(src)
        self.lfs = {r for r in self.files if any(fnmatch.fnmatch(r.rsplit("/", 1)[-1], pat) for pat in patterns)}
        self.claimed_lfs: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def meta(self, rel: str, claimed: bool = False) -> dict:
        data = self.files[rel]
        m: dict = {"size": len(data), "oid": git_blob_sha1(data)}
        if rel in self.lfs:
            sha = hashlib.sha256(data).hexdigest()
            m["lfs"] = {
                "oid": self.claimed_lfs.get(rel, sha) if claimed else sha,
                "size": len(data),
                "pointerSize": 134,
            }
        return m


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def send(self, code: int, data: bytes = b"", headers: dict | None = None, body: bool = True) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def answer(self, body: bool) -> None:
        hub = self.server
        url = urlsplit(self.path)
        path = unquote(url.path)
        api = f"/api/models/{REPO}/"
        if path.startswith(api + "revision/"):
            if path[len(api + "revision/") :] not in ("main", COMMIT):
                return self.send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
            siblings = []
            for rel in sorted(hub.files):
                sib: dict = {"rfilename": rel}
                if "blobs=true" in url.query:
                    m = hub.meta(rel, claimed=True)
                    sib.update(size=m["size"], blobId=m["oid"])
                    if "lfs" in m:
                        sib["lfs"] = {"sha256": m["lfs"]["oid"], "size": m["lfs"]["size"], "pointerSize": 134}
                siblings.append(sib)
            doc = {"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False, "siblings": siblings}
            return self.send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith(api + "tree/"):
            tree = [{"type": "file", "path": rel, **hub.meta(rel)} for rel in sorted(hub.files)]
            return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        resolve = f"/{REPO}/resolve/{COMMIT}/"
        if path.startswith(resolve) and path[len(resolve) :] in hub.files:
            rel = path[len(resolve) :]
            data, m = hub.files[rel], hub.meta(rel)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{m["oid"]}"'}
            if "lfs" in m:
                headers.update({"X-Linked-Etag": f'"{m["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))})
            return self.send(200, data, headers, body)
        self.send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A Hub on a loopback port with an empty cache; the weightship subprocesses are pointed at it."""
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=10)


def test_online_publish_resolves_branch_then_republishes_offline(
    fake_hub: FakeHub, file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    online = publish(URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    doc = json.loads(run_cli("show", "minilm:1", "--store", file_store, "--json", cwd=tmp_path).stdout)
    assert doc["source"]["hub_revision"] == COMMIT and doc["source"]["hub_requested"] == "main"
    assert pulled_tree("minilm:1", file_store, tmp_path / "pulled") == originals()

    # The cache huggingface-hub itself just wrote is what the offline path reads.
    storage = tmp_path / "hf-home" / "hub" / f"models--{REPO.replace('/', '--')}"
    assert (storage / "refs" / "main").read_text().strip() == COMMIT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.shutdown()
    again = publish(URL, "minilm:2", "--store", file_store, cwd=tmp_path)
    assert again["bytes_uploaded"] == 0 and again["total_bytes"] == online["total_bytes"]


def test_online_hub_metadata_disagreeing_is_refused(fake_hub: FakeHub, file_store: str, tmp_path: Path):
    fake_hub.claimed_lfs["model.safetensors"] = "ab" * 32
    # Files already in the cache are not downloaded again: only the metadata check can object.
    build_hub_cache(tmp_path / "hf-home")
    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "model.safetensors" in line and "Hub's LFS sha256 is " + "ab" * 32 in line
    assert not (tmp_path / "store" / "releases").exists()


def test_online_errors_are_one_line(fake_hub: FakeHub, file_store: str, tmp_path: Path, monkeypatch):
    cases = {
        "hf://sentence-transformers/no-such-model": "Hub repo sentence-transformers/no-such-model not found",
        f"{URL}@no-such-branch": "revision 'no-such-branch' not found in Hub repo",
    }
    for url, expected in cases.items():
        proc = run_cli("publish", url, "minilm:1", "--store", file_store, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert expected in error_line(proc)
    fake_hub.shutdown()
    fake_hub.server_close()  # nothing listens on that port any more
    proc = run_cli("publish", URL, "minilm:1", "--store", file_store, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "cannot reach the Hub" in line and "HF_HUB_OFFLINE=1" in line


# -- the library, in process -------------------------------------------------------------


def test_parse_hub_url():
    from weightship.artifact.hub import parse_hub_url
    from weightship.errors import UsageError

    u = parse_hub_url(URL)
    assert (u.repo_id, u.revision, u.pinned) == (REPO, "main", False)
    u = parse_hub_url(f"hf://models/{REPO}@{COMMIT}")
    assert (u.repo_id, u.revision, u.pinned) == (REPO, COMMIT, True)
    assert parse_hub_url(f"{URL}@refs/pr/3").revision == "refs/pr/3"
    assert parse_hub_url(f"{URL}@feature%2Fx").revision == "feature/x"
    for bad in (
        "hf://just-a-name",
        f"{URL}/model.safetensors",
        f"{URL}@main/model.safetensors",
        f"{URL}@",
        "hf://spaces/org/app",
        "hf://org/bad--name",
        f"{URL}@..%2F..%2Fetc",
        "s3://bucket/x",
    ):
        with pytest.raises(UsageError) as e:
            parse_hub_url(bad)
        assert "\n" not in str(e.value)


def test_snapshot_library(hub_home: Path):
    from weightship.artifact import hub

    storage = hub_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snap = hub.snapshot(
        URL, include=["*.json", "*.safetensors"], exclude=["data_config.json"], cache_dir=hub_home / "hub", offline=True
    )
    assert snap.commit == COMMIT and snap.path == storage / "snapshots" / COMMIT
    assert snap.source_info == {"hub_repo": REPO, "hub_revision": COMMIT, "hub_requested": "main"}
    paths = [f.path for f in snap.packed.manifest.files]
    assert "1_Pooling/config.json" in paths and "model.safetensors" in paths
    assert "data_config.json" not in paths and "vocab.txt" not in paths
    # Every file is read from its blob; the release does not claim symlinks.
    assert all(p.parent == storage / "blobs" for p in snap.packed.local.values())
    assert snap.packed.has_symlinks is False
    by_path = {f.path: f.sha256 for f in snap.packed.manifest.files}
    assert by_path == {k: v for k, v in originals().items() if k in by_path}


def test_snapshot_without_symlinks_is_still_packed(tmp_path: Path):
    """Where symlinks are unavailable huggingface-hub copies files into the snapshot folder."""
    from weightship.artifact import hub

    storage = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    snap_dir = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    shutil.copytree(minilm_source() / "1_Pooling", snap_dir / "1_Pooling")
    shutil.copy(minilm_source() / "config.json", snap_dir / "config.json")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    snap = hub.snapshot(URL, cache_dir=tmp_path / "hub", offline=True)
    assert sorted(snap.packed.local) == ["1_Pooling/config.json", "config.json"]


def cache_of(hub: Path, files: dict[str, bytes]) -> None:
    """A Hub cache holding ``files`` at COMMIT, every one an LFS blob as the Hub keeps weights."""
    storage = hub / f"models--{REPO.replace('/', '--')}"
    blobs, snap = storage / "blobs", storage / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    for rel, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)


def test_snapshot_gets_the_header_checks_of_a_directory(tmp_path: Path):
    """A Hub snapshot is held to what pack holds a directory to: its GGUF headers are read
    (and summarised in the manifest), and a sharded index must agree with its shards."""
    from tests.test_gguf import Q4_K, gguf_bytes
    from tests.test_index_consistency import index_of, sharded, write_index
    from weightship.artifact import hub
    from weightship.errors import ModelError

    good = gguf_bytes(tensors=[("w", [256, 4], Q4_K, 576)])
    cache_of(tmp_path / "ok", {"model.gguf": good})
    snap = hub.snapshot(URL, cache_dir=tmp_path / "ok", offline=True)
    (entry,) = snap.packed.manifest.files
    assert entry.gguf is not None and (entry.gguf.tensors, entry.gguf.parameters) == (1, 1024)

    cache_of(tmp_path / "cut", {"model.gguf": good[:-100]})
    with pytest.raises(ModelError, match=r"^model\.gguf: malformed or truncated GGUF file"):
        hub.snapshot(URL, cache_dir=tmp_path / "cut", offline=True)

    model = sharded(tmp_path / "model")
    weight_map = index_of(model)
    weight_map["embed.weight"] = "model-00002-of-00002.safetensors"  # the first shard holds it
    write_index(model, weight_map)
    cache_of(tmp_path / "idx", {p.name: p.read_bytes() for p in model.iterdir()})
    with pytest.raises(ModelError, match=r"^tensor 'embed\.weight' is mapped to shard .*, whose header lacks it"):
        hub.snapshot(URL, cache_dir=tmp_path / "idx", offline=True)
