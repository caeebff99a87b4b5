"""Object storage: ``s3://BUCKET[/PREFIX]`` and ``az://CONTAINER[/PREFIX]`` through obstore.

obstore (the Python binding of the Rust ``object_store`` crate) speaks each service's
protocol: request signing, presigned URLs, conditional creates, multipart uploads, ranged
GETs, retries. This module maps the store layout onto it and adds only what weightship
promises on top (docs/format.md):

* **Nothing is stored under a blob's name but bytes that hash to it.** A blob is read
  once, in order; its sha256 is computed as the bytes are handed to the upload, and the
  last bytes are withheld until the digest is known: if it is not the blob's name the
  upload is abandoned (a multipart upload is aborted) and nothing becomes visible.
* **Every reader verifies**: downloads go through :class:`~weightship.blobwriter.BlobWriter`
  (resume from the partial file, stop at the declared size, sha256 while writing).
* **Versions are immutable**: exclusive writes are conditional creates (``If-None-Match``
  on S3, ``If-None-Match: *`` on Azure).
* **One retry policy** (:data:`RETRY`), obstore's own: weightship adds no loop around a
  call that already retries.

Credentials come from each service's standard chain. S3: ``AWS_*`` variables go straight
to obstore; anything else (a profile, SSO, a config file, an instance role, assume-role)
is resolved by boto3, whose credentials obstore refreshes through
``Boto3CredentialProvider``. Azure: ``AZURE_STORAGE_ACCOUNT_NAME`` with
``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``, or the emulator
(``AZURE_STORAGE_USE_EMULATOR=true``, ``AZURITE_BLOB_STORAGE_URL``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore import exceptions as oe

from weightship.artifact.manifest import check_relpath
from weightship.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    StoreError,
    UsageError,
    WeightshipError,
)
from weightship.store.base import ObjectInfo, Progress, Store, blob_key
from weightship.store.checked import CheckedFile
from weightship.store.writer import BlobWriter

MiB = 1024 * 1024
# Multipart uploads: parts of PART_SIZE, PART_CONCURRENCY of them in flight per blob.
# publish uploads release.UPLOAD_WORKERS blobs at once, so at most 4 x 4 x 8 MiB of part
# buffers are held whatever the model's size (peak RSS stays far under 300 MB).
PART_SIZE = 8 * MiB
PART_CONCURRENCY = 4
# Downloads: one ranged GET per blob, streamed in pieces of this size.
STREAM_CHUNK = 1 * MiB
# The one retry policy (obstore's): 5xx answers, connection errors, dropped connections
# and timeouts of idempotent requests are retried with exponential backoff and jitter
# (0.1 s doubling up to 15 s), at most MAX_RETRIES times and never past RETRY_TIMEOUT
# after the first attempt. Worst case per request: RETRY_TIMEOUT plus one last attempt
# (a server that accepts connections and never answers: about 90 s).
MAX_RETRIES = 5
RETRY_TIMEOUT = timedelta(seconds=60)
RETRY: dict[str, Any] = {
    "max_retries": MAX_RETRIES,
    "retry_timeout": RETRY_TIMEOUT,
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15), "base": 2},
}
# A whole request (a ranged GET of a large blob included) may take long on a slow link;
# a connection that sends nothing for READ_TIMEOUT is stalled.
READ_TIMEOUT = timedelta(seconds=30)
CLIENT: dict[str, Any] = {
    "connect_timeout": timedelta(seconds=10),
    "timeout": timedelta(hours=6),
    "read_timeout": READ_TIMEOUT,
}

_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidAuthenticationInfo",
}
_MISSING_CONTAINER_CODES = {"NoSuchBucket", "ContainerNotFound"}


class ObjectStore(Store):
    """The store layout in an S3 bucket or an Azure Blob container (see the module doc)."""

    def __init__(self, inner: Any, url: str, *, kind: str, container: str, endpoint: str | None = None) -> None:
        self._inner = inner
        self.url = url
        self.kind = kind  # "s3" or "az"
        self.container = container
        self.endpoint = endpoint
        self._probed = False
        self._lock = threading.Lock()

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> ObjectStore:
        scheme, container, prefix = split_url(url)
        if scheme == "s3":
            inner, endpoint = _open_s3(container, prefix)
        else:
            inner, endpoint = _open_azure(container, prefix)
        clean = f"{scheme}://{container}" + (f"/{prefix}" if prefix else "")
        return cls(inner, clean, kind=scheme, container=container, endpoint=endpoint)

    # -- small objects -----------------------------------------------------------------

    def read(self, key: str) -> bytes:
        try:
            return bytes(obstore.get(self._inner, check_relpath(key)).bytes())
        except Exception as e:
            raise self._error(e, "read", key) from None

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        try:
            obstore.put(self._inner, check_relpath(key), data, mode="create" if exclusive else "overwrite")
        except (oe.AlreadyExistsError, oe.PreconditionError):
            raise ConflictError(f"{key} already exists in {self.url}") from None
        except Exception as e:
            raise self._error(e, "write", key) from None

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._inner, check_relpath(key))
            return True
        except FileNotFoundError:
            # A HEAD answer has no body to say whether the object or the whole bucket is
            # missing (or the credentials are wrong): ask once, with a listing, which does.
            self._probe()
            return False
        except (oe.PermissionDeniedError, oe.UnauthenticatedError) as e:
            self._probe()  # names the credentials, or the missing bucket, when it can
            raise self._error(e, "read", key) from None
        except Exception as e:
            raise self._error(e, "read", key) from None

    def list(self, prefix: str) -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        # The listing already carries size and Last-Modified: no HEAD per object.
        out: list[ObjectInfo] = []
        try:
            for batch in obstore.list(self._inner, prefix or None, chunk_size=1000):
                out.extend(ObjectInfo(m["path"], int(m["size"]), m["last_modified"]) for m in batch)
        except Exception as e:
            raise self._error(e, "list", prefix) from None
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._inner, check_relpath(key))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._error(e, "delete", key) from None

    # -- blobs -------------------------------------------------------------------------

    def put_blob(
        self,
        hexdigest: str,
        src: Path,
        size: int,
        progress: Progress | None = None,
        *,
        chunk_crc32: Sequence[int] | None = None,
    ) -> int:
        key = blob_key(hexdigest)
        if self.exists(key):
            return 0
        reader = CheckedFile(Path(src), hexdigest, size, progress, chunk_crc32)
        try:
            if size <= PART_SIZE:
                # One PUT: the bytes are all read and checked before anything is sent.
                obstore.put(self._inner, key, reader.read_all(), mode="overwrite", use_multipart=False)
            else:
                obstore.put(
                    self._inner,
                    key,
                    reader,
                    mode="overwrite",
                    chunk_size=PART_SIZE,
                    max_concurrency=PART_CONCURRENCY,
                )
        except WeightshipError:
            raise
        except OSError as e:
            if reader.error is not None:
                raise reader.error from None
            if isinstance(e, FileNotFoundError) and e.filename is not None:
                raise StoreError(f"cannot read {src}: {e.strerror}") from None
            raise self._error(e, "upload", key) from None
        except Exception as e:
            if reader.error is not None:
                # The reader refused the bytes (the file changed): the upload was abandoned.
                raise reader.error from None
            raise self._error(e, "upload", key) from None
        return size

    def get_blob(
        self, hexdigest: str, dest: Path, size: int, progress: Progress | None = None, *, sync: bool = True
    ) -> int:
        key = blob_key(hexdigest)
        with BlobWriter(dest, hexdigest, size, sync=sync) as w:
            if w.complete:
                return 0
            start = w.have
            try:
                if size == 0:
                    # Still ask, so that a missing blob is an error rather than an empty file.
                    obstore.head(self._inner, key)
                else:
                    result = obstore.get(self._inner, key, options={"range": (start, size)})
                    for chunk in result.stream(min_chunk_size=STREAM_CHUNK):
                        w.append(memoryview(chunk))
                        if progress:
                            progress(len(chunk))
            except WeightshipError:
                raise
            except Exception as e:
                error = self._error(e, "download", key)
                if w.have == 0:
                    w.discard()  # no empty file left behind for a missing blob
                else:
                    w.flush()  # what arrived is kept: the next attempt resumes from it
                raise error from None
            w.check(f" in {self.url}")
            w.flush()
            return size - start

    def blob_url(self, hexdigest: str, expires: int = 3600) -> str | None:
        try:
            return obstore.sign(self._inner, "GET", blob_key(hexdigest), timedelta(seconds=expires))
        except Exception as e:
            raise self._error(e, "sign a URL for", blob_key(hexdigest)) from None

    # -- errors ------------------------------------------------------------------------

    def _probe(self) -> None:
        """One listing request, the first time a HEAD says "not found" or is refused:
        its answer names a missing bucket or container, or wrong credentials."""
        with self._lock:
            if self._probed:
                return
            self._probed = True
        try:
            next(iter(obstore.list(self._inner, "tags/", chunk_size=1)), None)
        except Exception as e:
            with self._lock:
                self._probed = False
            raise self._error(e, "list", "tags/") from None

    def _error(self, e: BaseException, op: str, key: str) -> WeightshipError:
        """One line naming what to fix, for whatever obstore raised."""
        text = str(e)
        code = m.group(1) if (m := _CODE.search(text)) else ""
        what = "bucket" if self.kind == "s3" else "container"
        if code in _MISSING_CONTAINER_CODES:
            return StoreError(
                f"{what} {self.container!r} does not exist ({self.url})", f"create it, or fix the {what} in the URL"
            )
        if code in _CREDENTIAL_CODES or isinstance(e, oe.UnauthenticatedError):
            return StoreError(
                f"{self._service()} rejected the credentials ({code or 'unauthenticated'}) for {self.url}",
                self._credentials_hint(),
            )
        denied = code in ("AccessDenied", "AuthorizationPermissionMismatch")
        if isinstance(e, oe.PermissionDeniedError) or denied:
            return StoreError(
                f"no permission to {op} {key} in {self.url} ({code or 'access denied'})",
                f"grant these credentials {op} access to the {what}",
            )
        if isinstance(e, FileNotFoundError):
            return NotFoundError(f"{key} not found in {self.url}")
        if isinstance(e, (oe.AlreadyExistsError, oe.PreconditionError)):
            return ConflictError(f"{key} already exists in {self.url}")
        if any(s in text for s in ("error sending request", "Connection refused", "dns error", "timed out")):
            at = f" at {self.endpoint}" if self.endpoint else ""
            return StoreError(
                f"cannot reach {self._service()}{at} to {op} {key} (retried for up to {RETRY_TIMEOUT.seconds} s)",
                "check the endpoint and the network"
                + (" (AWS_ENDPOINT_URL)" if self.kind == "s3" else " (the account, or AZURITE_BLOB_STORAGE_URL)"),
            )
        first = " ".join(text.split("\n", 1)[0].split())
        if len(first) > 300:
            first = first[:300] + "…"
        return StoreError(f"cannot {op} {key} in {self.url}: {first}")

    def _service(self) -> str:
        return "S3" if self.kind == "s3" else "Azure Blob Storage"

    def _credentials_hint(self) -> str:
        if self.kind == "s3":
            return "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        return "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN)"


# -- URLs and clients -------------------------------------------------------------------


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://BUCKET/PREFIX`` or ``az://CONTAINER/PREFIX`` -> (scheme, container, prefix)."""
    u = urlsplit(url)
    if u.scheme not in ("s3", "az") or not u.netloc or u.query or u.fragment:
        raise UsageError(f"store URL {url!r} is malformed", "write s3://BUCKET/PREFIX or az://CONTAINER/PREFIX")
    prefix = u.path.strip("/")
    if prefix:
        try:
            check_relpath(prefix)
        except WeightshipError:
            raise UsageError(
                f"store URL {url!r} has an unsafe prefix", "use a plain path such as models/weights"
            ) from None
    return u.scheme, u.netloc, prefix


