"""The S3 store against a real SeaweedFS (``weed mini``), started by the ``s3_server``
fixture. Byte counts come from a counting TCP proxy in front of the server, so they are
what went over the wire, not what the client says it sent."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest

from tests.helpers import error_line, run_cli, tree_digest
from weightship.errors import ConflictError, IntegrityError, NotFoundError, StoreError
from weightship.store import blob_key, open_store
from weightship.store.s3 import MIN_PART_SIZE, S3Store

MiB = 1024 * 1024
PART = MIN_PART_SIZE  # the smallest part S3 allows, so that modest files have many parts
# Per-request overhead on the wire (headers, signatures, XML): generous but far below a part.
REQUEST_SLACK = 64 * 1024


def make_file(path: Path, size: int, seed: int = 0) -> tuple[str, int]:
    """A file of pseudo-random bytes (incompressible, reproducible); returns (sha256, size)."""
    import numpy as np

    data = np.random.default_rng(seed).bytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), size


def split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix


def proxied_store(s3_server, url: str, monkeypatch, **kw) -> tuple[S3Store, object]:
    """A store whose every request goes through a fresh counting proxy."""
    proxy = s3_server.proxy()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    bucket, prefix = split(url)
    return S3Store(bucket, prefix, **kw), proxy


def unfinished_uploads(s3_server, bucket: str) -> list[dict]:
    return s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def parts_of(s3_server, bucket: str, key: str) -> list[dict]:
    client = s3_server.client()
    for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        if up["Key"] == key:
            return client.list_parts(Bucket=bucket, Key=key, UploadId=up["UploadId"]).get("Parts", [])
    return []


def settled_parts(s3_server, bucket: str, key: str) -> list[dict]:
    """The parts of an interrupted upload once the server has finished with the bytes
    that were already on their way when the client died."""
    last = None
    while True:
        parts = [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts_of(s3_server, bucket, key)]
        if parts == last:
            return parts_of(s3_server, bucket, key)
        last = parts
        time.sleep(0.5)


def interrupt_when(proc: subprocess.Popen, s3_server, bucket: str, key: str, nparts: int, proxy) -> None:
    """SIGKILL ``proc`` once ``nparts`` parts of ``key`` are on the server, then cut its
    connections as a dead client's would be."""
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            if len(parts_of(s3_server, bucket, key)) >= nparts:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the upload ended before it could be interrupted: {proc.stderr.read()!r}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proxy.close()


# -- objects -----------------------------------------------------------------------------


@pytest.mark.parametrize("light", [True, False], ids=["light", "botocore"])
def test_objects_round_trip_and_paginated_list(s3_store_url, s3_server, monkeypatch, light):
    monkeypatch.setattr(S3Store, "light", light)
    store = open_store(s3_store_url)
    assert isinstance(store, S3Store)
    assert ("botocore" in type(store._client).__module__) != light
    assert store.url == s3_store_url
    assert not store.exists("releases/m/1/manifest.json")
    with pytest.raises(NotFoundError, match="not found"):
        store.read("releases/m/1/manifest.json")
    keys = [f"releases/m/{v}/manifest.json" for v in ("1", "2", "10", "3", "4")]
    for i, k in enumerate(keys):
        store.write(k, f"doc {i}".encode())
    store.write("tags/m/prod", b"2")
    store.list_page_size = 2  # five keys: three listing requests, all followed
    assert store.list("releases/") == sorted(keys)
    assert store.list("releases/m/1/") == ["releases/m/1/manifest.json"]
    assert store.list("tags/") == ["tags/m/prod"]
    assert store.list("nothing/") == []
    assert store.read("releases/m/10/manifest.json") == b"doc 2"
    store.write("tags/m/prod", b"3")  # tags move: a plain write replaces
    assert store.read("tags/m/prod") == b"3"
    store.delete("tags/m/prod")
    store.delete("tags/m/prod")  # idempotent, as on a file system
    assert not store.exists("tags/m/prod")
    # The prefix really is a prefix: the objects live under it in the bucket.
    bucket, prefix = split(s3_store_url)
    listed = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.startswith(prefix + "/") for k in listed)
    store.close()


