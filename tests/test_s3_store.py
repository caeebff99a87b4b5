"""What only the s3:// store does, against a real SeaweedFS (``weed mini``): the AWS
credential chain (environment, or boto3's profiles behind obstore), the errors a user
meets when it finds nothing or cannot reach the endpoint, the CLI end to end with a real
model, bounded memory, and a CLI that loads neither obstore nor boto3 when it needs no
object store. What every store does is in tests/test_store_conformance.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli, tree_digest
from tests.servers import free_port
from weightship.errors import StoreError, UsageError
from weightship.store import open_store

MiB = 1024 * 1024
REQUEST_SLACK = 64 * 1024


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """A file of incompressible, reproducible bytes, written 8 MiB at a time; its sha256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(8 * MiB, left))
            h.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def no_aws_env(monkeypatch, home: Path) -> None:
    """Nothing of the AWS chain left but what the test sets: no AWS_* variable, an empty
    home (no ~/.aws), and no instance metadata service to ask."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    # On a CI machine in a cloud, the instance role would be "credentials somewhere".
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def published_tree(model: Path) -> dict[str, str]:
    from weightship.artifact.pack import DEFAULT_IGNORES

    return {p: d for p, d in tree_digest(model).items() if p.split("/")[0] not in DEFAULT_IGNORES}


# -- the credential chain --------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint_from",
    ["AWS_ENDPOINT_URL_S3", "profile"],
)
def test_a_profile_through_boto3s_chain_publishes_and_pulls(
    s3_server, small_model, keypair, tmp_path, monkeypatch, endpoint_from
) -> None:
    """No AWS_ACCESS_KEY_ID in the environment: the keys are in a profile of a shared
    credentials file, found by boto3 (AWS_PROFILE) and handed to obstore; the endpoint
    from AWS_ENDPOINT_URL_S3, or from the profile's own endpoint_url."""
    bucket = s3_server.create_bucket()
    raw = s3_server.client()  # made now: boto3's default session would read the profile set below
    no_aws_env(monkeypatch, tmp_path / "home")
    creds, config = tmp_path / "aws" / "credentials", tmp_path / "aws" / "config"
    creds.parent.mkdir()
    creds.write_text(
        "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[bench]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    profile = f"[profile bench]\nregion = {s3_server.region}\n"
    if endpoint_from == "profile":
        profile += f"endpoint_url = {s3_server.endpoint}\n"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    config.write_text(profile)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "bench")
    assert "AWS_ACCESS_KEY_ID" not in os.environ

    url = f"s3://{bucket}/weights"
    key, pub = keypair
    proc = run_cli("publish", small_model, "m:1", "--tag", "prod", "--key", key, "--store", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes_uploaded"] > 0
    dest = tmp_path / "pulled"
    proc = run_cli("pull", "m:prod", dest, "--key", pub, "--store", url)
    assert proc.returncode == 0, proc.stderr
    got = tree_digest(dest)
    assert got.pop("model.sig", None) is not None
    assert got == published_tree(small_model)
    # The objects really are in that bucket, under the prefix (read around weightship).
    listed = raw.list_objects_v2(Bucket=bucket)["Contents"]
    assert listed and all(o["Key"].startswith("weights/") for o in listed)

    # The profile's keys, not the default profile's: without AWS_PROFILE the wrong ones are used
    # (and with the endpoint in the profile, the default profile has none: AWS itself, not here).
    monkeypatch.delenv("AWS_PROFILE")
    proc = run_cli("ls", "--store", url)
    line = error_line(proc)
    reached_aws = endpoint_from == "profile" and "cannot reach S3" in line
    assert proc.returncode == 1 and ("rejected the credentials" in line or reached_aws), line


def test_no_credentials_anywhere_is_exit_2_naming_what_to_set(tmp_path, monkeypatch) -> None:
    no_aws_env(monkeypatch, tmp_path / "home")
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    t = time.monotonic()
    proc = run_cli("ls", "--store", "s3://some-bucket/weights", cwd=tmp_path)
    took = time.monotonic() - t
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "no AWS credentials" in line
    assert "AWS_ACCESS_KEY_ID" in line and "AWS_SECRET_ACCESS_KEY" in line and "AWS_PROFILE" in line
    assert took < 20
    # An access key without its secret is not credentials either.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "half")
    proc = run_cli("pull", "m:1", tmp_path / "dest", "--store", "s3://some-bucket/weights", cwd=tmp_path)
    assert proc.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in error_line(proc)
    assert not (tmp_path / "dest").exists()


def test_a_wrong_access_key_id_is_one_clear_line(s3_store_url, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError) as e:
        open_store(s3_store_url).list("releases/")
    msg = str(e.value)
    assert "rejected the credentials" in msg and "InvalidAccessKeyId" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert "\n" not in msg


def test_an_unreachable_endpoint_is_one_clear_line_in_seconds(s3_store_url, monkeypatch, tmp_path) -> None:
    """Nothing listens at the endpoint: obstore's retries (RETRY) give up within seconds."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach S3") as e:
        open_store(s3_store_url).exists("tags/m/prod")
    took = time.monotonic() - t
    assert "\n" not in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    t = time.monotonic()
    proc = run_cli("ls", "--store", s3_store_url, cwd=tmp_path)
    took_cli = time.monotonic() - t
    print(f"\nunreachable endpoint: exists() failed after {took:.1f}s, `weightship ls` after {took_cli:.1f}s")
    assert proc.returncode == 1 and "cannot reach S3" in error_line(proc)
    assert took < 20 and took_cli < 20


def test_malformed_urls_are_usage_errors() -> None:
    from weightship.store.object import split_url

    assert split_url("s3://bkt/p/q/") == ("s3", "bkt", "p/q")
    assert split_url("s3://bkt") == ("s3", "bkt", "")
    for bad in ("s3://", "s3://bkt/../x", "s3://bkt?x=1", "s3://bkt/p#f"):
        with pytest.raises(UsageError):
            open_store(bad)
    proc = run_cli("ls", "--store", "s3://bkt/../x")
    assert proc.returncode == 2 and "unsafe prefix" in error_line(proc)


# -- the command line, end to end --------------------------------------------------------------


def test_publish_and_pull_minilm_through_s3(s3_store_url, minilm, keypair, tmp_path) -> None:
    key, pub = keypair
    proc = run_cli("publish", minilm, "minilm:1", "--tag", "prod", "--key", key, "--store", s3_store_url, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bytes_uploaded"] == doc["total_bytes"] > 80 * MiB
    dest = tmp_path / "pulled"
    proc = run_cli("pull", "minilm:prod", dest, "--key", pub, "--store", s3_store_url)
    assert proc.returncode == 0, proc.stderr
    got = tree_digest(dest)
    assert got.pop("model.sig", None) is not None
    assert got == published_tree(minilm)
    assert "1_Pooling/config.json" in got


def test_republish_uploads_only_the_changed_shard(s3_store_url, keypair, tmp_path, s3_server) -> None:
    from weightship.demo import build_model

    key, _ = keypair
    model = build_model(tmp_path / "model", shards=4, hidden=512)
    proxy = s3_server.proxy()
    env = {"AWS_ENDPOINT_URL": proxy.endpoint}
    assert run_cli("publish", model, "m:1", "--key", key, "--store", s3_store_url, env=env).returncode == 0
    full = proxy.up
    shard = model / "model-00003-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(data)
    proxy.reset()
    proc = run_cli("publish", model, "m:2", "--key", key, "--store", s3_store_url, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    print(f"\nrepublish: {proxy.up} B up for a {len(data)} B shard (first publish: {full} B)")
    assert doc["blobs_uploaded"] == 1 and doc["bytes_uploaded"] == len(data)
    assert len(data) <= proxy.up <= len(data) + 32 * REQUEST_SLACK
    assert proxy.up < full / 3


# A parent as small as can be: a child's ru_maxrss starts at its parent's RSS when it
# was forked, so the test process itself must not be the parent.
PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "weightship", *sys.argv[1:]], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss(*args: str | os.PathLike) -> int:
    """Run ``weightship ARGS`` in a child; its peak resident set, in bytes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    rc, kb = out.stdout.split()
    assert rc == "0", out.stderr
    return int(kb) * 1024


def test_memory_stays_bounded_whatever_the_blob_size(s3_store_url, tmp_path) -> None:
    """Publishing and pulling one 512 MiB blob: the process grows by its part buffers
    (a few 8 MiB parts in flight), not by the blob."""
    model = tmp_path / "model"
    model.mkdir()
    hexdigest = make_file(model / "weights.bin", 512 * MiB, seed=11)
    (model / "config.json").write_text("{}")
    up = peak_rss("-q", "publish", model, "big:1", "--store", s3_store_url)
    down = peak_rss("-q", "pull", "big:1", tmp_path / "out", "--store", s3_store_url)
    print(f"\n512 MiB blob: peak RSS publishing {up / MiB:.0f} MiB, pulling {down / MiB:.0f} MiB")
    assert up < 300 * 10**6, up
    assert down < 300 * 10**6, down
    h = hashlib.sha256()
    with open(tmp_path / "out" / "weights.bin", "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    assert h.hexdigest() == hexdigest


def test_presigned_urls_resume_and_follow_redirects_without_credentials(s3_store_url, tmp_path, monkeypatch) -> None:
    """What a node does with the URLs a warm hands it (weightship.sources.UrlSource): no
    credentials, a redirect followed, a partial file resumed with a Range request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from weightship.node.fetch import UrlSource

    store = open_store(s3_store_url)
    data = random.Random(10).randbytes(3 * MiB + 5)
    (tmp_path / "f").write_bytes(data)
    hexdigest, size = hashlib.sha256(data).hexdigest(), len(data)
    store.put_blob(hexdigest, tmp_path / "f", size)
    url = store.blob_url(hexdigest, expires=300)
    store.close()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", url)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    hop = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=hop.serve_forever, daemon=True).start()
    try:
        for have, where in ((0, url), (1234567, url), (777, f"http://127.0.0.1:{hop.server_port}/blob")):
            dest = tmp_path / f"got-{have}"
            dest.write_bytes(data[:have])
            seen: list[int] = []
            src = UrlSource({hexdigest: where})
            assert src.fetch(hexdigest, dest, size, seen.append) == size - have
            assert sum(seen) == size - have and dest.read_bytes() == data
            src.close()
        with pytest.raises(StoreError, match="403"):
            UrlSource({hexdigest: url.split("?")[0]}).fetch(hexdigest, tmp_path / "unsigned", size, seen.append)
    finally:
        hop.shutdown()
        hop.server_close()


# -- commands that need no object store load none of its libraries ----------------------------


def _imported(*args: str | os.PathLike, cwd: Path) -> set[str]:
    """Top-level modules ``python -X importtime -m weightship ARGS`` imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "weightship", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "weightship" in names  # the probe itself works
    return names


def test_help_pack_and_file_stores_import_neither_obstore_nor_boto3(small_model, tmp_path) -> None:
    store = f"file://{tmp_path / 'store'}"
    heavy = {"obstore", "boto3", "botocore", "s3transfer"}
    assert not heavy & _imported("--help", cwd=tmp_path)
    assert not heavy & _imported("pack", small_model, cwd=tmp_path)
    assert not heavy & _imported("-q", "publish", small_model, "m:1", "--store", store, cwd=tmp_path)
    assert not heavy & _imported("ls", "--store", store, cwd=tmp_path)
    # ...and the probe would see them: an s3:// store does load obstore.
    env_ok = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "weightship", "ls", "--store", "s3://b/p"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env_ok},
        timeout=60,
    )
    assert "obstore" in {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.count("|") == 2}