def _client_options(endpoint: str | None) -> dict[str, Any]:
    opts = dict(CLIENT)
    plain = bool(endpoint and endpoint.startswith("http://"))
    if plain:
        opts["allow_http"] = True
    # The proxy for the endpoint's scheme, as curl and boto3 choose it.
    names = ("HTTP_PROXY", "http_proxy") if plain else ("HTTPS_PROXY", "https_proxy")
    proxy = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if proxy:
        opts["proxy_url"] = proxy
        if no_proxy := (os.environ.get("NO_PROXY") or os.environ.get("no_proxy")):
            opts["proxy_excludes"] = no_proxy
    return opts


def _open_s3(bucket: str, prefix: str) -> tuple[Any, str | None]:
    """An obstore S3Store: AWS_* variables straight to obstore, any other source of
    credentials through boto3 (profiles, SSO, roles, config files, instance metadata)."""
    from obstore.store import S3Store

    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    config: dict[str, Any] = {}
    provider = None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        # obstore reads the rest of the environment itself (session token, region).
        config["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    else:
        provider, region, configured_endpoint = _boto3_chain()
        config["region"] = region
        endpoint = endpoint or configured_endpoint
    if endpoint:
        # An explicit endpoint (MinIO, Ceph, R2, SeaweedFS, GCS's XML API) means path-style.
        config["endpoint"] = endpoint
        config["virtual_hosted_style_request"] = False
    if not (endpoint and endpoint.startswith("http://")):
        # Over TLS the bytes cannot change on the way, so the body is not hashed again for
        # the signature (as botocore does over HTTPS): 0.6 CPU-s per GiB. Over plain HTTP
        # the server checks the signed payload hash, so a bit flipped on the wire cannot
        # be stored under a blob's name.
        config["unsigned_payload"] = True
    try:
        store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,
            client_options=_client_options(endpoint),
            retry_config=RETRY,
            credential_provider=provider,
        )
    except Exception as e:  # a bad setting in the environment
        raise ConfigError(f"cannot configure S3 for s3://{bucket}: {str(e).splitlines()[0]}") from None
    return store, endpoint