def test_exclusive_write_never_overwrites(s3_store_url):
    store = open_store(s3_store_url)
    store.write("releases/m/1/manifest.json", b"first", exclusive=True)
    with pytest.raises(ConflictError, match="already exists"):
        store.write("releases/m/1/manifest.json", b"second", exclusive=True)
    assert store.read("releases/m/1/manifest.json") == b"first"
    # SeaweedFS honours If-None-Match: the conditional write is what protects a race.
    assert store._conditional is True

    # A race: many writers, one key; exactly one wins and its bytes are what is stored.
    results: dict[int, str] = {}

    def writer(i: int) -> None:
        try:
            store.write("releases/m/2/manifest.json", f"writer {i}".encode(), exclusive=True)
            results[i] = "won"
        except ConflictError:
            results[i] = "conflict"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    assert store.read("releases/m/2/manifest.json") == f"writer {winners[0]}".encode()
    store.close()


# -- blobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["light", "s3wire", "botocore"])
def test_blobs_round_trip_single_and_multipart(s3_store_url, tmp_path, monkeypatch, s3_server, mode):
    # Every request over s3wire when the environment configures S3 (light); blob bytes
    # over s3wire and the rest through botocore when botocore resolves the settings;
    # everything through botocore when a proxy is configured.
    monkeypatch.setattr(S3Store, "light", mode == "light")
    monkeypatch.setattr(S3Store, "use_wire", mode != "botocore")
    store, proxy = proxied_store(s3_server, s3_store_url, monkeypatch, part_size=PART, concurrency=4)
    store._ready()
    assert (store._wire is not None) == (mode != "botocore")
    assert ("botocore" in type(store._client).__module__) == (mode != "light")
    cases = {
        "empty": make_file(tmp_path / "empty", 0),
        "small": make_file(tmp_path / "small", 1000, seed=1),
        "multipart": make_file(tmp_path / "multipart", 4 * PART + 12345, seed=2),
    }
    for name, (hexdigest, size) in cases.items():
        seen: list[int] = []
        proxy.reset()
        assert store.put_blob(hexdigest, tmp_path / name, size, seen.append) == size
        assert sum(seen) == size
        assert size <= proxy.up <= size + 8 * REQUEST_SLACK
        assert store.has_blob(hexdigest)
        # Already there: one HEAD, nothing uploaded.
        proxy.reset()
        assert store.put_blob(hexdigest, tmp_path / name, size) == 0
        assert proxy.up < REQUEST_SLACK
        dest = tmp_path / f"{name}.out"
        seen.clear()
        proxy.reset()
        assert store.get_blob(hexdigest, dest, size, seen.append) == size
        assert sum(seen) == size
        assert size <= proxy.down <= size + 8 * REQUEST_SLACK
        assert dest.read_bytes() == (tmp_path / name).read_bytes()
    # Every part of the multipart blob carried a CRC32 the server checked and kept:
    # the object's checksum is the composite of the five part checksums.
    bucket, prefix = split(s3_store_url)
    head = s3_server.client().head_object(
        Bucket=bucket, Key=f"{prefix}/{blob_key(cases['multipart'][0])}", ChecksumMode="ENABLED"
    )
    assert head.get("ChecksumCRC32", "").endswith("-5"), head
    assert store._part_checksum == "crc32"
    assert unfinished_uploads(s3_server, bucket) == []
    store.close()


