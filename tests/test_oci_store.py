"""OCI registries as a store (``oci://HOST/NAMESPACE``) against a real registry: CNCF
distribution 2.8 (Debian's ``docker-registry``), which has no referrers API, so
signatures are found through the referrers tag schema.

Releases are ModelPack artifacts: checked here layer by layer against the media types
the ModelPack specification names, and pulled byte for byte by the ORAS project's own
client. The Store contract itself runs in tests/test_store_conformance.py (``oci``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleetkit import cli_json, fleet_toml, model, node_toml, publish, source_files, start_agents, tree
from tests.helpers import error_line, minilm_source, require, run_cli
from weightship import release
from weightship.artifact.manifest import FileEntry, Manifest
from weightship.errors import ConflictError
from weightship.store import open_store
from weightship.store.layout import manifest_key, signature_key

MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Registry:
    """The registry's own HTTP API, around weightship: what another client sees."""

    def __init__(self, store_url: str, auth: tuple[str, str] | None = None) -> None:
        host_ns = store_url.removeprefix("oci://").split("?")[0]
        self.host, self.namespace = host_ns.split("/", 1)
        self.http = httpx.Client(base_url=f"http://{self.host}", auth=auth, timeout=30, trust_env=False)

    def manifest(self, name: str, ref: str) -> tuple[dict[str, Any], str]:
        r = self.http.get(f"/v2/{self.namespace}/{name}/manifests/{ref}", headers={"Accept": ACCEPT})
        assert r.status_code == 200, (ref, r.status_code, r.text)
        return r.json(), "sha256:" + sha(r.content)

    def status(self, name: str, ref: str) -> int:
        return self.http.head(f"/v2/{self.namespace}/{name}/manifests/{ref}", headers={"Accept": ACCEPT}).status_code

    def blob(self, name: str, digest: str) -> bytes:
        r = self.http.get(f"/v2/{self.namespace}/{name}/blobs/{digest}", follow_redirects=True)
        assert r.status_code == 200, (digest, r.status_code)
        return r.content

    def tags(self, name: str) -> list[str]:
        r = self.http.get(f"/v2/{self.namespace}/{name}/tags/list")
        return sorted(r.json().get("tags") or []) if r.status_code == 200 else []


def _manifest_paths(src: Path, store_url: str, ref: str) -> dict[str, bytes]:
    """The source files a release holds (packing leaves out .git and the like)."""
    st = open_store(store_url)
    try:
        files = release.resolve(st, ref).manifest.files
    finally:
        st.close()
    return {f.path: (src / f.path).read_bytes() for f in files}


# -- the artifact ---------------------------------------------------------------------------


