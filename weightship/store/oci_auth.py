"""Registry credentials and authentication, as docker and oras do them.

Where credentials come from (the first that has some for the registry's host):

1. ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``): a credential helper
   named for the host in ``credHelpers``, else the ``credsStore`` helper, else the
   ``auths`` entry (``auth`` = base64 ``user:password``, or ``username``/``password``,
   or an ``identitytoken`` for the OAuth2 refresh-token grant);
2. none: anonymous, which registries allow for public repositories.

How they are used is the registry's choice, told by its ``WWW-Authenticate`` challenge
(the distribution spec's token flow): ``Basic`` sends them with every request;
``Bearer realm=…,service=…,scope=…`` trades them at the token service for a short-lived
token scoped to one repository and its actions, cached per repository until it expires.
httpx's auth-flow hook replays the request that met the challenge; nothing else retries.

Credentials never travel over plain HTTP to anything but a loopback address, and never
to a host other than the one they were configured for (the token realm's host excepted,
which the registry itself names).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from weightship.errors import ConfigError, StoreError

# Tokens are dropped this long before the registry says they expire, so that a request
# never leaves with one that expires on the way.
TOKEN_MARGIN = 10.0
# The spec's default lifetime when the token service does not say.
TOKEN_DEFAULT_TTL = 60.0
_PARAM = re.compile(r'(\w+)="([^"]*)"')
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")
LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token (docker login to an OAuth2 registry)

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def is_loopback(host: str) -> bool:
    return host.split(":")[0] in LOOPBACK or host.startswith(("[::1]", "127."))


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def load_credentials(host: str) -> Credentials | None:
    """Credentials for ``host`` (``HOST[:PORT]``) from the docker configuration, or None."""
    path = docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}", "fix the docker configuration or set DOCKER_CONFIG") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object", "fix the docker configuration or set DOCKER_CONFIG")
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        found = _from_helper(str(helper), host)
        if found is not None:
            return found
    auths = config.get("auths") or {}
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"):
        entry = auths.get(key)
        if isinstance(entry, dict):
            return _from_entry(entry, path, host)
    return None


def _from_entry(entry: dict, path: Path, host: str) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username", ""), identity_token=entry["identitytoken"])
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(
                f"{path}: the auth entry for {host} is not base64 user:password", f"run docker login {host} again"
            ) from None
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None


def _from_helper(helper: str, host: str) -> Credentials | None:
    """``docker-credential-HELPER get``, the credential helper protocol."""
    exe = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([exe, "get"], input=host, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise ConfigError(
            f"the docker configuration names the credential helper {exe!r}, which is not installed",
            "install it, or remove it from the docker configuration",
        ) from None
    except subprocess.TimeoutExpired:
        raise StoreError(f"{exe} did not answer within 30 s") from None
    if proc.returncode != 0:
        return None  # the helper has nothing for this host ("credentials not found")
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer.get("Username", ""), answer.get("Secret", "")
    except (ValueError, AttributeError):
        raise StoreError(f"{exe} answered something that is not its JSON") from None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(user, secret)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def _scope_key(request: httpx.Request) -> tuple[str, str] | None:
    """(repository, "pull" or "push") of a request to the distribution API."""
    m = _REPO_PATH.match(request.url.path)
    if not m:
        return None
    return m.group(1), "pull" if request.method in ("GET", "HEAD") else "push"


class RegistryAuth(httpx.Auth):
    """The registry's challenge, answered (see the module doc). One per registry host,
    shared by every thread of a store."""

    def __init__(self, host: str, credentials: Credentials | None, *, verify: bool | str = True) -> None:
        self.host = host
        self.credentials = credentials
        self.verify = verify
        self._basic = False
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._fetching = threading.Lock()

    # -- the flow ----------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        ours = request.url.host == urlsplit(f"//{self.host}").hostname
        if ours:
            self._attach(request)
        response = yield request
        if response.status_code != 401 or not ours:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or request.headers.get("Authorization") == self.credentials.basic:
                return  # nothing (more) to offer: the caller reports the 401
            if request.url.scheme != "https" and not is_loopback(self.host):
                raise StoreError(
                    f"the registry {self.host} asks for the password over plain HTTP",
                    "serve it over HTTPS (and drop ?insecure=true from the store URL)",
                )
            self._basic = True
        elif scheme == "bearer" and params.get("realm"):
            key = _scope_key(request)
            with self._fetching:
                # Threads that met the challenge together ask the token service once:
                # the ones after the first take the token it cached.
                token = self._cached(key) if key is not None else None
                if token is None or request.headers.get("Authorization") == f"Bearer {token}":
                    token, ttl = self._fetch_token(params)
                    if key is not None:
                        with self._lock:
                            self._tokens[key] = (token, time.monotonic() + ttl - TOKEN_MARGIN)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
            return
        else:
            return
        self._attach(request)
        yield request

    def _attach(self, request: httpx.Request) -> None:
        if self._basic and self.credentials is not None:
            request.headers["Authorization"] = self.credentials.basic
            return
        key = _scope_key(request)
        token = self._cached(key) if key is not None else None
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"

    def _cached(self, key: tuple[str, str]) -> str | None:
        now = time.monotonic()
        with self._lock:
            # A push token also allows pulling from the same repository.
            for k in (key, (key[0], "push")):
                hit = self._tokens.get(k)
                if hit and hit[1] > now:
                    return hit[0]
        return None

    # -- the token service -------------------------------------------------------------

    def pull_token(self, repository: str, base_url: str) -> tuple[str, float] | None:
        """A token that lets its bearer pull ``repository`` and nothing else, with its
        lifetime in seconds; None when the registry does not use tokens (anonymous or
        Basic). For nodes: never the publisher's own credentials."""
        with httpx.Client(verify=self.verify, timeout=30, trust_env=True) as http:
            r = http.get(f"{base_url}/v2/")
        scheme, params = parse_challenge(r.headers.get("WWW-Authenticate", ""))
        if r.status_code != 401 or scheme != "bearer" or not params.get("realm"):
            return None
        params["scope"] = f"repository:{repository}:pull"
        return self._fetch_token(params)

    def _fetch_token(self, params: dict[str, str]) -> tuple[str, float]:
        realm = params["realm"]
        u = urlsplit(realm)
        if u.scheme != "https" and not is_loopback(u.netloc):
            raise StoreError(
                f"the registry {self.host} sends credentials to {realm} over plain HTTP",
                "fix the registry's token realm (https)",
            )
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        creds = self.credentials
        try:
            with httpx.Client(verify=self.verify, timeout=30, trust_env=True) as http:
                if creds is not None and creds.identity_token:
                    form = {
                        "grant_type": "refresh_token",
                        "refresh_token": creds.identity_token,
                        "client_id": "weightship",
                    }
                    r = http.post(realm, data={**form, **query})
                else:
                    headers = {"Authorization": creds.basic} if creds is not None else {}
                    r = http.get(realm, params=query, headers=headers)
        except httpx.HTTPError as e:
            raise StoreError(
                f"cannot reach the token service {realm} of {self.host}: {type(e).__name__}",
                "check the network",
            ) from None
        if r.status_code in (401, 403):
            who = "the credentials" if creds is not None else "anonymous access"
            raise StoreError(
                f"the token service of {self.host} refused {who} ({r.status_code}) for {query.get('scope', 'access')}",
                f"run docker login {self.host} (or set DOCKER_CONFIG) with an account allowed to do this",
            )
        if r.status_code != 200:
            raise StoreError(f"the token service of {self.host} answered HTTP {r.status_code}")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
            ttl = float(body.get("expires_in") or TOKEN_DEFAULT_TTL)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise StoreError(f"the token service of {self.host} answered without a token")
        return token, ttl


__all__ = [
    "Credentials",
    "RegistryAuth",
    "docker_config_path",
    "is_loopback",
    "load_credentials",
    "parse_challenge",
]