def test_server_rejects_a_part_whose_checksum_does_not_match(s3_store_url, s3_server):
    """What the per-part checksums buy: SeaweedFS verifies them (else they would be decoration)."""
    import base64

    from botocore.exceptions import ClientError

    bucket, _ = split(s3_store_url)
    client = s3_server.client()
    key = "probe/part"
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
    try:
        wrong = base64.b64encode(zlib.crc32(b"other bytes").to_bytes(4, "big")).decode()
        with pytest.raises(ClientError) as e:
            client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1000, ChecksumCRC32=wrong
            )
        assert e.value.response["Error"]["Code"] == "BadDigest"
    finally:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)


def test_wire_parts_carry_checksums_the_server_verifies(s3_store_url, s3_server):
    """The same through s3wire, the path every part takes: a wrong checksum is refused."""
    import base64

    from botocore.exceptions import ClientError

    bucket, prefix = split(s3_store_url)
    store = S3Store(bucket, prefix)
    store._ready()
    assert store._wire is not None
    key = f"{prefix}/probe/wire-part"
    upload = store._create_upload(key)
    try:
        wrong = base64.b64encode(zlib.crc32(b"other bytes").to_bytes(4, "big")).decode()
        with pytest.raises(ClientError) as e:
            store._send_body(key, memoryview(b"x" * 1000), {"ChecksumCRC32": wrong}, (upload, 1))
        assert e.value.response["Error"]["Code"] == "BadDigest"
        assert store._part_checksums(b"x" * 1000) == {
            "ChecksumCRC32": base64.b64encode(zlib.crc32(b"x" * 1000).to_bytes(4, "big")).decode()
        }
        assert store._send_body(key, memoryview(b"x" * 1000), store._part_checksums(b"x" * 1000), (upload, 1))
    finally:
        store._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        store.close()


