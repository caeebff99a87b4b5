"""Release artifact core: pack, sign, verify, publish, pull on real files and the reference signer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import assert_reference_verifies_key, error_line, run_cli, tree_digest
from tests.oms_fixtures import key_fingerprint


def manifest_files(model: Path) -> dict[str, str]:
    """The files a release of ``model`` carries (what a pull must reproduce byte for byte)."""
    snap = tree_digest(model)
    return {k: v for k, v in snap.items() if k not in ("model.sig", ".gitattributes")}


def test_minilm_round_trip_with_reference_signer(minilm: Path, keypair, file_store: str, tmp_path: Path):
    key, pub = keypair
    packed = run_cli("pack", minilm, "--json")
    assert packed.returncode == 0, packed.stderr
    doc = json.loads(packed.stdout)
    shard = next(f for f in doc["files"] if f["path"] == "model.safetensors")
    assert shard["safetensors"]["tensors"] == 104
    assert shard["safetensors"]["parameters"] == 22_713_728
    assert {f["path"] for f in doc["files"]} >= {"1_Pooling/config.json", "vocab.txt", "tokenizer.json"}
    assert ".gitattributes" not in {f["path"] for f in doc["files"]}

    signed = run_cli("sign", minilm, "--key", key)
    assert signed.returncode == 0, signed.stderr
    assert_reference_verifies_key(minilm, pub)
    assert run_cli("verify", minilm, "--key", pub).returncode == 0

    pub_run = run_cli("publish", minilm, "minilm:1.0", "--tag", "prod", "--key", key, "--store", file_store, "--json")
    assert pub_run.returncode == 0, pub_run.stderr
    summary = json.loads(pub_run.stdout)
    assert summary["signed"] == "key" and summary["bytes_skipped"] == 0
    assert summary["bytes_uploaded"] == sum(f["size"] for f in doc["files"])

    dest = tmp_path / "pulled"
    pulled = run_cli("pull", "minilm:prod", dest, "--key", pub, "--store", file_store, "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["digest"] == summary["digest"]
    assert manifest_files(dest) == manifest_files(minilm)
    # The pulled directory carries its signature: both verifiers accept it as it is.
    assert run_cli("verify", dest, "--key", pub).returncode == 0
    assert_reference_verifies_key(dest, pub)


@pytest.fixture
def elliptic_fixture(oms_fixtures: Path, tmp_path: Path) -> Path:
    """A writable copy of the folder model_signing signed with its key (tests/oms_fixtures.py)."""
    dest = tmp_path / "v1.1.0-elliptic-key"
    shutil.copytree(oms_fixtures / "v1.1.0-elliptic-key", dest)
    for p in dest.iterdir():
        p.chmod(0o644)
    dest.chmod(0o755)
    return dest


@pytest.fixture
def fixture_pub(oms_fixtures: Path) -> Path:
    return oms_fixtures / "keys" / "signing-key-pub.pem"


def test_reference_signature_verifies(elliptic_fixture: Path, fixture_pub: Path):
    proc = run_cli("verify", elliptic_fixture, "--key", fixture_pub, "--ignore", "ignore-me", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verified"] is True and doc["files"] == 2
    assert doc["signer"]["fingerprint"] == key_fingerprint(fixture_pub)


@pytest.mark.parametrize("change", ["byte", "rename", "add", "remove"])
def test_reference_signature_rejects_changes(elliptic_fixture: Path, fixture_pub: Path, change: str):
    d = elliptic_fixture
    if change == "byte":
        data = bytearray((d / "signme-1").read_bytes())
        data[0] ^= 1
        (d / "signme-1").write_bytes(bytes(data))
        named = "signme-1"
    elif change == "rename":
        (d / "signme-2").rename(d / "signme-3")
        named = "signme-2"
    elif change == "add":
        (d / "extra.bin").write_bytes(b"not signed")
        named = "extra.bin"
    else:
        (d / "signme-1").unlink()
        named = "signme-1"
    proc = run_cli("verify", d, "--key", fixture_pub, "--ignore", "ignore-me")
    assert proc.returncode == 1
    assert named in error_line(proc)


def test_verify_with_another_key_names_both(elliptic_fixture: Path, fixture_pub: Path, keypair):
    _, pub = keypair
    proc = run_cli("verify", elliptic_fixture, "--key", pub)
    assert proc.returncode == 1
    line = error_line(proc)
    assert key_fingerprint(fixture_pub)[:16] in line and "not by a trusted key" in line


def make_sharded_model(root: Path, shards: int = 8, mib: int = 1) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    n = mib * 1024 * 1024 // 4
    for i in range(shards):
        save_file({f"w{i}": rng.standard_normal(n, dtype=np.float32)}, str(root / f"shard-{i}.safetensors"))
    (root / "config.json").write_text('{"layers": 8}')
    return root


def blob_count(store_url: str) -> int:
    return len(list((Path(store_url[len("file://") :]) / "blobs" / "sha256").glob("[0-9a-f]*")))


def test_delta_publish_moves_one_shard(tmp_path: Path, file_store: str):
    model = make_sharded_model(tmp_path / "m")
    first = run_cli("publish", model, "m:1", "--store", file_store, "--json")
    assert first.returncode == 0, first.stderr
    assert "unsigned" in first.stderr  # published without a key: said out loud
    assert blob_count(file_store) == 9

    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w3": np.ones(1024 * 1024 // 4, dtype=np.float32)}, str(model / "shard-3.safetensors"))
    shard_size = (model / "shard-3.safetensors").stat().st_size
    second = run_cli("publish", model, "m:2", "--store", file_store, "--json")
    assert second.returncode == 0, second.stderr
    s = json.loads(second.stdout)
    assert s["bytes_uploaded"] == shard_size
    assert s["blobs_uploaded"] == 1 and s["blobs_skipped"] == 8
    assert blob_count(file_store) == 10


def assert_refused(proc, store_root: Path, before: dict, *words: str) -> None:
    assert proc.returncode != 0
    line = error_line(proc)
    for w in words:
        assert w in line, line
    assert tree_digest(store_root) == before


def test_refused_inputs_leave_store_unchanged(tmp_path: Path, small_model: Path, keypair, file_store: str):
    store_root = Path(file_store[len("file://") :])
    assert run_cli("publish", small_model, "demo:1.0", "--tag", "prod", "--store", file_store).returncode == 0
    before = tree_digest(store_root)

    # An existing version is never overwritten: other bytes are refused (a retry of the
    # very same publish succeeds, writing nothing; tests/test_lifecycle.py).
    changed = tmp_path / "changed"
    shutil.copytree(small_model, changed)
    (changed / "config.json").write_text('{"changed": true}')
    assert_refused(run_cli("publish", changed, "demo:1.0", "--store", file_store), store_root, before, "1.0")
    # A tag may not take the name of a version, by publish or by tag.
    assert_refused(
        run_cli("publish", small_model, "demo:2.0", "--tag", "1.0", "--store", file_store), store_root, before, "1.0"
    )
    assert_refused(run_cli("tag", "demo:prod", "1.0", "--store", file_store), store_root, before, "shadow")
    # A version may not take the name of a tag either.
    assert_refused(run_cli("publish", small_model, "demo:prod", "--store", file_store), store_root, before, "prod")

    # Absolute symlink out of the model.
    bad = tmp_path / "bad-abs"
    shutil.copytree(small_model, bad)
    (bad / "passwd").symlink_to("/etc/passwd")
    assert_refused(run_cli("publish", bad, "demo:3", "--store", file_store), store_root, before, "passwd")
    # Relative symlink climbing out with '..'.
    bad2 = tmp_path / "bad-rel"
    shutil.copytree(small_model, bad2)
    (bad2 / "escape").symlink_to("../../../etc/passwd")
    assert_refused(run_cli("publish", bad2, "demo:3", "--store", file_store), store_root, before, "escape")
    # A '..' ignore path.
    assert_refused(
        run_cli("publish", small_model, "demo:3", "--ignore", "../x", "--store", file_store), store_root, before, ".."
    )
    # A truncated safetensors shard, named.
    bad3 = tmp_path / "bad-trunc"
    shutil.copytree(small_model, bad3)
    shard = next(bad3.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(run_cli("publish", bad3, "demo:3", "--store", file_store), store_root, before, shard.name)
    # Not even a header.
    shard.write_bytes(b"\x01\x02")
    assert_refused(run_cli("pack", bad3), store_root, before, shard.name)
    # A symlink inside the model is fine: it is packed as the file it points to.
    ok = tmp_path / "ok-link"
    shutil.copytree(small_model, ok)
    (ok / "config-link.json").symlink_to("config.json")
    proc = run_cli("pack", ok, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "config-link.json" in {f["path"] for f in json.loads(proc.stdout)["files"]}


def test_tampered_manifest_path_is_refused(tmp_path: Path, small_model: Path, file_store: str):
    """A store is untrusted input: a manifest naming ../../etc/passwd never reaches the disk."""
    assert run_cli("publish", small_model, "demo:1", "--store", file_store).returncode == 0
    mpath = Path(file_store[7:]) / "releases" / "demo" / "1" / "manifest.json"
    doc = json.loads(mpath.read_bytes())
    doc["files"][0]["path"] = "../../etc/passwd"
    mpath.chmod(0o644)
    mpath.write_text(json.dumps(doc))
    dest = tmp_path / "out"
    proc = run_cli("pull", "demo:1", dest, "--store", file_store)
    assert proc.returncode == 1
    assert "../../etc/passwd" in error_line(proc)
    assert not dest.exists()


def test_corrupt_blob_fails_pull_and_leaves_nothing(tmp_path: Path, small_model: Path, file_store: str):
    assert run_cli("publish", small_model, "demo:1", "--store", file_store).returncode == 0
    blob = max((Path(file_store[7:]) / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    shown = json.loads(run_cli("show", "demo:1", "--store", file_store, "--json").stdout)
    named = next(f["path"] for f in shown["files"] if f["sha256"] == blob.name)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out"
    proc = run_cli("pull", "demo:1", dest, "--store", file_store)
    assert proc.returncode == 1
    assert "corrupt" in error_line(proc) and named in error_line(proc)
    assert not dest.exists()


@pytest.mark.parametrize("sync", [False, True], ids=["page-cache", "sync"])
def test_resumed_pull_hashes_the_blobs_it_had_finished(tmp_path: Path, small_model: Path, file_store: str, sync):
    """Without --sync a crash may tear what a pull had written: a resumed pull trusts
    none of it unhashed. A finished blob gone bad is fetched again; a good one is kept."""
    assert run_cli("publish", small_model, "demo:1", "--store", file_store).returncode == 0
    blobs = sorted((Path(file_store[7:]) / "blobs" / "sha256").iterdir(), key=lambda p: -p.stat().st_size)
    dest = tmp_path / "out"
    staged = tmp_path / ".out.weightship-partial" / "blobs"
    staged.mkdir(parents=True)
    torn = bytearray(blobs[0].read_bytes())
    torn[len(torn) // 3 :] = bytes(len(torn) - len(torn) // 3)  # zeros where writeback never happened
    (staged / blobs[0].name).write_bytes(bytes(torn))
    shutil.copyfile(blobs[1], staged / blobs[1].name)
    args = ["pull", "demo:1", dest, "--store", file_store, "--json"] + (["--sync"] if sync else [])
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    total = sum(b.stat().st_size for b in blobs)
    assert out["bytes_fetched"] == total - blobs[1].stat().st_size  # the good one was kept
    assert tree_digest(dest) == tree_digest(small_model)
    assert not staged.parent.exists()


def test_policy_refuses_unsigned_and_foreign_signatures(tmp_path: Path, small_model: Path, keypair, file_store: str):
    key, pub = keypair
    assert run_cli("publish", small_model, "demo:unsigned", "--store", file_store).returncode == 0
    dest = tmp_path / "out"
    proc = run_cli("pull", "demo:unsigned", dest, "--key", pub, "--store", file_store)
    assert proc.returncode == 1 and "unsigned" in error_line(proc)
    assert not dest.exists()

    from weightship.trust.signers import generate_key

    other_pub = generate_key(tmp_path / "other.pem")
    assert run_cli("publish", small_model, "demo:signed", "--key", key, "--store", file_store).returncode == 0
    proc = run_cli("pull", "demo:signed", dest, "--key", other_pub, "--store", file_store)
    assert proc.returncode == 1
    line = error_line(proc)
    from weightship.trust.signers import key_fingerprint, load_public_key

    assert key_fingerprint(load_public_key(pub))[:16] in line
    assert key_fingerprint(load_public_key(other_pub))[:16] in line
    assert not dest.exists()
    # With the right key, and with a policy from weightship.toml in the working directory.
    (tmp_path / "weightship.toml").write_text(f'[store]\nurl = "{file_store}"\n[policy]\nkeys = ["{pub}"]\n')
    proc = run_cli("pull", "demo:signed", dest, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_refs_ls_show_tag(small_model: Path, keypair, file_store: str):
    key, pub = keypair
    out = run_cli("publish", small_model, "demo:1.0", "--key", key, "--tag", "prod", "--store", file_store, "--json")
    digest = json.loads(out.stdout)["digest"]
    (small_model / "config.json").write_text("{}")
    assert run_cli("publish", small_model, "demo:1.1", "--key", key, "--store", file_store).returncode == 0

    ls = run_cli("ls", "--store", file_store, "--json")
    assert json.loads(ls.stdout) == {"demo": {"versions": ["1.0", "1.1"], "tags": {"prod": "1.0"}}}
    shown = json.loads(run_cli("show", f"demo@{digest}", "--store", file_store, "--json").stdout)
    assert shown["version"] == "1.0" and shown["tags"] == ["prod"]
    verified = json.loads(run_cli("show", "demo:prod", "--key", pub, "--store", file_store, "--json").stdout)
    assert verified["signer"]["verified"] is True and verified["signer"]["method"] == "key"

    moved = run_cli("tag", "demo:1.1", "prod", "--store", file_store)
    assert moved.returncode == 0, moved.stderr
    shown = json.loads(run_cli("show", "demo:prod", "--store", file_store, "--json").stdout)
    assert shown["version"] == "1.1"
    missing = run_cli("show", "demo:nope", "--store", file_store)
    assert missing.returncode == 1 and "nope" in error_line(missing)
    bad = run_cli("show", "demo", "--store", file_store)
    assert bad.returncode == 2 and "NAME:VERSION" in error_line(bad)


INTERRUPTIBLE = textwrap.dedent(
    """
    import sys, time
    from weightship import release
    from weightship.store.file import FileStore

    release.UPLOAD_WORKERS = 1
    original = FileStore.put_blob

    def slow_put(self, *args, **kwargs):
        n = original(self, *args, **kwargs)
        print("stored", flush=True)
        time.sleep(30)  # the test kills the process here, between two blob uploads
        return n

    FileStore.put_blob = slow_put
    from weightship.cli.app import main
    sys.argv = ["weightship", *sys.argv[1:]]
    main()
    """
)


def test_interrupted_publish_resumes(tmp_path: Path, file_store: str):
    model = make_sharded_model(tmp_path / "m", shards=4)
    script = tmp_path / "interruptible.py"
    script.write_text(INTERRUPTIBLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), "publish", str(model), "m:1", "--tag", "prod", "--store", file_store],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "stored"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    root = Path(file_store[7:])
    assert blob_count(file_store) == 1  # the second upload never returned
    assert not (root / "releases").exists() and not (root / "tags").exists()

    again = run_cli("publish", model, "m:1", "--tag", "prod", "--store", file_store, "--json")
    assert again.returncode == 0, again.stderr
    s = json.loads(again.stdout)
    assert s["blobs_skipped"] == 1 and s["blobs_uploaded"] == 4
    assert json.loads(run_cli("ls", "m", "--store", file_store, "--json").stdout)["m"]["tags"] == {"prod": "1"}


def test_demo_runs_green(tmp_path: Path):
    start = time.monotonic()
    proc = run_cli("demo", "--dir", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    assert "published demo:" in proc.stdout and "verified" in proc.stdout


def test_cli_basics():
    from weightship import __version__

    assert run_cli("--version").stdout.strip() == f"weightship {__version__}"
    helped = run_cli("--help")
    assert helped.returncode == 0 and "publish" in helped.stdout
    usage = run_cli("publish")
    assert usage.returncode == 2


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["publish"], 2), (["pull", "nope:1", "d"], 1)])
def test_cli_exit_runs_exit_handlers_and_flushes(tmp_path: Path, args: list[str], code: int):
    """The CLI leaves without interpreter teardown: exit handlers must still run, every
    byte of output must still arrive, and the exit code must survive."""
    script = (
        "import atexit, sys; import weightship.cli.app as cli\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "print('x' * 200000, end='')\n"
        "sys.argv[0] = 'weightship'; cli.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    env["WEIGHTSHIP_STORE"] = f"file://{tmp_path / 'store'}"
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == code, run.stderr
    assert run.stdout.startswith("x" * 200000)
    assert run.stderr.rstrip().endswith("handler ran")
