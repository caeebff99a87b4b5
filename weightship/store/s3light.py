"""S3 without botocore, where the environment alone configures it.

Importing botocore and building its S3 client costs 0.25 s of CPU on every command
that opens an ``s3://`` store (measured: 0.16 s to import, 0.09 s to load the service
model), a sixth of a one-shard republish. A CI job or a node typically configures S3 in
its environment and nowhere else: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and
``AWS_SESSION_TOKEN``), ``AWS_ENDPOINT_URL[_S3]`` for an S3-compatible server, perhaps
``AWS_DEFAULT_REGION``. When that is all there is, every request goes over s3wire and
botocore is never loaded.

Anything more (a profile, a config file with settings beyond the region, no endpoint
given, so AWS's own endpoint rules apply, a proxy, FIPS or dual-stack endpoints) and
:func:`settings` answers None: botocore resolves it, as it always has. The two must
agree wherever both apply; tests compare them.

:class:`Client` offers the few botocore S3 client methods the store calls, with the
same arguments and the same shape of answers and errors, so the store has one code
path whichever client it holds.
"""

from __future__ import annotations

import configparser
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from weightship.store.s3wire import Wire, client_error
from weightship.store.sigv4 import Credentials, Signer

DEFAULT_REGION = "us-east-1"  # what botocore signs with for a custom endpoint and no region
# Keys of the default profile that cannot change how S3 is reached.
_HARMLESS_KEYS = {"region", "output", "cli_pager", "cli_timestamp_format", "cli_history"}
# Settings that change endpoints or signing in ways only botocore's rules know.
_BOTOCORE_ONLY = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_S3_USE_ARN_REGION",
    "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT",
)


@dataclass(frozen=True)
class Settings:
    endpoint: str
    region: str
    credentials: Credentials
    ca_bundle: str | None
    max_attempts: int | None


def settings(profile: str | None = None) -> Settings | None:
    """S3 settings taken from the environment alone, or None when botocore is needed
    to resolve them."""
    env = os.environ
    if profile or any(env.get(name) for name in _BOTOCORE_ONLY):
        return None
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not access or not secret or not endpoint:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        return None
    default = _default_profile()
    if default is None or set(default) - _HARMLESS_KEYS:
        return None
    from weightship.sources import uses_proxy

    if uses_proxy(endpoint):
        return None  # only botocore's connections know how to use a proxy
    attempts = env.get("AWS_MAX_ATTEMPTS")
    return Settings(
        endpoint=f"{parts.scheme}://{parts.netloc}",
        region=env.get("AWS_DEFAULT_REGION") or default.get("region") or DEFAULT_REGION,
        credentials=Credentials(access, secret, env.get("AWS_SESSION_TOKEN") or None),
        ca_bundle=env.get("AWS_CA_BUNDLE") or None,
        max_attempts=int(attempts) if attempts and attempts.strip().isdigit() else None,
    )


def _default_profile() -> dict[str, str] | None:
    """The config file's default profile ({} without a file); None if it cannot be read."""
    path = Path(os.path.expanduser(env)) if (env := os.environ.get("AWS_CONFIG_FILE")) else None
    path = path or Path.home() / ".aws" / "config"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    return dict(parser["default"]) if parser.has_section("default") else {}


