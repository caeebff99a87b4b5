"""Single-file models: ``publish model.gguf NAME:VERSION``, ``pull`` into ``DEST/model.gguf``,
``sign``/``verify`` of one file, each held to the reference signer (``model_signing`` 1.1.1)
in both directions. The reference names the one resource of a file's signature "." (the
file relative to itself); a single-file release's signature is that very statement, so the
signature a release carries verifies with ``model_signing`` against the file it was made of.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, fleet_toml
from tests.helpers import assert_model_signing_ok, error_line, model_signing, run_cli
from tests.test_gguf import Q4_K, gguf_bytes
from weightship import release
from weightship.artifact.manifest import FileEntry, Manifest
from weightship.artifact.pack import pack
from weightship.errors import IntegrityError
from weightship.trust import signers as signing
from weightship.trust.policy import TrustPolicy

GIT_IGNORES = {".git", ".gitattributes", ".github", ".gitignore"}


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.gguf"
    tensors = [(f"blk.{i}.w", [256, 64], Q4_K, 144 * 64) for i in range(8)]
    path.write_bytes(gguf_bytes(tensors=tensors))
    (src / "unrelated.txt").write_text("beside the model, never part of it")
    return path


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_store_url")


def statement(sig: Path) -> dict:
    bundle = json.loads(sig.read_bytes())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def test_publish_and_pull_a_gguf_file(tmp_path: Path, gguf_file: Path, keypair, store_url: str) -> None:
    key, pub = keypair
    proc = run_cli("publish", gguf_file, "llm:1.0", "--key", key, "--store", store_url, "--tag", "prod", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = cli_json(proc)
    assert (doc["files"], doc["total_bytes"], doc["signed"]) == (1, gguf_file.stat().st_size, "key")

    proc = run_cli("show", "llm:prod", "--store", store_url, "--key", pub, "--json")
    assert proc.returncode == 0, proc.stderr
    shown = cli_json(proc)
    assert [f["path"] for f in shown["files"]] == ["model.gguf"]
    assert shown["files"][0]["gguf"]["types"] == {"Q4_K": 8}
    assert set(shown["ignore_paths"]) == GIT_IGNORES
    assert shown["signer"]["verified"] is True

    dest = tmp_path / "dest"
    proc = run_cli("pull", "llm:prod", dest, "--key", pub, "--store", store_url)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["model.gguf", "model.sig"]
    assert (dest / "model.gguf").read_bytes() == gguf_file.read_bytes()
    # The signature the release carries is the reference's statement over that file ...
    assert_model_signing_ok(
        model_signing("verify", "key", dest / "model.gguf", "--signature", dest / "model.sig", "--public_key", pub)
    )
    assert_model_signing_ok(
        model_signing("verify", "key", gguf_file, "--signature", dest / "model.sig", "--public_key", pub)
    )
    # ... and weightship verifies the pulled directory and the file with it.
    for target in (dest, dest / "model.gguf"):
        extra = [] if target == dest else ["--signature", dest / "model.sig"]
        proc = run_cli("verify", target, "--key", pub, *extra)
        assert proc.returncode == 0 and "verified 1 file," in proc.stdout, proc.stderr

    # A key the release was not signed with: refused before any byte is fetched.
    other_pub = signing.generate_key(tmp_path / "other.pem")
    proc = run_cli("pull", "llm:prod", tmp_path / "dest2", "--key", other_pub, "--store", store_url)
    assert proc.returncode == 1 and "not by a trusted key" in error_line(proc)
    assert not (tmp_path / "dest2").exists()


def test_a_lone_safetensors_file(tmp_path: Path, keypair) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    key, pub = keypair
    path = tmp_path / "adapter.safetensors"
    save_file({"lora_a": np.ones((4, 8), dtype=np.float32)}, str(path))
    store = f"file://{tmp_path / 'store'}"
    proc = run_cli("pack", path, "--json")
    assert proc.returncode == 0, proc.stderr
    files = cli_json(proc)["files"]
    assert [(f["path"], f["safetensors"]["parameters"]) for f in files] == [("adapter.safetensors", 32)]
    assert run_cli("publish", path, "lora:1", "--key", key, "--store", store).returncode == 0
    proc = run_cli("pull", "lora:1", tmp_path / "out", "--key", pub, "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == path.read_bytes()


def test_sign_and_verify_one_file_both_ways_with_the_reference(tmp_path: Path, gguf_file: Path, keypair) -> None:
    key, pub = keypair
    # weightship signs: FILE.sig beside the file; the reference accepts it.
    proc = run_cli("sign", gguf_file, "--key", key)
    assert proc.returncode == 0, proc.stderr
    ours = gguf_file.with_name("model.gguf.sig")
    assert ours.is_file() and not (gguf_file.parent / "model.sig").exists()
    assert_model_signing_ok(model_signing("verify", "key", gguf_file, "--signature", ours, "--public_key", pub))

    # The reference signs: weightship accepts it.
    theirs = tmp_path / "reference.sig"
    ref = model_signing("sign", "key", gguf_file, "--signature", theirs, "--private_key", key)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    proc = run_cli("verify", gguf_file, "--signature", theirs, "--key", pub, "--json")
    assert proc.returncode == 0, proc.stderr
    assert cli_json(proc)["files"] == 1

    # The same statement, field by field (the reference writes ignore_paths unordered).
    a, b = statement(ours), statement(theirs)
    assert a["predicate"]["resources"] == [
        {k: r[k] for k in ("name", "algorithm", "digest")} for r in b["predicate"]["resources"]
    ]
    assert a["predicate"]["resources"][0]["name"] == "."
    assert a["subject"] == b["subject"] and a["subject"][0]["name"] == "model.gguf"
    sa, sb = a["predicate"]["serialization"], b["predicate"]["serialization"]
    assert set(sa.pop("ignore_paths")) == set(sb.pop("ignore_paths")) == GIT_IGNORES
    assert sa == sb

    # One byte changed: both verifiers refuse, weightship with one line naming the file.
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 1
    gguf_file.write_bytes(bytes(data))
    for sig in (ours, theirs):
        proc = run_cli("verify", gguf_file, "--signature", sig, "--key", pub)
        assert proc.returncode == 1
        assert "model.gguf: content differs from what was signed" in error_line(proc)
        ref = model_signing("verify", "key", gguf_file, "--signature", sig, "--public_key", pub)
        assert "Verification succeeded" not in ref.stdout


def test_a_file_signature_never_covers_a_directory_of_more_files(tmp_path: Path, gguf_file: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    assert run_cli("publish", gguf_file, "llm:1", "--key", key, "--store", store).returncode == 0
    dest = tmp_path / "dest"
    assert run_cli("pull", "llm:1", dest, "--key", pub, "--store", store).returncode == 0
    (dest / "extra.bin").write_bytes(b"added after signing")
    proc = run_cli("verify", dest, "--key", pub)
    assert proc.returncode == 1
    assert "the signature covers a single file, but" in error_line(proc)

    # A store that pairs the file's signature with a manifest of two files is refused too.
    st_release = release.resolve(_open(store), "llm:1")
    one = st_release.manifest.files[0]
    forged = Manifest(
        files=[one, FileEntry("extra.bin", one.size, one.sha256)], name="llm", version="1", signature="key"
    )
    fake = release.Release("llm", "1", forged, forged.to_bytes(), st_release.signature)
    with pytest.raises(IntegrityError, match="covers a single file, but manifest of llm:1 holds 2 files"):
        release.check_signature(fake, TrustPolicy(keys=[pub]))


def _open(url: str):
    from weightship.store import open_store

    return open_store(url)


def test_warm_a_single_file_release_onto_nodes(tmp_path: Path, gguf_file: Path, keypair) -> None:
    """A node checks a single-file release's signature against its own policy like any
    other, and serves it as ``models/NAME/VERSION/model.gguf``."""
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    assert run_cli("publish", gguf_file, "llm:1", "--key", key, "--store", store, "--tag", "prod").returncode == 0
    nodes = [{"name": f"n{i}", "transport": "local", "cache": f"caches/n{i}"} for i in (1, 2)]
    (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": nodes}, store=store, pub=pub))
    proc = run_cli("warm", "llm:prod", "--region", "lab", "--wait", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i in (1, 2):
        served = tmp_path / "caches" / f"n{i}" / "models" / "llm" / "prod" / "model.gguf"
        assert served.read_bytes() == gguf_file.read_bytes()

    # Nodes that trust another key refuse it.
    signing.generate_key(tmp_path / "other.pem")
    nodes = [{"name": "n3", "transport": "local", "cache": "caches/n3"}]
    (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": nodes}, store=store, pub=tmp_path / "other.pub"))
    proc = run_cli("warm", "llm:prod", "--region", "lab", "--wait", cwd=tmp_path)
    assert proc.returncode == 1
    assert "not by a trusted key" in proc.stdout + proc.stderr
    assert not (tmp_path / "caches" / "n3" / "models" / "llm" / "1").exists()


def test_single_file_usage(tmp_path: Path, gguf_file: Path, keypair) -> None:
    proc = run_cli("pack", gguf_file, "--ignore", "x")
    assert proc.returncode == 2 and "--ignore applies to a model directory" in error_line(proc)
    proc = run_cli("pack", tmp_path / "missing.gguf")
    assert proc.returncode == 1 and "no such file or directory" in error_line(proc)
    # A mistyped path is not an unsigned model ("missing.gguf/model.sig: no signature").
    proc = run_cli("verify", tmp_path / "missing.gguf", "--key", keypair[1])
    assert proc.returncode == 1 and "missing.gguf: no such file or directory" in error_line(proc)
    proc = run_cli("verify", gguf_file, "--key", keypair[1])
    assert proc.returncode == 1 and "model.gguf.sig: no signature" in error_line(proc)
    # The library packs it as a model of one file named after it.
    packed = pack(gguf_file)
    assert packed.single_file and [f.path for f in packed.manifest.files] == ["model.gguf"]
    assert packed.resources() == {".": packed.manifest.files[0].sha256}
    # A copy under another name is the same bytes under that name.
    other = shutil.copy(gguf_file, tmp_path / "renamed.gguf")
    assert [f.path for f in pack(other).manifest.files] == ["renamed.gguf"]
