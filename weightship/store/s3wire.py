"""S3 requests over ``http.client``: the blob bytes always, every request when the
environment configures S3 completely (see s3light).

botocore spends 10-30 ms of CPU on each request it sends (events, endpoint rules,
validation, parsing) and copies each body more than once. For a GiB of 8 MiB parts that
is 128 such requests, and on a small machine sharing its CPUs with the server it
measurably slowed every transfer (about 0.4 CPU-s per 128 MiB sent through botocore
against 0.16 sent here). So the requests that move blob bytes are built here: where
botocore would send them (learnt once from a presigned URL it makes, when botocore is in
use), signed by weightship's SigV4 signer with an unsigned payload (every body carries
its own verified checksum), sent from and read into the callers' buffers over
kept-alive connections.

Failures are raised as botocore exceptions (``ClientError`` with the server's code, or
a connection error), so the store maps them to messages in one place whichever client
sent the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import random
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from botocore import exceptions as bexc

from weightship.store.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, Credentials, Signer, canonical_query, quote_path

_PROBE = "weightship-probe"
# Answers worth another attempt: the server is overloaded or briefly failing.
_RETRY_STATUS = {500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
TIMEOUT = 60.0


class Wire:
    """Signed S3 requests for one bucket over reused ``http.client`` connections.
    Safe to share between threads: each request takes a connection of its own."""

    def __init__(
        self, endpoint: str, base: str, signer: Signer, *, attempts: int, ca_bundle: str | None = None
    ) -> None:
        """``endpoint``: scheme and host, ``base``: the bucket's path on it (``/BUCKET/``
        path-style, ``/`` when the bucket is in the host name)."""
        parts = urlsplit(endpoint)
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self.host = parts.hostname or ""
        self.port = parts.port
        self.base = base
        self.endpoint = f"{self.scheme}://{self.netloc}"
        self.signer = signer
        self._attempts = max(1, attempts)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            import certifi

            # What botocore's own connections verify against: AWS_CA_BUNDLE, else certifi.
            self._ssl = ssl.create_default_context(cafile=ca_bundle or certifi.where())

    @classmethod
    def from_botocore(
        cls, client: Any, bucket: str, credentials: Any, *, attempts: int, ca_bundle: str | None = None
    ) -> Wire:
        """Requests where a botocore client sends them (its endpoint, addressing style
        and signing region, read off a URL it presigns), with its credentials."""
        probe = urlsplit(
            client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE}, ExpiresIn=60)
        )
        if not probe.path.endswith("/" + _PROBE):
            raise ValueError(f"unexpected presigned URL layout {probe.path!r}")
        scope = parse_qs(probe.query).get("X-Amz-Credential", [""])[0].split("/")
        if len(scope) != 5:
            raise ValueError("presigned URL without a SigV4 credential scope")

        def frozen() -> Credentials | None:
            creds = credentials.get_frozen_credentials() if credentials is not None else None
            if creds is None:
                return None
            return Credentials(creds.access_key, creds.secret_key, creds.token)

        signer = Signer(frozen, region=scope[2], service=scope[3])
        endpoint = f"{probe.scheme}://{probe.netloc}"
        return cls(endpoint, probe.path[: -len(_PROBE)], signer, attempts=attempts, ca_bundle=ca_bundle)

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self._ssl is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT, context=self._ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def _release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        if resp.isclosed() and not resp.will_close:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- requests -------------------------------------------------------------------------

    def _target(self, key: str, query: Mapping[str, str | int] | None) -> tuple[str, str]:
        """The encoded path, and the request target (path and query) as sent."""
        path = self.base + quote_path(key)
        if query:
            return path, path + "?" + canonical_query(query)
        return path, path

    def presign(self, key: str, expires: int) -> str:
        return self.signer.presign("GET", self.scheme, self.netloc, self.base + quote_path(key), expires)

    def _send(
        self,
        method: str,
        key: str,
        query: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
        body: Any,
        payload: str,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One attempt: a connection with the response to one signed request on it."""
        path, target = self._target(key, query)
        signed = self.signer.sign_headers(method, self.netloc, path, query, headers, payload)
        conn = self._connect()
        reused = conn.sock is not None
        try:
            # The Host header sent is the one signed, whatever http.client would make of it.
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in signed.items():
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            elif method in ("POST", "PUT"):
                conn.putheader("Content-Length", "0")
            conn.endheaders()
            if body is not None:
                try:
                    conn.send(body)
                except OSError:
                    # The server may have answered (and closed) before taking the body,
                    # e.g. to refuse the credentials: that answer is the one to report.
                    resp = conn.getresponse()
                    return conn, resp
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if reused and isinstance(e, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
                # A kept-alive connection the server had closed meanwhile: not a failure.
                return self._send(method, key, query, headers, body, payload)
            raise _connection_error(e, self.endpoint) from None

    def request(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        operation: str = "Request",
        ok: tuple[int, ...] = (200,),
        sign_body: bool = False,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send until the answer is one of ``ok`` (returned unread, for the caller to read
        and hand back with :meth:`done`); retry 5xx, throttling and broken connections
        with backoff, raise anything else as the ClientError botocore would raise.
        ``sign_body``: the signature covers the body's sha256 (for small request
        documents; blob bytes carry checksums of their own)."""
        payload = UNSIGNED_PAYLOAD
        if sign_body:
            payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        attempt = 0
        while True:
            attempt += 1
            try:
                conn, resp = self._send(method, key, query, headers or {}, body, payload)
            except bexc.BotoCoreError:
                if attempt >= self._attempts:
                    raise
                backoff(attempt)
                continue
            if resp.status in ok:
                return conn, resp
            err = _client_error(resp, method, operation)
            self.done(conn, resp)
            code = err.response["Error"]["Code"]
            if (resp.status in _RETRY_STATUS or code in _RETRY_CODES) and attempt < self._attempts:
                backoff(attempt)
                continue
            raise err

    def done(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Hand a connection back once its response has been read (or give it up)."""
        with contextlib.suppress(OSError, http.client.HTTPException):
            if not resp.isclosed():
                resp.read()
        self._release(conn, resp)

    def put(self, key: str, body: Any, headers: Mapping[str, str], query: Mapping[str, str | int] | None = None) -> str:
        """PUT a body (an object or, with ``query``, a part); returns the ETag."""
        conn, resp = self.request("PUT", key, query=query, headers=headers, body=body, operation="PutObject")
        etag = resp.getheader("ETag") or ""
        self.done(conn, resp)
        return etag


def _client_error(resp: http.client.HTTPResponse, method: str, operation: str) -> bexc.ClientError:
    try:
        raw = resp.read(64 * 1024) if method != "HEAD" else b""
    except (OSError, http.client.HTTPException):
        raw = b""
    code, message = str(resp.status), resp.reason or ""
    if raw:
        with contextlib.suppress(ET.ParseError):
            root = ET.fromstring(raw)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or message
    return client_error(code, message, resp.status, operation)


def client_error(code: str, message: str, status: int, operation: str) -> bexc.ClientError:
    """The error botocore raises for an S3 error answer."""
    return bexc.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def _connection_error(e: BaseException, endpoint: str) -> bexc.BotoCoreError:
    if isinstance(e, TimeoutError):
        return bexc.ReadTimeoutError(endpoint_url=endpoint, error=e)
    if isinstance(e, ConnectionRefusedError) or (isinstance(e, OSError) and not isinstance(e, ConnectionError)):
        return bexc.EndpointConnectionError(endpoint_url=endpoint, error=e)  # refused, DNS, unreachable
    return bexc.ConnectionClosedError(endpoint_url=endpoint, error=e)  # reset, closed, cut short


def backoff(attempt: int) -> None:
    """Sleep before another attempt: exponential, jittered, at most about 5 s."""
    time.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))
