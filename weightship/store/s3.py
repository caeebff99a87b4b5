"""``s3://BUCKET[/PREFIX]`` store: the store layout in S3 or an S3-compatible server.

Credentials, region and endpoint come from the standard AWS chain (``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL[_S3]``, instance roles, ...); when an endpoint
is configured (MinIO, Ceph, R2, SeaweedFS) requests use path-style addressing.

Transfers, and why they look the way they do:

* Large blobs go up as multipart uploads. One reader per blob reads the file once,
  in order, handing each part's bytes to a shared pool of upload threads; each part
  carries its own checksum (``x-amz-checksum-crc32``, or ``Content-MD5`` on servers
  without additional checksums) which the server verifies. When publish read the
  file's chunk CRC32s in the same pass as the sha256 that names the blob, the parts
  carry the CRC32s of the bytes hashed and nothing is hashed again; otherwise the
  reader feeds the whole-file sha256 as it goes. Either way, bytes that are not the
  ones that hash to the blob's name abort the upload, so nothing becomes visible.
  Single-PUT blobs and small objects carry their sha256.
* An interrupted multipart upload is found again (``ListMultipartUploads``) and parts
  already on the server whose checksum matches the local bytes are not sent again.
* Downloads are written to the partial file in order, so the sha256 is computed as the
  bytes land and the partial file is always a prefix of the blob: an interrupted
  download resumes from its length. Each blob is one streaming GET while enough blobs
  are in flight to use the connections; a blob fetched (nearly) alone is split into
  parallel ranged GETs whose buffers are written in order.
* Part buffers come from one fixed set per store, reused, so memory stays bounded
  however many blobs and bytes are in flight.

This module is imported only when an s3:// store is opened, and botocore (boto3's core)
only when the environment does not configure S3 completely (see s3light), so neither
``weightship --help`` nor a CI job configured by AWS_* variables pays for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import math
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import botocore.exceptions as bexc

from weightship.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    NotFoundError,
    StoreError,
    UsageError,
    WeightshipError,
)
from weightship.hashing import part_crc32s
from weightship.manifest import check_relpath
from weightship.pagecache import write_all
from weightship.sources import uses_proxy
from weightship.store import s3light
from weightship.store.base import Progress, Store, blob_key
from weightship.store.s3wire import Wire, backoff

MiB = 1024 * 1024
# Chosen with `bench/transfer.py --sweep` (1 GiB, 8 shards, SeaweedFS on loopback):
# 8x8, 16x8 and 32x4 (MiB x parts in flight) published and pulled within noise of
# each other (publish 10.9/11.3/11.2 s, pull 5.4/5.5/5.6 s) and 16x4 was slower to
# publish (12.5 s); 8 MiB parts need half the memory of 16 and resume at a finer grain.
# Both are also what AWS advises (8-16 MiB parts, about 10 connections).
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_CONCURRENCY = 8
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
# Upper bound on part buffers held at once (uploads and downloads together): with the
# interpreter and botocore (about 70 MB) peak RSS stays well under 300 MB.
BUFFER_BUDGET = 128 * MiB
READ_CHUNK = 1 * MiB
WRITEBACK_CHUNK = 16 * MiB
STREAM_ATTEMPTS = 5
# botocore's own retries (5xx, throttling, connection errors), unless AWS_MAX_ATTEMPTS says.
MAX_ATTEMPTS = 5

CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "AuthFailure",
}
UNSUPPORTED_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest", "UnsupportedHeader"}
# The body checksum arguments of _body_checksum, as the headers s3wire sends.
_CHECKSUM_HEADERS = {
    "ChecksumSHA256": "x-amz-checksum-sha256",
    "ChecksumCRC32": "x-amz-checksum-crc32",
    "ContentMD5": "Content-MD5",
}
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$|(^|\.)api\.aws$")

# Errors that can break a response body mid-stream; botocore retries the request but
# not the reading of its body, so ranged reads retry these themselves.
_STREAM_ERRORS: tuple[type[BaseException], ...] = tuple(
    e
    for e in (
        getattr(bexc, "ResponseStreamingError", None),
        getattr(bexc, "IncompleteReadError", None),
        bexc.ReadTimeoutError,
        bexc.ConnectionClosedError,
        http.client.HTTPException,
        ConnectionError,
        TimeoutError,
    )
    if e is not None
)


def _catch_urllib3_errors() -> None:
    """botocore's bodies raise urllib3's own errors from ``read``: count them among the
    stream errors once botocore is in use (urllib3 is not imported otherwise)."""
    global _STREAM_ERRORS
    from urllib3.exceptions import HTTPError

    if HTTPError not in _STREAM_ERRORS:
        _STREAM_ERRORS = (*_STREAM_ERRORS, HTTPError)


def parse_size(text: str, what: str) -> int:
    """``16MiB``, ``16M``, ``8mb`` or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"{what}={text!r} is not a size", "use bytes or a size such as 16MiB")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}[m.group(2)]


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


