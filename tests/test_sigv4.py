"""weightship's SigV4 signer against AWS's published example and botocore's signer
(the servers' side is covered by every S3 test: SeaweedFS checks each signature)."""

from __future__ import annotations

import calendar
import datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from weightship.store.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, Credentials, Signer, quote_path

EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
MAY_24_2013 = calendar.timegm((2013, 5, 24, 0, 0, 0))
NOW = calendar.timegm((2026, 11, 25, 12, 34, 56))


def test_aws_documented_example_get_object():
    """AWS's "GET Object" example for S3 signature version 4 (range request, empty
    payload), whose signature AWS publishes."""
    signer = Signer(lambda: EXAMPLE, "us-east-1")
    headers = signer.sign_headers(
        "GET", "examplebucket.s3.amazonaws.com", "/test.txt", None, {"Range": "bytes=0-9"}, EMPTY_SHA256, MAY_24_2013
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["X-Amz-Date"] == "20130524T000000Z"


@pytest.fixture
def frozen_botocore(monkeypatch):
    import botocore.auth

    moment = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc).replace(tzinfo=None)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: moment)
    return botocore.auth


@pytest.mark.parametrize("token", [None, "session/token+with=odd&bytes"])
@pytest.mark.parametrize(
    ("method", "key", "query", "headers"),
    [
        (
            "PUT",
            "weights/blobs/sha256/ab/abcdef",
            {"partNumber": 3, "uploadId": "u/p+l=d"},
            {"x-amz-checksum-crc32": "AAAAAA=="},
        ),
        ("GET", "weights/a key with spaces/ü~*'()!", None, {"Range": "bytes=0-99"}),
        ("GET", "", {"list-type": 2, "prefix": "weights/releases/", "continuation-token": "a b/c"}, {}),
        ("POST", "weights/x", {"uploads": ""}, {"x-amz-checksum-algorithm": "CRC32"}),
    ],
)
def test_header_signatures_match_botocore(frozen_botocore, method, key, query, headers, token):
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials as BotoCredentials

    from weightship.store.sigv4 import canonical_query

    creds = Credentials("AKIDEXAMPLE", "secret/with+chars", token)
    host = "127.0.0.1:8333"
    path = "/bucket/" + quote_path(key)
    url = f"http://{host}{path}" + (f"?{canonical_query(query)}" if query else "")
    ours = Signer(lambda: creds, "eu-west-3").sign_headers(method, host, path, query, headers, UNSIGNED_PAYLOAD, NOW)

    request = AWSRequest(method=method, url=url, headers=dict(headers))
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    frozen_botocore.S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", "secret/with+chars", token), "s3", "eu-west-3").add_auth(
        request
    )
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Content-SHA256"] == request.headers["X-Amz-Content-SHA256"] == UNSIGNED_PAYLOAD
    assert ours.get("X-Amz-Security-Token") == request.headers.get("X-Amz-Security-Token")


@pytest.mark.parametrize("token", [None, "tok/en+="])
def test_presigned_urls_match_botocore(frozen_botocore, token):
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    creds = Credentials("AKIDEXAMPLE", "s3cr3t", token)
    path = "/bucket/" + quote_path("weights/blobs/sha256/ab/ab cd")
    ours = urlsplit(Signer(lambda: creds, "us-east-1").presign("GET", "https", "s3.example.com", path, 900, NOW))

    request = AWSRequest(method="GET", url=f"https://s3.example.com{path}")
    frozen_botocore.S3SigV4QueryAuth(BotoCredentials("AKIDEXAMPLE", "s3cr3t", token), "s3", "us-east-1", 900).add_auth(
        request
    )
    theirs = urlsplit(request.url)
    assert (ours.scheme, ours.netloc, ours.path) == (theirs.scheme, theirs.netloc, theirs.path)
    assert parse_qs(ours.query) == parse_qs(theirs.query)
    assert "X-Amz-Signature" in parse_qs(ours.query)


def test_no_credentials_is_botocores_error():
    from botocore.exceptions import NoCredentialsError

    with pytest.raises(NoCredentialsError):
        Signer(lambda: None, "us-east-1").sign_headers("GET", "h", "/", None, {})
