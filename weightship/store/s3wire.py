"""The S3 bulk-data path: part uploads and ranged downloads over ``http.client``.

botocore stays in charge of everything it is good at (the credential chain, the
endpoint, addressing and region, every control request), but it spends 10-30 ms of CPU
on each request it sends (events, endpoint rules, validation, parsing) and copies each
body more than once. For a GiB of 8 MiB parts that is 128 such requests, and on a small
machine sharing its CPUs with the server it measurably slowed every transfer (about
0.4 CPU-s per 128 MiB sent through botocore against 0.16 sent here). So the requests
that move blob bytes are built here: where botocore would send them (learnt once from a
presigned URL it makes), signed by botocore's own SigV4 signer with an unsigned payload
(every body carries its own verified checksum), sent from and read into the callers'
buffers over kept-alive connections.

Failures are raised as botocore exceptions (``ClientError`` with the server's code, or
a connection error), so the store maps them to messages in one place.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from botocore import exceptions as bexc
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

_PROBE = "weightship-probe"
# Answers worth another attempt: the server is overloaded or briefly failing.
_RETRY_STATUS = {500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
TIMEOUT = 60.0


def _q(value: str) -> str:
    # SigV4 signs the query exactly as sent: every byte but the unreserved ones encoded.
    return quote(value, safe="-_.~")


class Wire:
    """Signed S3 requests for one bucket over reused ``http.client`` connections.
    Safe to share between threads: each request takes a connection of its own."""

    def __init__(
        self, client: Any, bucket: str, credentials: Any, *, attempts: int, ca_bundle: str | None = None
    ) -> None:
        probe = urlsplit(
            client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE}, ExpiresIn=60)
        )
        if not probe.path.endswith("/" + _PROBE):
            raise ValueError(f"unexpected presigned URL layout {probe.path!r}")
        scope = parse_qs(probe.query).get("X-Amz-Credential", [""])[0].split("/")
        if len(scope) != 5:
            raise ValueError("presigned URL without a SigV4 credential scope")
        self.region, self.service = scope[2], scope[3]
        self.scheme, self.netloc = probe.scheme, probe.netloc
        self.host = probe.hostname or ""
        self.port = probe.port
        self.base = probe.path[: -len(_PROBE)]  # "/BUCKET/" (path style) or "/" (virtual host)
        self.endpoint = f"{self.scheme}://{self.netloc}"
        self._credentials = credentials
        self._config = client.meta.config
        self._attempts = max(1, attempts)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            import certifi

            # What botocore's own connections verify against: AWS_CA_BUNDLE, else certifi.
            self._ssl = ssl.create_default_context(cafile=ca_bundle or certifi.where())

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

    def _headers(self, method: str, url: str, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        creds = self._credentials.get_frozen_credentials() if self._credentials is not None else None
        if creds is None or not creds.access_key:
            raise bexc.NoCredentialsError()
        req = AWSRequest(method=method, url=url, headers=dict(headers))
        # S3SigV4Auth reads the client's s3 settings here: payload signing is off.
        req.context["client_config"] = self._config
        S3SigV4Auth(creds, self.service, self.region).add_auth(req)
        return list(req.headers.items())

    def _url(self, key: str, query: Mapping[str, str | int] | None) -> tuple[str, str]:
        target = self.base + quote(key, safe="/~")
        if query:
            target += "?" + "&".join(f"{_q(k)}={_q(str(v))}" for k, v in sorted(query.items()))
        return self.endpoint + target, target

    def _send(
        self, method: str, key: str, query: Mapping[str, str | int] | None, headers: Mapping[str, str], body: Any
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One attempt: a connection with the response to one signed request on it."""
        url, target = self._url(key, query)
        signed = self._headers(method, url, headers)
        conn = self._connect()
        reused = conn.sock is not None
        try:
            conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
            for k, v in signed:
                if k.lower() != "host":
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
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
                return self._send(method, key, query, headers, body)
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
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send until the answer is one of ``ok`` (returned unread, for the caller to read
        and hand back with :meth:`done`); retry 5xx, throttling and broken connections
        with backoff, raise anything else as the ClientError botocore would raise."""
        attempt = 0
        while True:
            attempt += 1
            try:
                conn, resp = self._send(method, key, query, headers or {}, body)
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
    return bexc.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": resp.status}},
        operation,
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