class Client:
    """The botocore S3 client methods the store calls, for one bucket, path-style."""

    def __init__(self, s: Settings, bucket: str, attempts: int) -> None:
        self.bucket = bucket
        self.wire = Wire(
            s.endpoint, f"/{bucket}/", Signer(lambda: s.credentials, s.region), attempts=attempts, ca_bundle=s.ca_bundle
        )
        self.meta = SimpleNamespace(endpoint_url=s.endpoint)

    # -- requests ---------------------------------------------------------------------------

    def _call(
        self, operation: str, method: str, key: str = "", query: dict[str, Any] | None = None, **kw: Any
    ) -> bytes:
        conn, resp = self.wire.request(method, key, query=query, operation=operation, **kw)
        try:
            data = resp.read() if method != "HEAD" else b""
        finally:
            self.wire.done(conn, resp)
        return data

    def _doc(self, operation: str, method: str, key: str = "", query: dict[str, Any] | None = None, **kw: Any) -> Any:
        """A request whose answer is an XML document; an ``<Error>`` document, which S3
        may send with status 200 (CompleteMultipartUpload), is raised as such."""
        data = self._call(operation, method, key, query, **kw)
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            raise client_error("MalformedResponse", "not an XML document", 200, operation) from None
        _strip_namespaces(root)
        if root.tag == "Error":
            raise client_error(root.findtext("Code") or "InternalError", root.findtext("Message") or "", 200, operation)
        return root

    def _check(self, bucket: str) -> None:
        if bucket != self.bucket:
            raise ValueError(f"this client serves bucket {self.bucket!r}, not {bucket!r}")

    # -- the methods the store calls ------------------------------------------------------------

    def head_bucket(self, *, Bucket: str) -> dict[str, Any]:
        self._check(Bucket)
        self._call("HeadBucket", "HEAD")
        return {}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._check(Bucket)
        self._call("HeadObject", "HEAD", Key)
        return {}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._check(Bucket)
        self._call("DeleteObject", "DELETE", Key, ok=(200, 204))
        return {}

    def list_objects_v2(
        self, *, Bucket: str, Prefix: str = "", MaxKeys: int | None = None, ContinuationToken: str | None = None
    ) -> dict[str, Any]:
        self._check(Bucket)
        query: dict[str, Any] = {"list-type": 2, "prefix": Prefix}
        if MaxKeys:
            query["max-keys"] = MaxKeys
        if ContinuationToken:
            query["continuation-token"] = ContinuationToken
        root = self._doc("ListObjectsV2", "GET", query=query)
        page: dict[str, Any] = {
            "Contents": [
                {"Key": c.findtext("Key") or "", "Size": int(c.findtext("Size") or 0)} for c in root.iter("Contents")
            ],
            "IsTruncated": root.findtext("IsTruncated") == "true",
        }
        if token := root.findtext("NextContinuationToken"):
            page["NextContinuationToken"] = token
        return page

    def list_multipart_uploads(
        self,
        *,
        Bucket: str,
        Prefix: str = "",
        KeyMarker: str | None = None,
        UploadIdMarker: str | None = None,
        MaxUploads: int | None = None,
    ) -> dict[str, Any]:
        self._check(Bucket)
        query: dict[str, Any] = {"uploads": "", "prefix": Prefix}
        if MaxUploads:
            query["max-uploads"] = MaxUploads
        if KeyMarker:
            query["key-marker"] = KeyMarker
        if UploadIdMarker:
            query["upload-id-marker"] = UploadIdMarker
        root = self._doc("ListMultipartUploads", "GET", query=query)
        uploads = []
        for up in root.iter("Upload"):
            entry = {"Key": up.findtext("Key") or "", "UploadId": up.findtext("UploadId") or ""}
            # ISO 8601 times in one format: they compare as strings.
            if initiated := up.findtext("Initiated"):
                entry["Initiated"] = initiated
            if algorithm := up.findtext("ChecksumAlgorithm"):
                entry["ChecksumAlgorithm"] = algorithm
            uploads.append(entry)
        page: dict[str, Any] = {"Uploads": uploads, "IsTruncated": root.findtext("IsTruncated") == "true"}
        for name in ("NextKeyMarker", "NextUploadIdMarker"):
            if value := root.findtext(name):
                page[name] = value
        return page

    def list_parts(
        self,
        *,
        Bucket: str,
        Key: str,
        UploadId: str,
        PartNumberMarker: int | None = None,
        MaxParts: int | None = None,
    ) -> dict[str, Any]:
        self._check(Bucket)
        query: dict[str, Any] = {"uploadId": UploadId}
        if MaxParts:
            query["max-parts"] = MaxParts
        if PartNumberMarker:
            query["part-number-marker"] = PartNumberMarker
        root = self._doc("ListParts", "GET", Key, query)
        parts = []
        for p in root.iter("Part"):
            entry: dict[str, Any] = {
                "PartNumber": int(p.findtext("PartNumber") or 0),
                "ETag": p.findtext("ETag") or "",
                "Size": int(p.findtext("Size") or 0),
            }
            if crc := p.findtext("ChecksumCRC32"):
                entry["ChecksumCRC32"] = crc
            parts.append(entry)
        page: dict[str, Any] = {"Parts": parts, "IsTruncated": root.findtext("IsTruncated") == "true"}
        if marker := root.findtext("NextPartNumberMarker"):
            page["NextPartNumberMarker"] = int(marker)
        return page

    def create_multipart_upload(self, *, Bucket: str, Key: str, ChecksumAlgorithm: str | None = None) -> dict[str, Any]:
        self._check(Bucket)
        headers = {"x-amz-checksum-algorithm": ChecksumAlgorithm} if ChecksumAlgorithm else {}
        root = self._doc("CreateMultipartUpload", "POST", Key, {"uploads": ""}, headers=headers)
        upload = root.findtext("UploadId")
        if not upload:
            raise client_error("MalformedResponse", "no UploadId in the answer", 200, "CreateMultipartUpload")
        return {"UploadId": upload}

    def abort_multipart_upload(self, *, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]:
        self._check(Bucket)
        self._call("AbortMultipartUpload", "DELETE", Key, {"uploadId": UploadId}, ok=(200, 204))
        return {}

    def complete_multipart_upload(
        self, *, Bucket: str, Key: str, UploadId: str, MultipartUpload: dict[str, Any]
    ) -> dict[str, Any]:
        self._check(Bucket)
        fields = ("PartNumber", "ETag", "ChecksumCRC32")
        body = "".join(
            "<Part>" + "".join(f"<{f}>{escape(str(p[f]))}</{f}>" for f in fields if f in p) + "</Part>"
            for p in MultipartUpload["Parts"]
        )
        doc = (
            f'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{body}</CompleteMultipartUpload>'
        )
        self._doc(
            "CompleteMultipartUpload",
            "POST",
            Key,
            {"uploadId": UploadId},
            body=doc.encode(),
            headers={"Content-Type": "application/xml"},
            sign_body=True,
        )
        return {}

    def generate_presigned_url(self, operation: str, *, Params: dict[str, str], ExpiresIn: int = 3600) -> str:
        if operation != "get_object":
            raise ValueError(f"cannot presign {operation}")
        self._check(Params["Bucket"])
        return self.wire.presign(Params["Key"], ExpiresIn)

    def get_paginator(self, operation: str) -> _Paginator:
        return _Paginator(self, operation)

    def close(self) -> None:
        self.wire.close()


