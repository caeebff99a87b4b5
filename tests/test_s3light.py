"""S3 configured by the environment alone: no botocore, and the same answers as
botocore's resolution wherever the light path is taken (against SeaweedFS)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import zlib

import httpx
import pytest

from weightship.store import s3light
from weightship.store.s3 import S3Store
from weightship.store.s3wire import Wire


def botocore_view(bucket: str) -> tuple[str, str, tuple[str, str, str | None]]:
    """Endpoint, signing region and credentials as the botocore path resolves them."""
    store = S3Store.__new__(S3Store)
    store.bucket, store.prefix, store.url, store.concurrency = bucket, "", f"s3://{bucket}", 1
    store.light = False
    client = store._make_client(None, None)
    creds = store._session.get_credentials().get_frozen_credentials()
    wire = Wire.from_botocore(client, bucket, store._session.get_credentials(), attempts=1)
    return wire.endpoint, wire.signer.region, (creds.access_key, creds.secret_key, creds.token)


def light_view(bucket: str) -> tuple[str, str, tuple[str, str, str | None]]:
    s = s3light.settings()
    assert s is not None
    wire = s3light.Client(s, bucket, 1).wire
    c = s.credentials
    return wire.endpoint, wire.signer.region, (c.access_key, c.secret_key, c.token)


def configure(monkeypatch, tmp_path, env: dict[str, str | None], config: str | None) -> None:
    """Set (or, for None, remove) AWS_* variables, and point AWS_CONFIG_FILE at ``config``."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if config is not None:
        (tmp_path / "config").write_text(config)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))


@pytest.mark.parametrize(
    ("env", "config"),
    [
        ({}, None),
        ({"AWS_DEFAULT_REGION": None}, None),  # no region at all: what botocore signs with
        ({"AWS_DEFAULT_REGION": None}, "[default]\nregion = eu-central-1\noutput = json\n"),
        ({"AWS_DEFAULT_REGION": "ap-south-1"}, "[default]\nregion = eu-central-1\n"),
        ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1/", "AWS_SESSION_TOKEN": "tok"}, ""),
        ({}, "[profile other]\nendpoint_url = http://elsewhere.invalid\n"),
    ],
)
def test_light_settings_agree_with_botocore(s3_store_url, monkeypatch, tmp_path, env, config):
    configure(monkeypatch, tmp_path, env, config)
    bucket = s3_store_url[len("s3://") :].split("/")[0]
    assert light_view(bucket) == botocore_view(bucket)


