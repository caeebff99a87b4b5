"""AWS Signature Version 4 for S3 requests: signed headers and presigned URLs.

One signer serves every request weightship builds itself (s3wire), whether botocore or
the environment supplied the credentials. It is the published algorithm and nothing
more: the canonical request (method, path, sorted query, signed headers, payload hash),
the string to sign over its sha256, and an HMAC key derived per day, region and service.
Bodies are sent with ``UNSIGNED-PAYLOAD`` unless the caller hashes them: every body
weightship sends carries a checksum of its own that the server verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Not signed: they may change on the way (proxies, the HTTP library) without changing
# what the request asks for.
_UNSIGNED_HEADERS = {"authorization", "user-agent", "expect", "content-length", "x-amzn-trace-id"}


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


def quote_part(value: str) -> str:
    """SigV4's URI encoding of one query name or value: all but unreserved bytes."""
    return quote(value, safe="-_.~")


def quote_path(path: str) -> str:
    """SigV4's URI encoding of an S3 path: like a query value, but ``/`` kept (S3 paths
    are encoded once, not twice as other services' are)."""
    return quote(path, safe="/-_.~")


def canonical_query(query: Mapping[str, str | int] | None) -> str:
    if not query:
        return ""
    return "&".join(f"{quote_part(k)}={quote_part(str(v))}" for k, v in sorted(query.items()))


class Signer:
    """Signs for one region and service with credentials read at each signature, so
    that credentials which refresh themselves (botocore's) stay current."""

    def __init__(self, credentials: Callable[[], Credentials | None], region: str, service: str = "s3") -> None:
        self._credentials = credentials
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def _creds(self) -> Credentials:
        creds = self._credentials()
        if creds is None or not creds.access_key or not creds.secret_key:
            # The store reports this as "no AWS credentials found".
            from botocore.exceptions import NoCredentialsError

            raise NoCredentialsError()
        return creds

    def _key(self, creds: Credentials, day: str) -> bytes:
        with self._lock:
            key = self._keys.get((creds.secret_key, day))
        if key is None:
            key = _hmac(("AWS4" + creds.secret_key).encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                key = _hmac(key, part)
            with self._lock:
                if len(self._keys) > 8:
                    self._keys.clear()
                self._keys[(creds.secret_key, day)] = key
        return key

    def _scope(self, stamp: str) -> str:
        return f"{stamp[:8]}/{self.region}/{self.service}/aws4_request"

    def _signature(self, creds: Credentials, stamp: str, canonical: str) -> str:
        to_sign = f"{ALGORITHM}\n{stamp}\n{self._scope(stamp)}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        return hmac.new(self._key(creds, stamp[:8]), to_sign.encode(), hashlib.sha256).hexdigest()

    def sign_headers(
        self,
        method: str,
        host: str,
        path: str,
        query: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
        payload: str = UNSIGNED_PAYLOAD,
        now: float | None = None,
    ) -> dict[str, str]:
        """``headers`` plus ``Host``, ``X-Amz-Date``, ``X-Amz-Content-SHA256``, the
        session token if any and ``Authorization``. ``path`` is already encoded
        (:func:`quote_path`), as it goes on the request line."""
        creds = self._creds()
        stamp = _stamp(now)
        out = dict(headers)
        out["Host"] = host
        out["X-Amz-Date"] = stamp
        out["X-Amz-Content-SHA256"] = payload
        if creds.token:
            out["X-Amz-Security-Token"] = creds.token
        signed = sorted(
            (k.lower(), " ".join(str(v).split())) for k, v in out.items() if k.lower() not in _UNSIGNED_HEADERS
        )
        names = ";".join(k for k, _ in signed)
        canonical = "\n".join(
            [method, path, canonical_query(query), "".join(f"{k}:{v}\n" for k, v in signed), names, payload]
        )
        signature = self._signature(creds, stamp, canonical)
        out["Authorization"] = (
            f"{ALGORITHM} Credential={creds.access_key}/{self._scope(stamp)}, "
            f"SignedHeaders={names}, Signature={signature}"
        )
        return out

    def presign(self, method: str, scheme: str, host: str, path: str, expires: int, now: float | None = None) -> str:
        """A URL anyone may use for ``method`` on ``path`` for ``expires`` seconds."""
        creds = self._creds()
        stamp = _stamp(now)
        query: dict[str, str | int] = {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"{creds.access_key}/{self._scope(stamp)}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": int(expires),
            "X-Amz-SignedHeaders": "host",
        }
        if creds.token:
            query["X-Amz-Security-Token"] = creds.token
        canonical = "\n".join([method, path, canonical_query(query), f"host:{host}\n", "host", UNSIGNED_PAYLOAD])
        signature = self._signature(creds, stamp, canonical)
        return f"{scheme}://{host}{path}?{canonical_query(query)}&X-Amz-Signature={signature}"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _stamp(now: float | None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