def test_a_proxy_sends_blob_bytes_through_botocore(s3_store_url, monkeypatch):
    """s3wire speaks to the endpoint directly; where the environment names a proxy for
    it, botocore (which honours HTTP(S)_PROXY and NO_PROXY) carries the bytes."""
    bucket, prefix = split(s3_store_url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    store = S3Store(bucket, prefix)
    assert store._open_wire() is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert store._open_wire() is not None
    store.close()


def test_changed_file_is_never_published(s3_store_url, tmp_path, s3_server):
    """A file that no longer hashes to its name: the multipart upload is aborted and
    nothing appears under the blob's key."""
    store = S3Store(*split(s3_store_url), part_size=PART, concurrency=2)
    hexdigest, size = make_file(tmp_path / "f", 3 * PART, seed=3)
    (tmp_path / "f").write_bytes(b"\0" + (tmp_path / "f").read_bytes()[1:])  # changed after packing
    with pytest.raises(IntegrityError, match="changed while publishing"):
        store.put_blob(hexdigest, tmp_path / "f", size)
    assert not store.has_blob(hexdigest)
    assert unfinished_uploads(s3_server, split(s3_store_url)[0]) == []
    # Same for a small (single PUT) blob, which is checked before anything is sent.
    small, n = make_file(tmp_path / "s", 100, seed=4)
    (tmp_path / "s").write_bytes(b"y" * 100)
    with pytest.raises(IntegrityError):
        store.put_blob(small, tmp_path / "s", n)
    assert not store.has_blob(small)
    store.close()


def test_parts_sent_with_the_crc32s_read_while_hashing(s3_store_url, tmp_path, s3_server, monkeypatch):
    """Given the chunk CRC32s publish reads in the same pass as the sha256, the upload
    does not hash the file again; the server verifies every part against them, so a
    file that changed after it was hashed is refused and nothing becomes visible."""
    import hashlib as real_hashlib

    from weightship import hashing
    from weightship.store import s3 as s3_module

    fed: list[int] = []

    class Sha256:
        def __init__(self, *args):
            self._h = real_hashlib.sha256(*args)

        def update(self, data):
            fed.append(len(data))
            self._h.update(data)

        def __getattr__(self, name):
            return getattr(self._h, name)

    class Hashlib:
        sha256 = Sha256

        def __getattr__(self, name):
            return getattr(real_hashlib, name)

    monkeypatch.setattr(s3_module, "hashlib", Hashlib())
    store = S3Store(*split(s3_store_url), part_size=PART, concurrency=2)
    make_file(tmp_path / "f", 3 * PART + 77, seed=9)
    d = hashing.digest_file(tmp_path / "f", crc32=True)
    assert store.put_blob(d.sha256, tmp_path / "f", d.size, chunk_crc32=d.chunk_crc32) == d.size
    assert sum(fed) == 0  # not a byte hashed again
    out = tmp_path / "out"
    store.get_blob(d.sha256, out, d.size)
    assert out.read_bytes() == (tmp_path / "f").read_bytes()
    # Without them (a digest from the digest cache), every byte is hashed as it is sent.
    make_file(tmp_path / "h", 2 * PART + 1, seed=11)
    dh = hashing.digest_file(tmp_path / "h")
    fed.clear()
    assert store.put_blob(dh.sha256, tmp_path / "h", dh.size) == dh.size
    assert sum(fed) == dh.size

    # Changed after hashing, same size: the server refuses the part that differs.
    make_file(tmp_path / "g", 3 * PART, seed=10)
    d2 = hashing.digest_file(tmp_path / "g", crc32=True)
    data = bytearray((tmp_path / "g").read_bytes())
    data[2 * PART + 5] ^= 0xFF
    (tmp_path / "g").write_bytes(data)
    with pytest.raises(IntegrityError, match="changed while publishing"):
        store.put_blob(d2.sha256, tmp_path / "g", d2.size, chunk_crc32=d2.chunk_crc32)
    assert not store.has_blob(d2.sha256)
    assert unfinished_uploads(s3_server, split(s3_store_url)[0]) == []
    store.close()


UPLOADER = """
import sys
from pathlib import Path
from weightship.store.s3 import S3Store
url, hexdigest, src, size = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
bucket, _, prefix = url[5:].partition("/")
S3Store(bucket, prefix, part_size=int(sys.argv[5]), concurrency=1).put_blob(hexdigest, src, size)
"""


def test_interrupted_multipart_upload_resumes_without_resending_parts(s3_store_url, tmp_path, monkeypatch, s3_server):
    bucket, prefix = split(s3_store_url)
    hexdigest, size = make_file(tmp_path / "big", 8 * PART, seed=5)
    key = f"{prefix}/{blob_key(hexdigest)}"

    # A publisher on a slow link (the throttling proxy), killed after a few parts.
    slow = s3_server.proxy()
    slow.throttle_up = 20 * MiB
    env = {**os.environ, "AWS_ENDPOINT_URL": slow.endpoint}
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, s3_store_url, hexdigest, str(tmp_path / "big"), str(size), str(PART)],
        env=env,
        stderr=subprocess.PIPE,
    )
    interrupt_when(proc, s3_server, bucket, key, 3, slow)
    done = sum(p["Size"] for p in settled_parts(s3_server, bucket, key))
    assert 3 * PART <= done < size
    assert not S3Store(bucket, prefix).has_blob(hexdigest)  # nothing visible yet

    store, proxy = proxied_store(s3_server, s3_store_url, monkeypatch, part_size=PART, concurrency=4)
    seen: list[int] = []
    sent = store.put_blob(hexdigest, tmp_path / "big", size, seen.append)
    assert sent == size - done  # the completed parts were not sent again...
    assert size - done <= proxy.up <= size - done + 16 * REQUEST_SLACK  # ...as the wire confirms
    assert sum(seen) == size  # progress still accounts for the whole file
    assert unfinished_uploads(s3_server, bucket) == []
    out = tmp_path / "out"
    store.get_blob(hexdigest, out, size)
    assert out.read_bytes() == (tmp_path / "big").read_bytes()
    store.close()