# operation -> the argument that sets its page size
_PAGE_SIZE = {"list_objects_v2": "MaxKeys", "list_multipart_uploads": "MaxUploads", "list_parts": "MaxParts"}
# operation -> (the answer's "more" marker names -> the next request's argument names)
_MARKERS: dict[str, dict[str, str]] = {
    "list_objects_v2": {"NextContinuationToken": "ContinuationToken"},
    "list_multipart_uploads": {"NextKeyMarker": "KeyMarker", "NextUploadIdMarker": "UploadIdMarker"},
    "list_parts": {"NextPartNumberMarker": "PartNumberMarker"},
}


class _Paginator:
    """botocore's paginators for the three listings the store pages through."""

    def __init__(self, client: Client, operation: str) -> None:
        if operation not in _MARKERS:
            raise ValueError(f"no paginator for {operation}")
        self._call = getattr(client, operation)
        self._markers = _MARKERS[operation]
        self._page_size = _PAGE_SIZE[operation]

    def paginate(self, *, PaginationConfig: dict[str, Any] | None = None, **kw: Any) -> Iterator[dict[str, Any]]:
        size = (PaginationConfig or {}).get("PageSize")
        if size:
            kw[self._page_size] = size
        while True:
            page = self._call(**kw)
            yield page
            nxt = {arg: page[name] for name, arg in self._markers.items() if name in page}
            if not page.get("IsTruncated") or not nxt or all(kw.get(k) == v for k, v in nxt.items()):
                return  # the last page (or a server repeating itself: stop rather than loop)
            kw.update(nxt)


def _strip_namespaces(root: ET.Element) -> None:
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]