@pytest.mark.parametrize(
    ("env", "config"),
    [
        ({"AWS_PROFILE": "dev"}, "[profile dev]\nregion = us-east-1\n"),
        ({"AWS_ENDPOINT_URL": None}, None),  # AWS itself: its endpoint rules are botocore's
        ({"AWS_SECRET_ACCESS_KEY": None}, None),  # credentials from elsewhere in the chain
        ({}, "[default]\nendpoint_url = http://127.0.0.1:1\n"),
        ({}, "[default]\ns3 =\n  addressing_style = virtual\n"),
        ({}, "[default\nbroken"),
        ({"AWS_USE_FIPS_ENDPOINT": "true"}, None),
        ({"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, None),
        ({"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "example.invalid"}, None),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333/some/path"}, None),
    ],
)
def test_botocore_resolves_what_the_environment_does_not_say(s3_store_url, monkeypatch, tmp_path, env, config):
    assert s3light.settings() is not None
    configure(monkeypatch, tmp_path, env, config)
    assert s3light.settings() is None


STORE_SESSION = textwrap.dedent(
    """
    import hashlib, json, sys, tempfile
    from pathlib import Path
    from weightship.store import open_store

    store = open_store(sys.argv[1])
    store.write("releases/m/1/manifest.json", b"{}", exclusive=True)
    data = bytes(range(256)) * 40000  # 10 MB: a multipart blob
    src = Path(tempfile.mkdtemp()) / "blob"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert store.put_blob(digest, src, len(data)) == len(data)
    assert store.get_blob(digest, src.with_name("back"), len(data)) == len(data)
    assert src.with_name("back").read_bytes() == data
    assert store.list("releases/") == ["releases/m/1/manifest.json"]
    assert store.blob_url(digest)
    store.close()
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(("botocore", "boto3", "urllib3")))))
    """
)


def test_an_environment_configured_store_never_loads_botocores_client(s3_store_url, monkeypatch, tmp_path):
    """The point of the light path: a command talking to S3 configured by AWS_* variables
    pays for neither botocore's import nor its client."""
    monkeypatch.setenv("WEIGHTSHIP_S3_PART_SIZE", "5MiB")
    run = subprocess.run(
        [sys.executable, "-c", STORE_SESSION, s3_store_url], capture_output=True, text=True, env=dict(os.environ)
    )
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout))
    assert not loaded & {"botocore.session", "botocore.client", "botocore.auth", "boto3", "urllib3"}, loaded
    # The same session where botocore must resolve the settings does load it (and works).
    (tmp_path / "config").write_text("[default]\ns3 =\n  addressing_style = path\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    run = subprocess.run(
        [sys.executable, "-c", STORE_SESSION, s3_store_url.replace("/weights", "/other")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr
    assert "botocore.client" in set(json.loads(run.stdout))


def test_light_listings_page_like_botocore(s3_store_url, s3_server):
    """The listings the store pages through (objects, unfinished uploads and their
    parts), a page at a time, give what boto3 lists against the same server."""
    bucket = s3_store_url[len("s3://") :].split("/")[0]
    settings = s3light.settings()
    assert settings is not None
    light = s3light.Client(settings, bucket, 1)
    boto = s3_server.client()
    keys = [f"weights/k{i}" for i in range(5)]
    for k in keys:
        boto.put_object(Bucket=bucket, Key=k, Body=k.encode())
    uploads = {}
    for k in ("weights/u0", "weights/u1", "weights/u2"):
        uploads[k] = light.create_multipart_upload(Bucket=bucket, Key=k, ChecksumAlgorithm="CRC32")["UploadId"]
    part = b"p" * (5 * 1024 * 1024)
    crc = base64.b64encode(zlib.crc32(part).to_bytes(4, "big")).decode()
    for n in (1, 2, 3):
        light.wire.put(
            "weights/u0", part, {"x-amz-checksum-crc32": crc}, {"partNumber": n, "uploadId": uploads["weights/u0"]}
        )
    try:

        def pages(operation: str, **kw) -> list[dict]:
            return list(light.get_paginator(operation).paginate(PaginationConfig={"PageSize": 1}, **kw))

        listed = pages("list_objects_v2", Bucket=bucket, Prefix="weights/k")
        assert len(listed) == 5
        assert [c["Key"] for p in listed for c in p["Contents"]] == keys
        assert sorted(
            u["UploadId"]
            for p in pages("list_multipart_uploads", Bucket=bucket, Prefix="weights/u")
            for u in p["Uploads"]
        ) == sorted(uploads.values())
        parts = [
            p
            for page in pages("list_parts", Bucket=bucket, Key="weights/u0", UploadId=uploads["weights/u0"])
            for p in page["Parts"]
        ]
        theirs = boto.list_parts(Bucket=bucket, Key="weights/u0", UploadId=uploads["weights/u0"])["Parts"]
        assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts] == [
            (p["PartNumber"], p["ETag"], p["Size"]) for p in theirs
        ]
        # Where the server lists part checksums, the same ones (SeaweedFS lists none).
        assert [p.get("ChecksumCRC32") for p in parts] == [p.get("ChecksumCRC32") for p in theirs]
        url = light.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": keys[0]}, ExpiresIn=60)
        assert httpx.get(url).content == keys[0].encode()
    finally:
        for k, up in uploads.items():
            light.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=up)
    assert boto.list_multipart_uploads(Bucket=bucket, Prefix="weights/u").get("Uploads", []) == []