def _boto3_chain() -> tuple[Any, str, str | None]:
    """Credentials, region and endpoint from boto3's chain, for what the environment
    alone does not say."""
    import boto3
    from botocore.exceptions import BotoCoreError
    from obstore.auth.boto3 import Boto3CredentialProvider

    try:
        session = boto3.Session()
        if session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials found (environment, profile, SSO, config file or instance role)",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            )
        endpoint = _configured_endpoint(session)
    except BotoCoreError as e:
        raise ConfigError(f"AWS configuration: {e}") from None
    return Boto3CredentialProvider(session), session.region_name or "us-east-1", endpoint


def _configured_endpoint(session: Any) -> str | None:
    """The S3 endpoint the AWS configuration names (``endpoint_url`` in the profile, or in
    its ``services`` section), as boto3 itself would use it; None for AWS's own."""
    from botocore.configprovider import ConfiguredEndpointProvider

    core = session._session
    provider = ConfiguredEndpointProvider(
        full_config=core.full_config, scoped_config=core.get_scoped_config(), client_name="s3"
    )
    return provider.provide()


def _open_azure(container: str, prefix: str) -> tuple[Any, str | None]:
    from obstore.store import AzureStore

    env = os.environ
    emulator = env.get("AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true", "yes")
    endpoint = env.get("AZURITE_BLOB_STORAGE_URL") if emulator else None
    if not emulator and not env.get("AZURE_STORAGE_ACCOUNT_NAME"):
        raise ConfigError(
            f"no Azure storage account for az://{container}",
            "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN)",
        )
    try:
        store = AzureStore(
            container,
            prefix=prefix or None,
            client_options=_client_options((endpoint or "http://") if emulator else None),
            retry_config=RETRY,
        )
    except Exception as e:
        why = str(e).splitlines()[0]
        raise ConfigError(f"cannot configure Azure Blob Storage for az://{container}: {why}") from None
    return store, endpoint
