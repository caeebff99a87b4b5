"""Fixtures shared across the suite. Servers (S3, sshd, agents) are started by the tests
that need them and stopped by PID; see tests/servers.py and tests/sshd.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import minilm_source


@pytest.fixture(autouse=True)
def _not_a_github_step(monkeypatch) -> None:
    """Run in GitHub Actions, publish, warm and status write step outputs and a job summary
    whenever GITHUB_OUTPUT is set: the suite's own commands must not write to CI's files."""
    monkeypatch.delenv("GITHUB_OUTPUT", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(autouse=True)
def _own_digest_cache(monkeypatch, tmp_path_factory) -> Path:
    """publish remembers digests under ~/.cache by default: each test gets its own
    directory, so no test reads another's entries or writes to the home directory.
    (XDG_CACHE_HOME, because run_cli keeps WEIGHTSHIP_* settings out of the commands.)"""
    d = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    monkeypatch.delenv("WEIGHTSHIP_CACHE_DIR", raising=False)
    return d / "weightship"


@pytest.fixture
def minilm(tmp_path: Path) -> Path:
    """A writable copy of the real all-MiniLM-L6-v2 model (safetensors, tokenizer, 1_Pooling/)."""
    dest = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(minilm_source(), dest)
    return dest


@pytest.fixture(scope="session")
def oms_fixtures(tmp_path_factory) -> Path:
    """The OMS reference fixtures: ROOT/keys/*.pem and ROOT/v1.1.0-{elliptic-key,certificate,
    sigstore}/, the first two signed now by model_signing (tests/oms_fixtures.py). Read-only
    by convention: tests that change a folder copy it first."""
    from tests.oms_fixtures import build

    return build(tmp_path_factory.mktemp("oms"))


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """A small real safetensors model: two shards, index, config, tokenizer folder."""
    from weightship.demo import build_model

    return build_model(tmp_path / "small-model")


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    from weightship.trust.signers import generate_key

    key = tmp_path / "keys" / "release.pem"
    key.parent.mkdir()
    pub = generate_key(key)
    return key, pub


@pytest.fixture
def file_store(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real SeaweedFS (``weed mini``) for the session, stopped by PID at the end.
    Tests that need S3 take ``s3_store_url``, which gives each its own bucket."""
    from tests.servers import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store_url(s3_server, monkeypatch) -> str:
    """``s3://BUCKET/weights`` in a fresh bucket, with the standard AWS chain (AWS_*
    variables) pointing at ``s3_server`` and nobody's ~/.aws in the way."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = s3_server.create_bucket()
    return f"s3://{bucket}/weights"


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory):
    """One real Azurite (``azurite-blob``, Azure Blob) for the session, stopped by PID at the
    end. Tests that need Azure Blob take ``az_store_url``, which gives each its own container."""
    from tests.helpers import require
    from tests.servers import azurite_binary, start_azurite

    require(azurite_binary() is not None, "Azurite (azurite-blob)", "./scripts/test installs it from npm")
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def az_store_url(azurite_server, monkeypatch) -> str:
    """``az://CONTAINER/weights`` in a fresh container, with obstore's standard Azure
    environment (AZURE_STORAGE_USE_EMULATOR, AZURITE_BLOB_STORAGE_URL, ...) pointing at
    ``azurite_server`` and nobody else's AZURE_* settings in the way."""
    import os

    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(name)
    for name, value in azurite_server.env().items():
        monkeypatch.setenv(name, value)
    container = azurite_server.create_container()
    return f"az://{container}/weights"


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory):
    """One real OCI registry (CNCF distribution, Debian's ``docker-registry``) for the
    session, anonymous, stopped by PID at the end. Tests take ``oci_store_url``, which
    gives each its own namespace."""
    from tests.helpers import require
    from tests.servers import registry_binary, start_registry

    require(registry_binary() is not None, "an OCI registry (docker-registry)", "apt-get install docker-registry")
    server = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oci_store_url(registry_server, monkeypatch, tmp_path_factory) -> str:
    """``oci://127.0.0.1:PORT/NAMESPACE`` in a fresh namespace, with an empty docker
    configuration (DOCKER_CONFIG) so that nobody's ~/.docker is in the way."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker-config")))
    return f"oci://{registry_server.host}/{registry_server.namespace()}"


@pytest.fixture
def kube(tmp_path: Path):
    """The stand-in Kubernetes API server (tests/kubeapi.py), with a kubeconfig for it."""
    from tests.kubeapi import start_kubeapi

    api = start_kubeapi(tmp_path)
    try:
        yield api
    finally:
        api.stop()