def test_interrupted_download_resumes_from_the_bytes_on_disk(s3_store_url, tmp_path, monkeypatch, s3_server):
    hexdigest, size = make_file(tmp_path / "big", 5 * PART + 777, seed=6)
    S3Store(*split(s3_store_url)).put_blob(hexdigest, tmp_path / "big", size)
    data = (tmp_path / "big").read_bytes()
    store, proxy = proxied_store(s3_server, s3_store_url, monkeypatch, part_size=PART, concurrency=4)
    for have in (PART // 3, 4 * PART + 500):  # parallel ranges left, then one stream left
        dest = tmp_path / f"part-{have}"
        dest.write_bytes(data[:have])
        proxy.reset()
        assert store.get_blob(hexdigest, dest, size) == size - have
        assert size - have <= proxy.down <= size - have + 8 * REQUEST_SLACK
        assert dest.read_bytes() == data

    # Bytes on disk that are wrong (not the blob's prefix): discarded, fetched afresh.
    dest = tmp_path / "garbage"
    dest.write_bytes(b"\xff" * PART)
    assert store.get_blob(hexdigest, dest, size) == (size - PART) + size
    assert dest.read_bytes() == data
    store.close()


def test_connection_cut_mid_download_is_retried(s3_store_url, tmp_path, monkeypatch, s3_server):
    hexdigest, size = make_file(tmp_path / "big", 3 * PART, seed=7)
    S3Store(*split(s3_store_url)).put_blob(hexdigest, tmp_path / "big", size)
    for part_size in (PART, 4 * PART):  # ranged GETs in parallel, and one streaming GET
        store, proxy = proxied_store(s3_server, s3_store_url, monkeypatch, part_size=part_size, concurrency=2)
        store._ready()
        proxy.cut_down_after(PART // 2, times=3)  # three connections die half-way through a body
        dest = tmp_path / f"out-{part_size}"
        store.get_blob(hexdigest, dest, size)
        assert proxy.cuts_done == 3
        assert dest.read_bytes() == (tmp_path / "big").read_bytes()
        store.close()


def test_corrupt_blob_in_bucket_is_refused_and_dest_removed(s3_store_url, tmp_path, s3_server):
    bucket, prefix = split(s3_store_url)
    store = S3Store(bucket, prefix, part_size=PART)
    for name, size in (("small", 4096), ("large", 3 * PART)):
        hexdigest, _ = make_file(tmp_path / name, size, seed=8)
        store.put_blob(hexdigest, tmp_path / name, size)
        bad = bytearray((tmp_path / name).read_bytes())
        bad[size // 2] ^= 1  # one bit, same size
        s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{blob_key(hexdigest)}", Body=bytes(bad))
        dest = tmp_path / f"{name}.part"
        with pytest.raises(IntegrityError, match="corrupt") as e:
            store.get_blob(hexdigest, dest, size)
        assert "\n" not in str(e.value)
        assert not dest.exists()
        # A truncated object is refused too.
        s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{blob_key(hexdigest)}", Body=bytes(bad[:-10]))
        with pytest.raises(IntegrityError):
            store.get_blob(hexdigest, dest, size)
        assert not dest.exists()
    with pytest.raises(NotFoundError, match="missing"):
        store.get_blob("0" * 64, tmp_path / "nope", 10)
    store.close()


def test_presigned_urls_need_no_credentials(s3_store_url, tmp_path, monkeypatch):
    store = open_store(s3_store_url)
    hexdigest, size = make_file(tmp_path / "f", 123_456, seed=9)
    store.put_blob(hexdigest, tmp_path / "f", size)
    url = store.blob_url(hexdigest, expires=300)
    store.close()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    r = httpx.get(url)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == hexdigest
    assert httpx.get(url.replace(hexdigest, "0" * 64)).status_code == 403  # signed for one key only
    assert httpx.get(url.split("?")[0]).status_code == 403  # and useless without the signature


def test_a_node_fetches_presigned_urls_resuming_and_following_redirects(s3_store_url, tmp_path, monkeypatch):
    """What a node does with the URLs a warm hands it (weightship.sources.UrlSource): no
    credentials, a redirect followed, a partial file resumed with a Range request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from weightship.sources import UrlSource

    store = open_store(s3_store_url)
    hexdigest, size = make_file(tmp_path / "f", 3 * 1024 * 1024 + 5, seed=10)
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
    data = (tmp_path / "f").read_bytes()
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


MEMORY_PROBE = """
import sys
from pathlib import Path
from weightship.store.s3 import S3Store

def peak_kb():  # VmHWM: this process's own peak (ru_maxrss would include its parent's, from before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

url, hexdigest, src, size, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
bucket, _, prefix = url[5:].partition("/")
store = S3Store(bucket, prefix, part_size=5 * 2**20, concurrency=4)
store._ready()
base = peak_kb()
store.put_blob(hexdigest, src, size)
store.get_blob(hexdigest, dest, size)
print(base, peak_kb())
"""


def test_memory_stays_bounded_whatever_the_blob_size(s3_store_url, tmp_path):
    """Uploading and downloading a blob much larger than the part buffers grows the
    process by about the buffers (6 x 5 MiB here), not by the blob."""
    hexdigest, size = make_file(tmp_path / "big", 96 * MiB, seed=11)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            s3_store_url,
            hexdigest,
            str(tmp_path / "big"),
            str(size),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    base_kb, peak_kb = map(int, proc.stdout.split())
    assert (peak_kb - base_kb) * 1024 < 56 * MiB, (base_kb, peak_kb)
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == hexdigest


# -- errors a user can hit: one clear line each ------------------------------------------


def test_wrong_secret_key_is_one_clear_line(s3_store_url, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_store_url)
    with pytest.raises(StoreError) as e:
        store.exists("tags/m/prod")
    msg = str(e.value)
    assert "rejected the credentials" in msg and "SignatureDoesNotMatch" in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and "\n" not in msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        open_store(s3_store_url).list("releases/")

    proc = run_cli("ls", "--store", s3_store_url, cwd=tmp_path)
    assert proc.returncode == 1
    assert "rejected the credentials" in error_line(proc)


def test_missing_bucket_is_one_clear_line(s3_store_url, tmp_path):
    url = "s3://no-such-bucket-here/weights"
    with pytest.raises(StoreError) as e:
        open_store(url).has_blob("0" * 64)
    assert "bucket 'no-such-bucket-here' does not exist" in str(e.value)
    assert "\n" not in str(e.value)
    proc = run_cli("pull", "m:1", tmp_path / "dest", "--store", url, cwd=tmp_path)
    assert proc.returncode == 1
    assert "does not exist" in error_line(proc)
    assert not (tmp_path / "dest").exists()


def test_unreachable_endpoint_is_one_clear_line(s3_store_url, monkeypatch):
    from tests.servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StoreError, match="cannot reach S3") as e:
        open_store(s3_store_url).exists("x")
    assert "\n" not in str(e.value)


def test_bad_settings_are_refused(monkeypatch):
    from weightship.errors import ConfigError, UsageError

    monkeypatch.setenv("WEIGHTSHIP_S3_PART_SIZE", "1MiB")
    with pytest.raises(ConfigError, match="5 MiB"):
        S3Store.from_url("s3://bkt/p")
    monkeypatch.setenv("WEIGHTSHIP_S3_PART_SIZE", "lots")
    with pytest.raises(ConfigError, match="not a size"):
        S3Store.from_url("s3://bkt/p")
    monkeypatch.setenv("WEIGHTSHIP_S3_PART_SIZE", "32MiB")
    monkeypatch.setenv("WEIGHTSHIP_S3_CONCURRENCY", "3")
    s = S3Store.from_url("s3://bkt/p/")
    assert (s.part_size, s.concurrency, s.prefix, s.url) == (32 * MiB, 3, "p", "s3://bkt/p")
    for bad in ("s3://", "s3://bkt/../x", "s3://bkt?x=1"):
        with pytest.raises(UsageError):
            S3Store.from_url(bad)


# -- the command line, end to end ----------------------------------------------------------


def test_publish_and_pull_minilm_through_s3(s3_store_url, minilm, keypair, tmp_path):
    key, pub = keypair
    proc = run_cli("publish", minilm, "minilm:1", "--tag", "prod", "--key", key, "--store", s3_store_url, "--json")
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "pulled"
    proc = run_cli("pull", "minilm:prod", dest, "--key", pub, "--store", s3_store_url)
    assert proc.returncode == 0, proc.stderr
    from weightship.pack import DEFAULT_IGNORES

    got = tree_digest(dest)
    assert got.pop("model.sig", None) is not None
    want = {p: d for p, d in tree_digest(minilm).items() if p.split("/")[0] not in DEFAULT_IGNORES}
    assert got == want


def test_republish_uploads_only_the_changed_shard(s3_store_url, keypair, tmp_path, s3_server):
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
    assert len(data) <= proxy.up <= len(data) + 32 * REQUEST_SLACK
    assert proxy.up < full / 3


def test_killed_publish_resumes_without_resending_parts(s3_store_url, keypair, tmp_path, s3_server):
    """The acceptance test, through the CLI: kill ``weightship publish`` mid-upload of a
    multi-part blob; the re-run completes and sends no completed part again."""
    key, _ = keypair
    model = tmp_path / "model"
    model.mkdir()
    hexdigest, size = make_file(model / "weights.bin", 8 * PART, seed=10)
    (model / "config.json").write_text("{}")
    bucket, prefix = split(s3_store_url)
    blob = f"{prefix}/{blob_key(hexdigest)}"
    slow = s3_server.proxy()
    slow.throttle_up = 20 * MiB
    env = {**os.environ, "AWS_ENDPOINT_URL": slow.endpoint}
    env.update({"WEIGHTSHIP_S3_PART_SIZE": str(PART), "WEIGHTSHIP_S3_CONCURRENCY": "1"})
    argv = [sys.executable, "-m", "weightship", "publish", str(model), "m:1", "--key", str(key)]
    proc = subprocess.Popen([*argv, "--store", s3_store_url], env=env, stderr=subprocess.PIPE, cwd=tmp_path)
    interrupt_when(proc, s3_server, bucket, blob, 3, slow)
    done = sum(p["Size"] for p in settled_parts(s3_server, bucket, blob))
    assert done >= 3 * PART

    proxy = s3_server.proxy()
    env2 = {"AWS_ENDPOINT_URL": proxy.endpoint, "WEIGHTSHIP_S3_PART_SIZE": str(PART)}
    proc2 = run_cli("publish", model, "m:1", "--key", key, "--store", s3_store_url, "--json", env=env2, cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    assert size - done <= proxy.up <= size - done + 32 * REQUEST_SLACK
    assert unfinished_uploads(s3_server, bucket) == []


def test_corrupt_blob_fails_pull_naming_nothing_into_dest(s3_store_url, keypair, tmp_path, s3_server):
    from weightship.demo import build_model

    key, pub = keypair
    model = build_model(tmp_path / "model")
    assert run_cli("publish", model, "m:1", "--key", key, "--store", s3_store_url).returncode == 0
    shard = model / "model-00002-of-00002.safetensors"
    hexdigest = hashlib.sha256(shard.read_bytes()).hexdigest()
    bucket, prefix = split(s3_store_url)
    bad = bytearray(shard.read_bytes())
    bad[len(bad) // 2] ^= 1
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{blob_key(hexdigest)}", Body=bytes(bad))
    dest = tmp_path / "dest"
    proc = run_cli("pull", "m:1", dest, "--key", pub, "--store", s3_store_url)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "corrupt" in line or "sha256" in line
    assert not dest.exists() or not any(dest.iterdir())