def test_a_release_is_a_modelpack_artifact_that_oras_pulls(oci_store_url: str, tmp_path: Path, keypair) -> None:
    key, pub = keypair
    src = minilm_source()
    proc = run_cli("publish", src, "minilm:1.0", "--tag", "prod", "--key", key, "--store", oci_store_url, "--json")
    assert proc.returncode == 0, proc.stderr
    digest = cli_json(proc)["digest"]
    files = _manifest_paths(src, oci_store_url, "minilm:1.0")
    reg = Registry(oci_store_url)

    doc, oci_digest = reg.manifest("minilm", "1.0")
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["artifactType"] == MODEL_ARTIFACT
    assert doc["config"]["mediaType"] == MODEL_CONFIG
    # One raw layer per file: its digest is the file's sha256, its title the file's path.
    layers = {layer["annotations"]["org.opencontainers.image.title"]: layer for layer in doc["layers"]}
    assert sorted(layers) == sorted(files) and len(doc["layers"]) == len(files)
    for path, data in files.items():
        assert layers[path]["digest"] == f"sha256:{sha(data)}" and layers[path]["size"] == len(data)
        assert layers[path]["annotations"]["org.cncf.model.filepath"] == path
    kinds = {path: layer["mediaType"] for path, layer in layers.items()}
    assert kinds["model.safetensors"] == WEIGHT
    assert kinds["config.json"] == kinds["tokenizer.json"] == kinds["1_Pooling/config.json"] == WEIGHT_CONFIG
    assert kinds["vocab.txt"] == WEIGHT_CONFIG
    assert kinds["README.md"] == DOC
    allowed = {WEIGHT, WEIGHT_CONFIG, DOC, "application/vnd.cncf.model.code.v1.raw"}
    assert set(kinds.values()) <= allowed | {"application/vnd.cncf.model.dataset.v1.raw"}
    # The ModelPack config: the model's name and version, and the layers' digests in order.
    config = json.loads(reg.blob("minilm", doc["config"]["digest"]))
    assert config["descriptor"]["name"] == "minilm" and config["descriptor"]["version"] == "1.0"
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in doc["layers"]]}
    assert config["config"]["format"] == "safetensors"
    # weightship's manifest rides along byte for byte: its sha256 is the release digest.
    ours = doc["annotations"]["dev.weightship.manifest"].encode()
    assert "sha256:" + sha(ours) == digest
    assert doc["annotations"]["dev.weightship.version"] == "1.0"
    # The movable tag is an OCI tag on the very same manifest.
    assert reg.manifest("minilm", "prod")[1] == oci_digest

    # The signature: a referrer (distribution 2.8 has no referrers API: the tag schema).
    index, _ = reg.manifest("minilm", oci_digest.replace(":", "-"))
    assert [m["artifactType"] for m in index["manifests"]] == [BUNDLE]
    sig_doc, _ = reg.manifest("minilm", index["manifests"][0]["digest"])
    assert sig_doc["artifactType"] == BUNDLE
    assert sig_doc["subject"]["digest"] == oci_digest
    bundle = reg.blob("minilm", sig_doc["layers"][0]["digest"])
    assert json.loads(bundle)["mediaType"].startswith("application/vnd.dev.sigstore.bundle")

    # weightship pulls and verifies it; the signature it writes is the referrer's bundle.
    out = tmp_path / "pulled"
    proc = run_cli("pull", "minilm:prod", out, "--key", pub, "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in tree(out).items() if k != "model.sig"} == files
    assert (out / "model.sig").read_bytes() == bundle
    assert run_cli("verify", out, "--key", pub).returncode == 0

    # The ORAS project's client pulls the same files, byte for byte.
    oras_client = pytest.importorskip("oras.client")
    client = oras_client.OrasClient(hostname=reg.host, insecure=True)
    oras_out = tmp_path / "oras"
    client.pull(target=f"{reg.host}/{reg.namespace}/minilm:1.0", outdir=str(oras_out))
    assert tree(oras_out) == files


def test_versions_are_immutable_and_tags_move(oci_store_url: str, tmp_path: Path) -> None:
    reg = Registry(oci_store_url)
    a, b = model(tmp_path, 1), model(tmp_path, 2)
    assert run_cli("-q", "publish", a, "m:1", "--tag", "prod", "--store", oci_store_url).returncode == 0
    first = reg.manifest("m", "1")[1]

    # Another model under the same version: refused, and the registry still has the first.
    proc = run_cli("publish", b, "m:1", "--store", oci_store_url)
    assert proc.returncode == 1 and "already exists" in error_line(proc), proc.stderr
    assert reg.manifest("m", "1")[1] == first
    # The same model again is a retry, not a conflict.
    proc = run_cli("-q", "publish", a, "m:1", "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr

    assert run_cli("-q", "publish", b, "m:2", "--store", oci_store_url).returncode == 0
    second = reg.manifest("m", "2")[1]
    proc = run_cli("tag", "m:2", "prod", "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr
    assert reg.manifest("m", "prod")[1] == second  # the tag moved
    assert reg.manifest("m", "1")[1] == first  # the version did not

    # A tag never shadows a version, nor a version a tag.
    proc = run_cli("tag", "m:2", "1", "--store", oci_store_url)
    assert proc.returncode == 1 and "shadow" in error_line(proc), proc.stderr
    assert reg.manifest("m", "1")[1] == first
    proc = run_cli("publish", a, "m:prod", "--store", oci_store_url)
    assert proc.returncode == 1 and "tag" in error_line(proc), proc.stderr
    assert reg.manifest("m", "prod")[1] == second

    st = open_store(oci_store_url)
    try:
        assert release.versions(st, "m") == ["1", "2"]
        assert release.tags(st, "m") == {"prod": "2"}
        assert release.names(st) == ["m"]
    finally:
        st.close()
    proc = run_cli("ls", "m", "--store", oci_store_url, "--json")
    assert proc.returncode == 0, proc.stderr

    # Semver build metadata: OCI tags have no "+", so the tag is 3_build.1, and the
    # version stays 3+build.1 (the manifest says so); 3_build.1 is then taken.
    assert run_cli("-q", "publish", a, "m:3+build.1", "--store", oci_store_url).returncode == 0
    assert "3_build.1" in reg.tags("m")
    st = open_store(oci_store_url)
    try:
        assert "3+build.1" in release.versions(st, "m")
        assert release.resolve(st, "m:3+build.1").version == "3+build.1"
    finally:
        st.close()
    proc = run_cli("publish", b, "m:3_build.1", "--store", oci_store_url)
    assert proc.returncode == 1 and "m:3+build.1 already is" in error_line(proc), proc.stderr

    # A name a registry cannot hold is a usage error, before anything is read.
    proc = run_cli("publish", a, "Big:1", "--store", oci_store_url)
    assert proc.returncode == 2 and "lowercase" in error_line(proc), proc.stderr


def test_racing_writers_of_one_version_leave_exactly_one(oci_store_url: str, tmp_path: Path) -> None:
    """Registries have no conditional write: the store checks, puts, waits and checks
    again, so that of writers racing for one version exactly one succeeds and its
    manifest is what stays."""
    st = open_store(oci_store_url).scoped("race")
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"weights")
    st.put_blob(sha(b"weights"), blob, 7)
    go = threading.Barrier(6)
    for round_ in range(2):
        version = f"v{round_}"
        results: dict[int, str] = {}
        docs = {}
        for i in range(6):
            m = Manifest([FileEntry("w.bin", 7, sha(b"weights"))], name="race", version=version)
            m.created = f"2026-01-01T00:00:0{i}Z"  # six different manifests
            docs[i] = m.to_bytes()

        def writer(i: int, version: str = version, results: dict = results, docs: dict = docs) -> None:
            go.wait()
            try:
                st.write(manifest_key("race", version), docs[i], exclusive=True)
                results[i] = "won"
            except ConflictError:
                results[i] = "conflict"
            except Exception as e:
                results[i] = repr(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r == "won"]
        assert len(winners) == 1 and list(results.values()).count("conflict") == 5, results
        assert st.read(manifest_key("race", version)) == docs[winners[0]]
    st.close()


def test_a_signed_writer_that_lost_the_race_leaves_no_signature_behind(oci_store_url: str) -> None:
    """Each writer's signature is pushed (a referrer of its manifest) before its manifest:
    the losers' would outlive them, kept by their referrers tags, unless they drop them."""
    st = open_store(oci_store_url)
    docs = {}
    for i in range(3):
        m = Manifest([], name="signed", version="1")
        m.signature, m.created = "key", f"2026-01-01T00:00:0{i}Z"
        docs[i] = m.to_bytes()
    go = threading.Barrier(3)
    results: dict[int, str] = {}

    def writer(i: int) -> None:
        st.write(signature_key("signed", "1", release.digest_of(docs[i])), b'{"bundle": %d}' % i)
        go.wait()
        try:
            st.write(manifest_key("signed", "1"), docs[i], exclusive=True)
            results[i] = "won"
        except ConflictError:
            results[i] = "conflict"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [i for i, r in results.items() if r == "won"]
    _, digest = Registry(oci_store_url).manifest("signed", "1")
    assert Registry(oci_store_url).tags("signed") == sorted(["1", digest.replace(":", "-")]), results
    assert release.load_release(st, "signed", "1").signature == b'{"bundle": %d}' % winner
    st.close()


# -- warming nodes from the registry --------------------------------------------------------


def test_agents_warm_from_the_registry_and_refuse_a_corrupt_blob(
    oci_store_url: str, registry_server, tmp_path: Path, keypair
) -> None:
    key, pub = keypair
    src = model(tmp_path, 31, hidden=512)
    publish(src, "m:1.0", oci_store_url, key, tags=["prod"])
    agents = start_agents([tmp_path / f"agent-{i}" for i in range(2)], node_toml(tmp_path / "node.toml", pub))
    try:
        work = tmp_path / "work"
        work.mkdir()
        regions = {"r": [a.node(f"a{i}") for i, a in enumerate(agents)]}
        (work / "weightship.toml").write_text(fleet_toml(regions, None, pub))

        # Presigned (the default): an anonymous registry's blob URLs need no credentials.
        proc = run_cli("warm", "m:prod", "--region", "r", "--json", "--store", oci_store_url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == 2, doc
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        assert sum(n["bytes_from_origin"] for n in doc["nodes"]) == total, doc  # peers did the rest
        for a in agents:
            assert source_files(a.cache / "models" / "m" / "prod") == source_files(src)
        status = run_cli(
            "status", "m:prod", "--region", "r", "--require", "all", "--json", "--store", oci_store_url, cwd=work
        )
        assert status.returncode == 0 and cli_json(status)["ready"] == 2, status.stdout + status.stderr

        # The nodes reading the registry themselves (--credentials node): the scoped store.
        src2 = model(tmp_path, 32, hidden=512)
        publish(src2, "m:2.0", oci_store_url, key)
        proc = run_cli(
            "warm", "m:2.0", "--region", "r", "--no-peers", "--credentials", "node", "--json",
            "--store", oci_store_url, cwd=work,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert cli_json(proc)["ready"] == 2
        for a in agents:
            assert source_files(a.cache / "models" / "m" / "2.0") == source_files(src2)

        # One bit flipped in the registry's own copy of a blob: no node takes it.
        src3 = model(tmp_path, 33, hidden=512)
        publish(src3, "m:3.0", oci_store_url, key)
        weights = max((p for p in src3.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        on_disk = registry_server.blob_path(sha(weights.read_bytes()))
        bad = bytearray(on_disk.read_bytes())
        bad[len(bad) // 2] ^= 0x01
        on_disk.write_bytes(bytes(bad))
        proc = run_cli("warm", "m:3.0", "--region", "r", "--no-peers", "--json", "--store", oci_store_url, cwd=work)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == 0 and all(n["state"] == "failed" for n in doc["nodes"]), doc
        assert all("corrupt" in n["error"] or "sha256" in n["error"] for n in doc["nodes"]), doc
        for a in agents:
            assert not (a.cache / "models" / "m" / "3.0").exists()
        status = run_cli(
            "status", "m:3.0", "--region", "r", "--require", "all", "--json", "--store", oci_store_url, cwd=work
        )
        assert status.returncode != 0 and cli_json(status)["ready"] == 0
    finally:
        for a in agents:
            a.stop()


# -- authentication ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    """A registry that lets nobody in without a password (htpasswd, Basic)."""
    from tests.servers import registry_binary, start_registry

    require(registry_binary() is not None, "an OCI registry (docker-registry)", "apt-get install docker-registry")
    server = start_registry(tmp_path_factory.mktemp("auth-registry"), users={"ci": "s3cret-publisher-pw"})
    try:
        yield server
    finally:
        server.stop()


def test_credentials_come_from_the_docker_configuration(auth_registry, tmp_path: Path, monkeypatch, keypair) -> None:
    key, pub = keypair
    url = f"oci://{auth_registry.host}/{auth_registry.namespace()}"
    src = model(tmp_path, 41)
    # No credentials: one line that says what to do.
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))
    proc = run_cli("publish", src, "m:1", "--store", url)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert "refused anonymous access" in line and "docker login" in line, line
    # The wrong password: the same, naming the credentials.
    monkeypatch.setenv("DOCKER_CONFIG", str(auth_registry.docker_config(tmp_path / "wrong", "ci", "not-it")))
    proc = run_cli("ls", "--store", url)
    assert proc.returncode == 1 and "refused the credentials" in error_line(proc), proc.stderr
    # docker login's config.json: publish and pull work.
    publisher = auth_registry.docker_config(tmp_path / "ci", "ci")
    monkeypatch.setenv("DOCKER_CONFIG", str(publisher))
    proc = run_cli("-q", "publish", src, "m:1", "--key", key, "--store", url)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("pull", "m:1", tmp_path / "out", "--key", pub, "--store", url)
    assert proc.returncode == 0, proc.stderr
    assert source_files(tmp_path / "out") == source_files(src)
    reg = Registry(url, auth=("ci", "s3cret-publisher-pw"))
    assert reg.manifest("m", "1")[0]["artifactType"] == MODEL_ARTIFACT
    # A credential helper (credsStore), as docker runs it: `docker-credential-NAME get`,
    # the host on stdin, the credentials as JSON on stdout.
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper = helpers / "docker-credential-wstest"
    answer = json.dumps({"ServerURL": auth_registry.host, "Username": "ci", "Secret": "s3cret-publisher-pw"})
    helper.write_text(f"#!/bin/sh\nread host\n[ \"$host\" = {auth_registry.host} ] || exit 1\necho '{answer}'\n")
    helper.chmod(0o755)
    (tmp_path / "helper-config").mkdir()
    (tmp_path / "helper-config" / "config.json").write_text(json.dumps({"credsStore": "wstest"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "helper-config"))
    monkeypatch.setenv("PATH", f"{helpers}:{os.environ['PATH']}")
    proc = run_cli("ls", "m", "--store", url)
    assert proc.returncode == 0 and "m:1" in proc.stdout, proc.stderr
    monkeypatch.setenv("DOCKER_CONFIG", str(publisher))

    # Nodes never get the publisher's credentials: with no URL a node may use without
    # them, a presigned warm says to give the nodes credentials of their own.
    agents = start_agents([tmp_path / "agent"], node_toml(tmp_path / "node.toml", pub), env={"DOCKER_CONFIG": ""})
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "weightship.toml").write_text(fleet_toml({"r": [agents[0].node("a0")]}, None, pub))
        proc = run_cli("warm", "m:1", "--region", "r", "--store", url, cwd=work)
        assert proc.returncode == 2 and "credentials" in error_line(proc), proc.stdout + proc.stderr
    finally:
        for a in agents:
            a.stop()
    # A node with its own docker configuration reads the registry itself.
    node_config = auth_registry.docker_config(tmp_path / "node-docker", "ci")
    agents = start_agents(
        [tmp_path / "agent-2"], node_toml(tmp_path / "node.toml", pub), env={"DOCKER_CONFIG": str(node_config)}
    )
    try:
        (work / "weightship.toml").write_text(fleet_toml({"r": [agents[0].node("a0")]}, None, pub))
        proc = run_cli("warm", "m:1", "--region", "r", "--credentials", "node", "--json", "--store", url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert source_files(agents[0].cache / "models" / "m" / "1") == source_files(src)
    finally:
        for a in agents:
            a.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """A registry behind a token service (the bearer flow): ``ci`` may push and pull,
    ``reader`` only pull, anonymous nothing."""
    from tests.servers import TokenService, registry_binary, start_registry

    require(registry_binary() is not None, "an OCI registry (docker-registry)", "apt-get install docker-registry")
    d = tmp_path_factory.mktemp("token-registry")
    users = {"ci": "ci-token-pw-123", "reader": "reader-pw-456"}
    tokens = TokenService(d, users, {"ci": {"pull", "push", "delete"}, "reader": {"pull"}})
    server = start_registry(d, users=users, token=tokens)
    try:
        yield server, tokens
    finally:
        server.stop()
        tokens.stop()


def test_bearer_tokens_from_the_registry_token_service(token_registry, tmp_path: Path, monkeypatch, keypair) -> None:
    server, tokens = token_registry
    key, pub = keypair
    ns = server.namespace()
    url = f"oci://{server.host}/{ns}"
    src = model(tmp_path, 42)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))
    proc = run_cli("publish", src, "m:1", "--store", url)
    assert proc.returncode == 1 and "refused anonymous access" in error_line(proc), proc.stderr

    monkeypatch.setenv("DOCKER_CONFIG", str(server.docker_config(tmp_path / "ci", "ci")))
    tokens.requests.clear()
    proc = run_cli("-q", "publish", src, "m:1", "--tag", "prod", "--key", key, "--store", url)
    assert proc.returncode == 0, proc.stderr
    # A token per repository and action, asked for once per process, not per request.
    asked = [
        (user, scope.rsplit(":", 1)[0], frozenset(scope.rsplit(":", 1)[1].split(",")))
        for user, scope in tokens.requests
    ]
    pull, push = frozenset({"pull"}), frozenset({"pull", "push"})
    assert sorted(asked) == [("ci", f"repository:{ns}/m", pull), ("ci", f"repository:{ns}/m", push)], tokens.requests

    # Pull-only credentials read the release and cannot change it.
    monkeypatch.setenv("DOCKER_CONFIG", str(server.docker_config(tmp_path / "reader", "reader")))
    proc = run_cli("pull", "m:prod", tmp_path / "out", "--key", pub, "--store", url)
    assert proc.returncode == 0, proc.stderr
    assert source_files(tmp_path / "out") == source_files(src)
    proc = run_cli("tag", "m:1", "canary", "--store", url)
    assert proc.returncode == 1 and "refused the credentials" in error_line(proc), proc.stderr
    proc = run_cli("ls", "m", "--store", url)
    assert proc.returncode == 0 and "prod" in proc.stdout, proc.stderr

    # Nodes get a token that pulls this repository and does nothing else, never a password.
    monkeypatch.setenv("DOCKER_CONFIG", str(server.docker_config(tmp_path / "ci", "ci")))
    st = open_store(url).scoped("m")
    weights = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob_url = st.blob_url(sha(weights.read_bytes()))
    st.close()
    assert blob_url is not None and "#bearer=" in blob_url and "ci-token-pw" not in blob_url
    plain, token = blob_url.split("#bearer=")
    with httpx.Client(timeout=30, trust_env=False, headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get(plain).content == weights.read_bytes()
        assert http.post(f"http://{server.host}/v2/{ns}/m/blobs/uploads/").status_code == 401
        assert http.get(f"http://{server.host}/v2/{ns}/other/tags/list").status_code == 401
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))  # the agents have none
    agents = start_agents([tmp_path / f"agent-{i}" for i in range(2)], node_toml(tmp_path / "node.toml", pub))
    monkeypatch.setenv("DOCKER_CONFIG", str(server.docker_config(tmp_path / "ci", "ci")))
    try:
        work = tmp_path / "work"
        work.mkdir()
        regions = {"r": [a.node(f"a{i}") for i, a in enumerate(agents)]}
        (work / "weightship.toml").write_text(fleet_toml(regions, None, pub))
        proc = run_cli("warm", "m:prod", "--region", "r", "--json", "--store", url, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert cli_json(proc)["ready"] == 2
        for a in agents:
            assert source_files(a.cache / "models" / "m" / "prod") == source_files(src)
    finally:
        for a in agents:
            a.stop()


def test_an_oci_store_in_weightship_toml(oci_store_url: str, tmp_path: Path) -> None:
    (tmp_path / "weightship.toml").write_text(f'[store]\nurl = "{oci_store_url}"\n')
    assert run_cli("-q", "publish", model(tmp_path, 61), "m:1", cwd=tmp_path).returncode == 0
    proc = run_cli("show", "m:1", cwd=tmp_path)
    assert proc.returncode == 0 and "m:1" in proc.stdout, proc.stderr


def test_plain_http_only_to_loopback_unless_insecure() -> None:
    from weightship.store.oci import OciStore

    assert OciStore.from_url("oci://127.0.0.1:5000/ns")._reg.base == "http://127.0.0.1:5000"
    assert OciStore.from_url("oci://localhost:5000/ns")._reg.base == "http://localhost:5000"
    assert OciStore.from_url("oci://registry.example/ns")._reg.base == "https://registry.example"
    assert OciStore.from_url("oci://registry.example/ns?insecure=true")._reg.base == "http://registry.example"
    proc = run_cli("ls", "--store", "oci://registry.example/ns?colour=blue")
    assert proc.returncode == 2 and "unknown setting" in error_line(proc)
    proc = run_cli("ls", "--store", "oci://registry.example/Team")
    assert proc.returncode == 2 and "repository name" in error_line(proc)


def _basic_registry(base: str, seen: list[tuple[str, str | None]]) -> httpx.Client:
    """A client with a password for registry.example, whose registry (a mock) wants Basic."""
    from weightship.store.oci_auth import Credentials, RegistryAuth

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("Authorization")))
        if request.headers.get("Authorization"):
            return httpx.Response(200, json={})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})

    auth = RegistryAuth("registry.example", Credentials("ci", "s3cret"))
    return httpx.Client(base_url=base, auth=auth, transport=httpx.MockTransport(answer))