class S3Store(Store):
    """A store in ``s3://bucket/prefix``; safe to share between threads."""

    list_page_size: int | None = None  # keys per listing request; None: the server's (1000)
    use_wire = True  # blob bytes over s3wire; False sends them through botocore too
    # Every request over s3wire, botocore never loaded, when the environment alone
    # configures S3 (see s3light); False: botocore resolves the configuration always.
    light = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        concurrency: int | None = None,
        part_size: int | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if concurrency is None:
            concurrency = _env_int("WEIGHTSHIP_S3_CONCURRENCY") or DEFAULT_CONCURRENCY
        if part_size is None:
            raw = os.environ.get("WEIGHTSHIP_S3_PART_SIZE")
            part_size = parse_size(raw, "WEIGHTSHIP_S3_PART_SIZE") if raw else DEFAULT_PART_SIZE
        if not 1 <= concurrency <= 256:
            raise ConfigError(f"S3 concurrency {concurrency} is out of range", "use 1 to 256")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ConfigError(
                f"S3 part size {part_size} is out of range",
                "S3 parts must be between 5 MiB and 5 GiB (WEIGHTSHIP_S3_PART_SIZE)",
            )
        self.concurrency = concurrency
        self.part_size = part_size
        self._client = self._make_client(endpoint_url, profile)
        self.endpoint = self._client.meta.endpoint_url
        # Buffer slots: enough to keep every transfer busy plus a reader's read-ahead,
        # but never more memory than the budget whatever the settings.
        self._buffers = _Buffers(max(2, min(concurrency + 2, BUFFER_BUDGET // part_size)), part_size)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._checked = False
        # Learnt from the server on first use: does it verify x-amz-checksum-sha256,
        # does it honour If-None-Match? (None: not known yet.)
        self._checksum = "sha256"
        # Multipart parts carry a CRC32 instead (Content-MD5 where the server has no
        # additional checksums): it guards the transfer as well, and the blob's sha256
        # is still checked over the same bytes on this side. Measured against SeaweedFS
        # for 1 GiB: a sha256 per part cost this side 0.77 CPU-s and the server, which
        # verifies it in software, about 0.8 CPU-s more; a CRC32 costs 0.33 and ~0.1.
        self._part_checksum = "crc32"
        self._conditional: bool | None = None
        self._downloading = 0  # get_blob calls in progress: how to share the connections
        self._wire: Wire | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, concurrency: int | None = None, part_size: int | None = None) -> S3Store:
        """``s3://BUCKET`` or ``s3://BUCKET/PREFIX``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise UsageError(f"bad S3 store URL {url!r}", "use s3://BUCKET or s3://BUCKET/PREFIX")
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
            raise UsageError(f"bad S3 bucket name {bucket!r} in {url!r}", "use s3://BUCKET/PREFIX")
        if prefix:
            try:
                check_relpath(prefix)
            except WeightshipError:
                raise UsageError(f"bad S3 prefix {prefix!r} in {url!r}", "use s3://BUCKET/PREFIX") from None
        return cls(bucket, prefix, concurrency=concurrency, part_size=part_size)

    def _make_client(self, endpoint_url: str | None, profile: str | None) -> Any:
        env = s3light.settings(profile) if self.light and self.use_wire and not endpoint_url else None
        if env is not None:
            self._session = None
            self._ca_bundle = env.ca_bundle
            self._attempts = env.max_attempts or MAX_ATTEMPTS
            return s3light.Client(env, self.bucket, self._attempts)
        import botocore.session
        from botocore.config import Config

        _catch_urllib3_errors()
        try:
            # botocore directly: boto3's resource layer is not used and costs start-up.
            bs = botocore.session.Session(profile=profile)
            # Honour a retry mode the user configured; otherwise "standard", which
            # retries 5xx, throttling and connection errors with jittered backoff.
            mode = bs.get_config_variable("retry_mode")
            mode = mode if mode in ("standard", "adaptive") else "standard"
            attempts = bs.get_config_variable("max_attempts") or MAX_ATTEMPTS
            s3cfg = dict((bs.get_scoped_config() or {}).get("s3") or {})
            self._ca_bundle = bs.get_config_variable("ca_bundle")
            self._attempts = int(attempts)
        except bexc.ProfileNotFound as e:
            raise ConfigError(
                f"AWS profile {e.kwargs.get('profile')!r} not found",
                "check AWS_PROFILE and ~/.aws/config",
            ) from None
        except bexc.BotoCoreError as e:
            raise ConfigError(f"cannot read the AWS configuration: {e}") from None

        def build(addressing: str | None) -> Any:
            s3opts: dict[str, Any] = {
                # Every body carries its own verified checksum (below), so SigV4 need not
                # hash it again: that would be a third sha256 pass over each part.
                "payload_signing_enabled": False,
            }
            if addressing:
                s3opts["addressing_style"] = addressing
            cfg = Config(
                signature_version="s3v4",
                s3=s3opts,
                retries={"mode": mode, "max_attempts": int(attempts)},
                max_pool_connections=self.concurrency + 8,
                connect_timeout=10,
                read_timeout=120,
                tcp_keepalive=True,
                # We send our own checksums; botocore would otherwise add a CRC32 pass.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            return bs.create_client("s3", endpoint_url=endpoint_url, config=cfg)

        try:
            client = build(s3cfg.get("addressing_style"))
            host = urlsplit(client.meta.endpoint_url).hostname or ""
            if not s3cfg.get("addressing_style") and not _AWS_HOST.search(host):
                # A custom endpoint: bucket-in-hostname rarely resolves there.
                client = build("path")
        except bexc.BotoCoreError as e:
            raise ConfigError(f"cannot set up S3 for {self.url}: {e}") from None
        self._session = bs
        return client

    def _open_wire(self) -> Wire | None:
        """The fast path for blob bytes (s3wire), unless requests must go through a
        proxy, which only botocore's connections know how to use."""
        if isinstance(self._client, s3light.Client):
            return self._client.wire
        if not self.use_wire or uses_proxy(self.endpoint):
            return None
        try:
            creds = self._session.get_credentials()
            return Wire.from_botocore(
                self._client, self.bucket, creds, attempts=self._attempts, ca_bundle=self._ca_bundle
            )
        except (ValueError, bexc.BotoCoreError):
            return None

    # -- helpers --------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_relpath(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        if key is None:
            return self.url
        return f"s3://{self.bucket}/{key}"

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="weightship-s3")
            return self._pool

    def _error(self, exc: BaseException, action: str, key: str | None = None) -> WeightshipError:
        """Turn a boto error into one line saying what is wrong and what to do."""
        where = self._where(key)
        if isinstance(exc, WeightshipError):
            return exc
        if isinstance(exc, bexc.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = " ".join(str(err.get("Message", "")).split())
            if code in CREDENTIAL_CODES:
                return StoreError(
                    f"S3 rejected the credentials for s3://{self.bucket} ({code})",
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
                )
            if code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} (NoSuchBucket)",
                    f"create it or fix the store URL {self.url}",
                )
            if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
                return StoreError(
                    f"bucket {self.bucket!r} is in another region than the one configured ({code})",
                    "set AWS_REGION (or the profile's region) to the bucket's region",
                )
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return StoreError(
                    f"S3 denied access to {where} while trying to {action} ({code or 403})",
                    f"check that the credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID) may use {self.url}"
                    " (without s3:ListBucket, S3 also answers 403 for a key that does not exist)",
                )
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return NotFoundError(f"{where} not found")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return ConflictError(f"{where} already exists")
            if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
                return IntegrityError(
                    f"S3 rejected the bytes sent for {where}: checksum mismatch ({code})",
                    "the data changed in transit or on disk; re-run",
                )
            if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout") or (
                status and status >= 500
            ):
                return StoreError(
                    f"S3 at {self.endpoint} kept failing to {action} {where} ({code or status}) after retries",
                    "the server is overloaded or down; try again later",
                )
            return StoreError(f"S3 refused to {action} {where}: {code or status} {message}".rstrip())
        if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return StoreError(
                f"no AWS credentials found for {self.url}",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectTimeoutError):
            return StoreError(
                f"cannot reach S3 at {self.endpoint}",
                "check AWS_ENDPOINT_URL / AWS_REGION and the network",
            )
        if isinstance(exc, _STREAM_ERRORS):
            return StoreError(
                f"the connection to S3 at {self.endpoint} kept failing while trying to {action} {where}",
                "check the network and re-run (transfers resume)",
            )
        if isinstance(exc, bexc.BotoCoreError):
            return StoreError(f"S3 failed to {action} {where}: {exc}")
        return StoreError(f"S3 failed to {action} {where}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _op(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except WeightshipError:
            raise
        except (bexc.BotoCoreError, bexc.ClientError, *_STREAM_ERRORS) as e:
            raise self._error(e, action, key) from None

    def _raise_forbidden(self, exc: bexc.ClientError, action: str, key: str | None) -> NoReturn:
        """A HEAD answers 403 with no body, so it cannot say whether the key is wrong or
        merely lacks permission; a cheap listing call gets the server to say which."""
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (bexc.BotoCoreError, bexc.ClientError) as probe:
            raise self._error(probe, action, key) from None
        raise self._error(exc, action, key) from None

    def _ready(self) -> None:
        """Check once that the bucket exists, so a typo in it is one clear line rather
        than every key looking absent."""
        if self._checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(e.response.get("Error", {}).get("Code", ""))
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} (NoSuchBucket)",
                    f"create it or fix the store URL {self.url}",
                ) from None
            if status == 403:
                # Either bad credentials or credentials allowed objects but not
                # HeadBucket; only the former is fatal.
                try:
                    self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
                except bexc.ClientError as probe:
                    pcode = probe.response.get("Error", {}).get("Code", "")
                    if pcode in CREDENTIAL_CODES or pcode == "NoSuchBucket":
                        raise self._error(probe, "open", None) from None
                except bexc.BotoCoreError as probe:
                    raise self._error(probe, "open", None) from None
            else:
                raise self._error(e, "open", None) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "open", None) from None
        self._wire = self._open_wire()
        self._checked = True

    # -- small objects ---------------------------------------------------------------------

    def read(self, key: str) -> bytes:
        self._ready()
        full = self._key(key)
        attempt = 0
        while True:
            try:
                return self._get_small(full)
            except bexc.ClientError as e:
                err = self._error(e, "read", full)
                if isinstance(err, NotFoundError):
                    raise NotFoundError(f"{key} not found in {self.url}") from None
                raise err from None
            except _STREAM_ERRORS as e:
                # botocore retried the request; a body cut off mid-way is ours to retry.
                attempt += 1
                if attempt >= STREAM_ATTEMPTS:
                    raise self._error(e, "read", full) from None
                backoff(attempt)
            except bexc.BotoCoreError as e:
                raise self._error(e, "read", full) from None

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        self._ready()
        full = self._key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        kwargs.update(self._body_checksum(data))
        if exclusive:
            # Check first even where conditional writes exist: some servers accept
            # If-None-Match and ignore it, and this catches the common case there.
            if self.exists(key):
                raise ConflictError(f"{key} already exists in {self.url}")
            if self._conditional is not False:
                try:
                    self._put_small(kwargs, if_none_match=True)
                    self._conditional = True
                    return
                except bexc.ClientError as e:
                    code = e.response.get("Error", {}).get("Code", "")
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                        raise ConflictError(f"{key} already exists in {self.url}") from None
                    if not (code in UNSUPPORTED_CODES or status == 501):
                        raise self._error(e, "write", full) from None
                    # The server does not do conditional writes: check-then-write it is.
                    self._conditional = False
                except bexc.BotoCoreError as e:
                    raise self._error(e, "write", full) from None
        with self._op("write", full):
            self._put_small(kwargs)

    def _get_small(self, full: str) -> bytes:
        if self._wire is None:
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        conn, resp = self._wire.request("GET", full, operation="GetObject")
        try:
            data = resp.read()
        finally:
            self._wire.done(conn, resp)
        return data

    def _put_small(self, kwargs: dict[str, Any], if_none_match: bool = False) -> None:
        """PutObject of a small object (manifest, signature, tag), over s3wire when open:
        a publish or a pull makes a dozen such requests and each costs botocore far more
        CPU than its bytes."""
        if self._wire is None:
            self._client.put_object(**kwargs, **({"IfNoneMatch": "*"} if if_none_match else {}))
            return
        checksum = {k: v for k, v in kwargs.items() if k in _CHECKSUM_HEADERS}
        headers = {_CHECKSUM_HEADERS[k]: v for k, v in checksum.items()}
        if if_none_match:
            headers["If-None-Match"] = "*"
        self._wire.put(kwargs["Key"], kwargs["Body"], headers)

    def _part_checksums(self, data: bytes | bytearray | memoryview, crc: int | None = None) -> dict[str, str]:
        """The checksum a part is sent with; ``crc``: its CRC32, when already known."""
        if self._part_checksum == "crc32":
            return {"ChecksumCRC32": _b64((zlib.crc32(data) if crc is None else crc).to_bytes(4, "big"))}
        return {"ContentMD5": _b64(hashlib.md5(data).digest())}

    def _body_checksum(self, data: bytes | bytearray | memoryview, sha: bytes | None = None) -> dict[str, str]:
        if self._checksum == "sha256":
            return {"ChecksumSHA256": _b64(sha or hashlib.sha256(data).digest())}
        return {"ContentMD5": _b64(hashlib.md5(data).digest())}

    def exists(self, key: str) -> bool:
        self._ready()
        return self._exists(self._key(key))

    def _exists(self, full: str) -> bool:
        try:
            if self._wire is None:
                self._client.head_object(Bucket=self.bucket, Key=full)
            else:
                self._wire.done(*self._wire.request("HEAD", full, operation="HeadObject"))
            return True
        except bexc.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            if status == 403:
                self._raise_forbidden(e, "look up", full)
            raise self._error(e, "look up", full) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "look up", full) from None

    def list(self, prefix: str) -> list[str]:
        self._ready()
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with self._op("list", base + prefix):
            paging = {"PageSize": self.list_page_size} if self.list_page_size else {}
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix, PaginationConfig=paging
            )
            for page in pages:
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._ready()
        full = self._key(key)
        with self._op("delete", full):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        full = self._key(blob_key(hexdigest))
        with self._op("sign a URL for", full):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=int(expires)
            )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._buffers.clear()
        if self._wire is not None:
            self._wire.close()
        with contextlib.suppress(Exception):
            self._client.close()

    # -- uploads ---------------------------------------------------------------------------

    def put_blob(
        self,
        hexdigest: str,
        src: Path,
        size: int,
        progress: Progress | None = None,
        *,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        """Upload ``src`` unless the store has it; return the bytes actually sent.

        ``progress`` receives every byte accounted for, including parts an earlier,
        interrupted run already uploaded; it may be called from worker threads."""
        self._ready()
        full = self._key(blob_key(hexdigest))
        if self._exists(full):
            return 0
        try:
            if size <= self.part_size:
                return self._put_single(hexdigest, full, Path(src), size, progress)
            return self._put_multipart(hexdigest, full, Path(src), size, progress, chunk_crc32)
        except OSError as e:
            raise StoreError(f"cannot read {src}: {e.strerror or e}") from None

    def _changed(self, src: Path, detail: str) -> IntegrityError:
        return IntegrityError(f"{src} changed while publishing ({detail})", "re-run publish once the file is stable")

    def _put_single(self, hexdigest: str, full: str, src: Path, size: int, progress: Progress | None) -> int:
        buf = self._buffers.take(size)
        try:
            view = memoryview(buf)[:size]
            with open(src, "rb", buffering=0) as fh:
                if _readinto_exact(fh, view) != size or fh.read(1):
                    raise self._changed(src, "its size differs from the manifest")
            digest = hashlib.sha256(view).digest()
            if digest.hex() != hexdigest:
                raise self._changed(src, f"sha256 now {digest.hex()[:12]}…")
            # For a single PUT the blob's own sha256 is the part checksum: one hash pass.
            self._put_object_checked(full, view, digest)
            del view
        finally:
            self._buffers.give(buf)
        if progress:
            progress(size)
        return size

    def _put_object_checked(self, full: str, data: bytes | bytearray | memoryview, digest: bytes) -> None:
        try:
            self._send_body(full, data, self._body_checksum(data, digest))
        except bexc.ClientError as e:
            if self._checksum == "sha256" and self._unsupported(e):
                self._checksum = "md5"
                with self._op("upload", full):
                    self._send_body(full, data, self._body_checksum(data))
                return
            raise self._error(e, "upload", full) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "upload", full) from None

    def _send_body(
        self,
        full: str,
        body: bytes | bytearray | memoryview,
        checksum: dict[str, str],
        part: tuple[str, int] | None = None,
    ) -> str:
        """PUT an object, or with ``part`` (upload id, number) a part; return its ETag."""
        if self._wire is not None:
            headers = {_CHECKSUM_HEADERS[k]: v for k, v in checksum.items()}
            query = {"partNumber": part[1], "uploadId": part[0]} if part else None
            return self._wire.put(full, body, headers, query)
        data = body if isinstance(body, bytes | bytearray) else bytes(body)
        if part:
            kw = {"UploadId": part[0], "PartNumber": part[1]}
            return self._client.upload_part(Bucket=self.bucket, Key=full, Body=data, **kw, **checksum)["ETag"]
        return self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **checksum)["ETag"]

    @staticmethod
    def _unsupported(e: bexc.ClientError) -> bool:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in UNSUPPORTED_CODES or status == 501

    def _part_size_for(self, size: int) -> int:
        """The configured part size, raised (in MiB steps) when the blob would
        otherwise need more than S3's 10,000 parts."""
        need = math.ceil(size / MAX_PARTS)
        if need <= self.part_size:
            return self.part_size
        return math.ceil(need / MiB) * MiB

    def _find_upload(self, full: str) -> tuple[str | None, dict[int, dict[str, Any]]]:
        """The newest unfinished multipart upload of ``full`` and its parts, if any."""
        best: dict[str, Any] | None = None
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up.get("Key") != full:
                        continue
                    algo = up.get("ChecksumAlgorithm")
                    if algo and algo.lower() != self._part_checksum:
                        continue  # made with another checksum: its parts cannot be mixed in
                    if best is None or up.get("Initiated", 0) > best.get("Initiated", 0):
                        best = up
            if best is None:
                return None, {}
            parts: dict[int, dict[str, Any]] = {}
            pages = self._client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=full, UploadId=best["UploadId"]
            )
            for page in pages:
                for p in page.get("Parts", ()):
                    parts[int(p["PartNumber"])] = p
            return best["UploadId"], parts
        except bexc.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "NoSuchUpload", "NotImplemented"):
                # No permission to list uploads (or it vanished): start afresh.
                return None, {}
            raise self._error(e, "list unfinished uploads of", full) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "list unfinished uploads of", full) from None

    def _create_upload(self, full: str) -> str:
        try:
            if self._part_checksum == "crc32":
                try:
                    return self._client.create_multipart_upload(
                        Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32"
                    )["UploadId"]
                except bexc.ClientError as e:
                    if not self._unsupported(e):
                        raise
                    self._part_checksum = "md5"  # no additional checksums here: Content-MD5
            return self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise self._error(e, "start an upload of", full) from None

    def _part_matches(self, remote: dict[str, Any], buf: memoryview, hashed: int | None) -> dict[str, Any] | None:
        """The completion entry for a part already on the server, if it holds exactly
        these bytes: by its ETag, which for a plain part is the MD5 of its bytes (a
        CRC32 alone is too weak to vouch for a part this side never sent), and by its
        CRC32 too when the server lists one; ``hashed``, the CRC32 these bytes had when
        they were hashed, if known, must still be theirs."""
        if int(remote.get("Size", -1)) != buf.nbytes:
            return None
        etag = str(remote.get("ETag", ""))
        if etag.strip('"') != hashlib.md5(buf).hexdigest():
            return None
        entry: dict[str, Any] = {"PartNumber": int(remote["PartNumber"]), "ETag": etag}
        crc = zlib.crc32(buf) if self._part_checksum == "crc32" else None
        if hashed is not None and crc != hashed:
            return None
        checksum = self._part_checksums(buf, crc)
        listed = remote.get("ChecksumCRC32")
        if listed and listed != checksum.get("ChecksumCRC32"):
            return None
        if "ChecksumCRC32" in checksum:
            entry["ChecksumCRC32"] = checksum["ChecksumCRC32"]
        return entry

    def _put_multipart(
        self,
        hexdigest: str,
        full: str,
        src: Path,
        size: int,
        progress: Progress | None,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        upload_id, existing = self._find_upload(full)
        part_size = self._part_size_for(size)
        first = existing.get(1)
        if first is not None:
            # Resume with the part size the interrupted run used, if it is a valid one,
            # so that its parts line up with ours even if the setting changed since.
            prev = int(first.get("Size", 0))
            if MIN_PART_SIZE <= prev <= MAX_PART_SIZE and math.ceil(size / prev) <= MAX_PARTS:
                part_size = prev
        if upload_id is None:
            upload_id = self._create_upload(full)
        nparts = math.ceil(size / part_size)
        # The part CRC32s, when the caller read them in the same pass as the sha256 that
        # names the blob: then each part is sent with the checksum of the bytes that were
        # hashed, the server refuses a part whose bytes differ, and nothing is hashed
        # again here. Otherwise the whole file is hashed as it is read.
        hashed = None
        if chunk_crc32 is not None and self._part_checksum == "crc32":
            hashed = part_crc32s(chunk_crc32, size, part_size)
        pool = self._executor()
        whole = hashlib.sha256()
        done: dict[int, dict[str, Any]] = {}
        futures: list[tuple[Future, bytearray]] = []
        failed = threading.Event()
        cancelled = threading.Event()

        def upload(num: int, buf: bytearray, body: memoryview) -> int:
            try:
                if cancelled.is_set():
                    return 0
                checksum = self._part_checksums(body, hashed[num - 1] if hashed is not None else None)
                try:
                    etag = self._send_body(full, body, checksum, (upload_id, num))
                except BaseException:
                    failed.set()  # tells the reader to stop reading ahead
                    raise
                entry = {"PartNumber": num, "ETag": etag}
                if "ChecksumCRC32" in checksum:
                    entry["ChecksumCRC32"] = checksum["ChecksumCRC32"]
                done[num] = entry
                if progress:
                    progress(len(body))
                return len(body)
            finally:
                del body
                self._buffers.give(buf)

        def stop_queued() -> None:
            if cancelled.is_set():
                return  # already done: a second pass would give buffers back twice
            cancelled.set()
            for f, buf in futures:
                if f.cancel():
                    self._buffers.give(buf)  # it will never run, so never give its buffer back

        try:
            with open(src, "rb", buffering=0) as fh:
                for num in range(1, nparts + 1):
                    if failed.is_set():
                        break
                    n = min(part_size, size - (num - 1) * part_size)
                    buf = self._buffers.take(n)
                    queued = False
                    try:
                        view = memoryview(buf)[:n]
                        if _readinto_exact(fh, view) != n:
                            raise self._changed(src, "it is shorter than the manifest says")
                        if hashed is None:
                            whole.update(view)
                        remote = existing.get(num)
                        was = hashed[num - 1] if hashed is not None else None
                        entry = self._part_matches(remote, view, was) if remote else None
                        if entry is None:
                            futures.append((pool.submit(upload, num, buf, view), buf))
                            queued = True
                        del view
                    finally:
                        if not queued:
                            self._buffers.give(buf)
                    if entry is not None:
                        # Already on the server from an interrupted run: not sent again.
                        done[num] = entry
                        if progress:
                            progress(n)
                    del buf
                grew = not failed.is_set() and bool(fh.read(1))
            sent = 0
            for f, _ in futures:
                exc = f.exception()
                if exc is not None:
                    stop_queued()
                    err = self._error(exc, "upload", full)
                    if hashed is not None and isinstance(err, IntegrityError):
                        err = self._changed(src, "a part differs from the bytes hashed")
                    raise err
                sent += f.result()
            if grew:
                raise self._changed(src, "it is longer than the manifest says")
            if hashed is None and whole.hexdigest() != hexdigest:
                raise self._changed(src, f"sha256 now {whole.hexdigest()[:12]}…")
        except IntegrityError:
            stop_queued()
            for f, _ in futures:
                with contextlib.suppress(BaseException):
                    f.result()
            # Wrong bytes: nothing of this upload may ever be completed.
            with contextlib.suppress(bexc.BotoCoreError, bexc.ClientError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise
        except BaseException:
            # Anything else (network, Ctrl-C): keep the uploaded parts for a resume, but
            # do not let queued parts keep running after we have given up.
            stop_queued()
            raise

        parts = [done[i] for i in range(1, nparts + 1)]
        try:
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except bexc.ClientError as e:
            # A concurrent publisher of the same blob may have completed this upload.
            if e.response.get("Error", {}).get("Code") == "NoSuchUpload" and self._exists(full):
                return sent
            raise self._error(e, "complete the upload of", full) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "complete the upload of", full) from None
        return sent

    # -- downloads -------------------------------------------------------------------------

    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        self._ready()
        with self._lock:
            self._downloading += 1
        try:
            return self._get_blob(hexdigest, Path(dest), size, progress, sync)
        finally:
            with self._lock:
                self._downloading -= 1

    def _get_blob(self, hexdigest: str, dest: Path, size: int, progress: Progress | None, sync: bool) -> int:
        full = self._key(blob_key(hexdigest))
        have, h = 0, hashlib.sha256()
        if dest.exists():
            have, h = _hash_file(dest)
            if have > size:
                dest.unlink()
                have, h = 0, hashlib.sha256()
        fetched = self._fetch_or_discard(full, dest, have, size, h, progress, sync)
        if h.hexdigest() == hexdigest:
            return fetched
        dest.unlink(missing_ok=True)
        if have:
            # The bytes kept from an earlier run may be what is wrong: try once afresh
            # before blaming the store.
            h = hashlib.sha256()
            fetched += self._fetch_or_discard(full, dest, 0, size, h, progress, sync)
            if h.hexdigest() == hexdigest:
                return fetched
            dest.unlink(missing_ok=True)
        raise IntegrityError(
            f"blob {hexdigest[:12]}… in {self.url} is corrupt (sha256 mismatch)",
            "re-publish the release or restore the blob",
        )

    def _fetch_or_discard(
        self, full: str, dest: Path, have: int, size: int, h: Any, progress: Progress | None, sync: bool
    ) -> int:
        """Fetch, keeping a partial file for a resume unless what the store holds is wrong."""
        try:
            return self._fetch_into(full, dest, have, size, h, progress, sync)
        except IntegrityError:
            dest.unlink(missing_ok=True)
            raise
        except NotFoundError:
            if not have:
                dest.unlink(missing_ok=True)  # no empty file left behind for a missing blob
            raise
        except OSError as e:
            raise StoreError(f"cannot write {dest}: {e.strerror or e}") from None

    def _fetch_into(
        self, full: str, dest: Path, start: int, size: int, h: Any, progress: Progress | None, sync: bool
    ) -> int:
        """Append bytes ``start..size`` of ``full`` to ``dest``, hashing them in order."""
        remaining = size - start
        if size == 0:
            # Still ask, so that a missing blob is an error rather than an empty file.
            with self._op("download", full):
                self._client.head_object(Bucket=self.bucket, Key=full)
            dest.touch()
            return 0
        # A blob fetched alone (one huge shard, a single-file model) is split into
        # parallel ranged GETs. While the caller fetches several blobs at once, each is
        # one streaming GET: measured against SeaweedFS, ranges cost about twice the
        # client CPU of a stream (part-sized buffers go cold in cache before they are
        # hashed and written) for no gain once several streams keep the link busy. The
        # first part is always streamed, which gives a caller starting several
        # downloads the time to start them before this one decides.
        with open(dest, "ab") as out:
            sink = _Sink(out, h, progress, sync)
            pos = start
            if remaining > 2 * self.part_size and self.concurrency >= 2:
                pos += self._stream_range(full, pos, pos + self.part_size, sink)
                if self._alone():
                    pos += self._parallel_ranges(full, pos, size, sink)
            if pos < size:
                pos += self._stream_range(full, pos, size, sink)
            out.flush()
            if sync:
                os.fsync(out.fileno())
        return remaining

    def _alone(self) -> bool:
        with self._lock:
            return self._downloading <= 1

    def _range_error(self, e: BaseException, full: str) -> WeightshipError:
        if isinstance(e, bexc.ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFoundError(f"blob {full.rsplit('/', 1)[-1][:12]}… missing from {self.url}")
            if code == "InvalidRange":
                return IntegrityError(
                    f"blob {full.rsplit('/', 1)[-1][:12]}… in {self.url} is shorter than the manifest says",
                    "re-publish the release or restore the blob",
                )
        return self._error(e, "download", full)

    def _get(self, full: str, start: int, end: int) -> Any:
        """GET bytes ``start..end-1``; returns the body, to ``readinto`` and close."""
        short = IntegrityError(
            f"blob {full.rsplit('/', 1)[-1][:12]}… in {self.url} is shorter than the manifest says",
            "re-publish the release or restore the blob",
        )
        try:
            if self._wire is not None:
                conn, resp = self._wire.request(
                    "GET", full, headers={"Range": f"bytes={start}-{end - 1}"}, operation="GetObject", ok=(200, 206)
                )
                body = _WireBody(self._wire, conn, resp)
                length = int(resp.getheader("Content-Length") or -1)
                if length != end - start or (resp.status == 200 and start != 0):
                    body.close()
                    raise short
                return body
            resp = self._client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}")
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            if isinstance(e, _STREAM_ERRORS):
                raise
            raise self._range_error(e, full) from None
        if int(resp.get("ContentLength", -1)) != end - start:
            resp["Body"].close()
            raise short
        return resp["Body"]

    def _stream_range(self, full: str, start: int, end: int, sink: _Sink) -> int:
        """One streaming GET, hashed and written as it arrives; a broken connection
        resumes from the last byte written. (A separate receiving thread was tried: no
        measurable gain, so it is not here.)"""
        view = memoryview(bytearray(min(READ_CHUNK, end - start)))
        self._receive(full, start, end, lambda pos: view[: min(len(view), end - pos)], sink.write)
        return end - start

    def _read_range(self, full: str, start: int, end: int, buf: bytearray) -> int:
        """Bytes ``start..end-1`` into ``buf``; retried on broken connections."""
        view = memoryview(buf)
        self._receive(full, start, end, lambda pos: view[pos - start : min(pos - start + READ_CHUNK, end - start)])
        return end - start

    def _receive(
        self,
        full: str,
        start: int,
        end: int,
        into: Callable[[int], memoryview],
        got: Callable[[memoryview], None] | None = None,
    ) -> None:
        """GET bytes ``start..end-1``, reading each piece into ``into(position)`` and
        handing it to ``got``; a broken connection is retried from the next byte."""
        pos, attempt = start, 0
        while pos < end:
            try:
                body = self._get(full, pos, end)
                with contextlib.closing(body):
                    while pos < end:
                        view = into(pos)
                        k = body.readinto(view)
                        if not k:
                            raise ConnectionError("body ended early")
                        if got is not None:
                            got(view[:k])
                        pos += k
            except _STREAM_ERRORS as e:
                attempt += 1
                if attempt >= STREAM_ATTEMPTS:
                    raise self._error(e, "download", full) from None
                backoff(attempt)

    def _parallel_ranges(self, full: str, start: int, end: int, sink: _Sink) -> int:
        """Fetch ranges of ``start..end`` in parallel, appending them in order, until
        another download starts; return how many bytes were appended."""
        pool = self._executor()
        step = self.part_size
        ranges = [(a, min(a + step, end)) for a in range(start, end, step)]
        pending: list[tuple[Future, bytearray]] = []
        nxt = written = 0
        try:
            while pending or (nxt < len(ranges) and self._alone()):
                # Keep up to `concurrency` ranges in flight. Never block on a buffer
                # while holding fetched-but-unwritten ones: with other transfers sharing
                # the buffers that could deadlock; write what we have instead.
                while nxt < len(ranges) and len(pending) < self.concurrency and self._alone():
                    a, b = ranges[nxt]
                    buf = self._buffers.take(b - a, blocking=not pending)
                    if buf is None:
                        break
                    try:
                        pending.append((pool.submit(self._read_range, full, a, b, buf), buf))
                    except BaseException:
                        self._buffers.give(buf)
                        raise
                    nxt += 1
                if not pending:
                    break
                fut, buf = pending.pop(0)
                try:
                    n = fut.result()
                    with memoryview(buf) as view:
                        sink.write(view[:n])
                finally:
                    self._buffers.give(buf)
                written += n
        except BaseException as e:
            for f, _ in pending:
                f.cancel()
            for f, buf in pending:
                with contextlib.suppress(BaseException):
                    f.result()
                self._buffers.give(buf)
            if isinstance(e, WeightshipError | OSError | KeyboardInterrupt):
                raise
            raise self._error(e, "download", full) from None
        return written


class _WireBody:
    """A GET's body on an s3wire connection, which goes back to the pool only once the
    body has been read to its end."""

    def __init__(self, wire: Wire, conn: Any, resp: Any) -> None:
        self._wire, self._conn, self._resp = wire, conn, resp

    def readinto(self, view: memoryview) -> int:
        return self._resp.readinto(view)

    def close(self) -> None:
        if self._resp.isclosed():
            self._wire.done(self._conn, self._resp)
        else:
            self._conn.close()


class _Sink:
    """Where downloaded bytes go, in order: the sha256, the partial file, progress.

    It also asks the kernel to start writing the file out every few MiB, so that the
    fsync that makes the blob durable finds little left to do: measured, that fsync
    otherwise added about a second per GiB, after the transfer instead of during it."""

    def __init__(self, out: Any, h: Any, progress: Progress | None, sync: bool = True) -> None:
        self.out = out
        self.sync = sync
        self.h = h
        self.progress = progress
        self.fd = out.fileno()
        self.flushed = out.tell()  # where unflushed (not yet written back) bytes begin
        self.pending = 0

    def write(self, data: bytes | memoryview) -> None:
        self.h.update(data)
        write_all(self.out, data)
        n = len(data)
        if self.progress:
            self.progress(n)
        self.pending += n
        if self.sync and self.pending >= WRITEBACK_CHUNK:
            self.out.flush()
            _start_writeback(self.fd, self.flushed, self.pending)
            self.flushed += self.pending
            self.pending = 0


_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range out without
    waiting. Elsewhere (or if libc lacks it) a no-op: the final fsync does it all."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        with contextlib.suppress(Exception):
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # libc, already loaded
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = fn
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def _readinto_exact(fh: Any, view: memoryview) -> int:
    """Fill ``view`` from ``fh``; fewer bytes only at end of file."""
    got = 0
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            break
        got += k
    return got


class _Buffers:
    """Part-sized buffers shared by every transfer of one store: they bound its memory,
    and they are reused because a fresh 16 MiB bytearray is zero-filled page by page,
    kernel time that measurably slowed transfers.

    The budget is counted in part-sized units: a small file's buffer takes one, an
    outsized part (a blob so big that 10,000 parts of the usual size do not hold it)
    takes as many as it is large, so memory stays bounded whatever the blob size."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self._avail = count
        self._free: list[bytearray] = []
        self._cond = threading.Condition()

    def _units(self, n: int) -> int:
        return min(self.count, max(1, -(-n // self.size)))

    def take(self, n: int, blocking: bool = True) -> bytearray | None:
        """A buffer of at least ``n`` bytes; waits for budget (or returns None at once
        when not ``blocking``)."""
        units = self._units(n)
        with self._cond:
            if not blocking and self._avail < units:
                return None
            while self._avail < units:
                self._cond.wait()
            self._avail -= units
            reuse = self._free.pop() if self.size // 4 <= n <= self.size and self._free else None
        if reuse is not None:
            return reuse
        try:
            if n < self.size // 4 or n > self.size:
                return bytearray(n)  # a small file, or an outsized part: used once
            return bytearray(self.size)
        except BaseException:
            with self._cond:
                self._avail += units
                self._cond.notify_all()
            raise

    def give(self, buf: bytearray) -> None:
        with self._cond:
            if len(buf) == self.size:
                self._free.append(buf)
            self._avail += self._units(len(buf))
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._free.clear()


def _hash_file(path: Path) -> tuple[int, Any]:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                return n, h
            h.update(view[:k])
            n += k