def test_a_password_never_goes_over_plain_http_nor_to_another_host() -> None:
    from weightship.errors import StoreError

    # ?insecure=true: plain HTTP to a registry that asks for a password is refused, unsent.
    seen: list[tuple[str, str | None]] = []
    with _basic_registry("http://registry.example", seen) as http, pytest.raises(StoreError, match="plain HTTP"):
        http.get("/v2/ns/m/tags/list")
    assert seen == [("http://registry.example/v2/ns/m/tags/list", None)]

    # Over HTTPS it is sent, to the registry's host only (an upload Location elsewhere gets none).
    seen.clear()
    with _basic_registry("https://registry.example", seen) as http:
        assert http.get("/v2/ns/m/tags/list").status_code == 200
        http.patch("https://uploads.elsewhere.example/v2/ns/m/blobs/uploads/1", content=b"x")
    assert [a is not None for _, a in seen] == [False, True, False]


# -- removing ----------------------------------------------------------------------------------


def test_rm_and_untag_delete_what_they_name_and_nothing_else(oci_store_url: str, tmp_path: Path, keypair) -> None:
    key, _ = keypair
    reg = Registry(oci_store_url)
    publish(model(tmp_path, 51), "m:1", oci_store_url, key)
    publish(model(tmp_path, 52), "m:2", oci_store_url, key, tags=["prod", "canary"])
    _, first = reg.manifest("m", "1")
    referrers = first.replace(":", "-")
    assert reg.status("m", referrers) == 200

    proc = run_cli("rm", "m:1", "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr
    assert reg.status("m", "1") == 404 and reg.status("m", first) == 404
    assert reg.status("m", referrers) == 404  # the signature went with it
    st = open_store(oci_store_url)
    try:
        assert release.versions(st, "m") == ["2"]
    finally:
        st.close()
    # A tagged release is refused without --force, as in every store.
    proc = run_cli("rm", "m:2", "--store", oci_store_url)
    assert proc.returncode == 1 and "prod" in error_line(proc), proc.stderr
    assert reg.status("m", "2") == 200

    # untag deletes the one tag, even on a registry that deletes manifests by digest only
    # (distribution 2.8): the release and its other tag stay.
    _, second = reg.manifest("m", "2")
    proc = run_cli("untag", "m:canary", "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr
    assert reg.status("m", "canary") == 404
    assert reg.manifest("m", "2")[1] == reg.manifest("m", "prod")[1] == second
    assert reg.tags("m") == sorted(["2", "prod", second.replace(":", "-")])
    proc = run_cli("rm", "m:2", "--force", "--store", oci_store_url)
    assert proc.returncode == 0, proc.stderr
    assert reg.status("m", "2") == reg.status("m", "prod") == 404

    # The registry's own garbage collector frees blobs: prune says so, in one line.
    proc = run_cli("prune", "--store", oci_store_url)
    assert proc.returncode == 1 and "garbage" in error_line(proc), proc.stderr
