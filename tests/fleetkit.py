"""Helpers for the fleet tests: publishing, config files, reading a node cache, and
real ``weightship agent serve`` processes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers import free_port
from weightship.demo import build_model


@dataclass(frozen=True)
class Tls:
    """A throwaway CA and a server certificate (with its key) signed by it."""

    ca: Path
    cert: Path
    key: Path
    ca_key: Path
    # An agent serving this certificate also trusts the CA for its peers (--tls-ca).
    trust_peers: bool = True

    def context(self) -> Any:
        """A client TLS context that trusts this CA only."""
        import ssl

        return ssl.create_default_context(cafile=str(self.ca))


def make_tls(d: Path, hosts: Iterable[str] = ("127.0.0.1", "::1", "localhost"), *, ca: Tls | None = None) -> Tls:
    """A CA (or ``ca``'s) and a server certificate for ``hosts`` (IP addresses and DNS
    names in subjectAltName), as an operator's private CA would issue to agents."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    def pem_key(k, path: Path) -> None:
        path.write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)

    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"weightship test CA {secrets.token_hex(4)}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        ca_path, ca_key_path = d / "ca.pem", d / "ca.key"
        ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        pem_key(ca_key, ca_key_path)
    else:
        ca_path, ca_key_path = ca.ca, ca.ca_key
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightship agent")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = d / "server.pem", d / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key(key, key_path)
    return Tls(ca_path, cert_path, key_path, ca_key_path)


@dataclass
class Agent:
    dir: Path
    port: int
    token: str
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    # Serving HTTPS with a certificate of this CA, when not None.
    tls: Tls | None = None

    @property
    def cache(self) -> Path:
        return self.dir / "cache"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    @property
    def verify(self) -> Any:
        """What an httpx client of this agent verifies its certificate with."""
        return self.tls.context() if self.tls else True

    def node(self, name: str) -> dict[str, Any]:
        """This agent as a fleet file's node table."""
        n = {"name": name, "transport": f"agent://{self.address}", "token_file": str(self.dir / "token")}
        if self.tls:
            n["ca"] = str(self.tls.ca)
        return n

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _spawn_agent(
    d: Path,
    policy: Path | None,
    env: dict[str, str],
    *,
    host: str = "127.0.0.1",
    netns: str | None = None,
    store: str | None = None,
    tls: Tls | None = None,
    port: int | None = None,
    token: str | None = None,
) -> Agent:
    """``host`` and ``netns``: listen on that address inside that network namespace
    (``ip netns exec`` keeps the PID), as bench/fanout.py does to put each node behind a
    link of its own. The port is free on this namespace's loopback; a fresh namespace has
    every port free. ``store``: the agent's --store (a file:// store's blobs are then
    sources it accepts); ``tls``: serve HTTPS with its certificate and trust its CA for
    peers. ``port`` and ``token``: these rather than a free port and a fresh token (the
    agents of a Kubernetes DaemonSet share both, each on its own pod IP)."""
    from tests.sshd import weightship_script

    d.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_urlsafe(24)
    (d / "token").write_text(token + "\n")
    (d / "token").chmod(0o600)
    port = port or free_port()
    log = open(d / "agent.log", "ab")  # noqa: SIM115 - the child owns it
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    full_env.update(env)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = ["ip", "netns", "exec", netns] if netns else []
    cmd += [weightship_script(), "agent", "serve", "--cache", str(d / "cache"), "--listen", listen]
    cmd += ["--token-file", str(d / "token")]
    if policy is not None:
        cmd += ["--policy", str(policy)]
    if store is not None:
        cmd += ["--store", store]
    if tls is not None:
        cmd += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        cmd += ["--tls-ca", str(tls.ca)] if tls.trust_peers else []
    try:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        log.close()
    return Agent(d, port, token, proc, host, tls)


def start_agents(
    dirs: list[Path],
    policy: Path | None,
    env: dict[str, str] | None = None,
    *,
    batch: int = 8,
    timeout: float = 60,
    places: list[tuple[str, str | None]] | None = None,
    store: str | None = None,
    tls: Tls | None = None,
    port: int | None = None,
    token: str | None = None,
) -> list[Agent]:
    """Start one agent process per directory and wait until each answers /v1/health.
    Started ``batch`` at a time: dozens of interpreters importing at once on a small
    machine would each take as long as all of them together. ``places``, one per
    directory: the (address, network namespace or None) each agent listens on.
    ``store``: the test's store, for each agent's --store (pass it for a file:// store:
    an agent accepts file:// sources only inside its own store); ``tls``: the agents
    serve HTTPS with that certificate; ``port``, ``token``: the same port and token for
    every agent (give each its own address in ``places``)."""
    import httpx

    agents: list[Agent] = []
    where: dict[Path, tuple[str, str | None]] = {}
    respawns = 0
    try:
        for i in range(0, len(dirs), batch):
            group = []
            for j, d in enumerate(dirs[i : i + batch], start=i):
                where[d] = places[j] if places else ("127.0.0.1", None)
                group.append(
                    _spawn_agent(
                        d,
                        policy,
                        env or {},
                        host=where[d][0],
                        netns=where[d][1],
                        store=store,
                        tls=tls,
                        port=port,
                        token=token,
                    )
                )
            agents += group
            deadline = time.monotonic() + timeout
            waiting = list(group)
            while waiting:
                a = waiting[0]
                if a.proc.poll() is not None:
                    log = (a.dir / "agent.log").read_text()
                    if ("is in use" in log or "address already in use" in log) and respawns < 5:
                        # free_port() found a port that was free then; another process
                        # (an outgoing connection's ephemeral port) took it meanwhile.
                        respawns += 1
                        (a.dir / "agent.log").rename(a.dir / f"agent.log.{respawns}")
                        b = _spawn_agent(
                            a.dir,
                            policy,
                            env or {},
                            host=where[a.dir][0],
                            netns=where[a.dir][1],
                            store=store,
                            tls=tls,
                            port=port,
                            token=token,
                        )
                        agents[agents.index(a)] = waiting[0] = b
                        continue
                    raise RuntimeError(f"agent exited: {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent on port {a.port} did not come up")
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(
                        f"{a.url}/v1/health",
                        headers={"Authorization": f"Bearer {a.token}"},
                        timeout=1,
                        verify=a.verify,
                    )
                    if r.status_code == 200:
                        waiting.pop(0)
                        continue
                time.sleep(0.05)
    except BaseException:
        for a in agents:
            a.stop()
        raise
    return agents


def start_agent(
    d: Path, policy: Path | None, env: dict[str, str], *, store: str | None = None, tls: Tls | None = None
) -> Agent:
    return start_agents([d], policy, env, store=store, tls=tls)[0]


def publish(model: Path, ref: str, store_url: str, key: Path | None = None, tags: Iterable[str] = ()) -> Any:
    from weightship import release
    from weightship.store import open_store
    from weightship.trust import signers as signing

    st = open_store(store_url)
    try:
        return release.publish(model, ref, st, tags_=list(tags), signer=signing.KeySigner(key) if key else None)
    finally:
        st.close()


def model(root: Path, seed: int, hidden: int = 256) -> Path:
    """A distinct small safetensors model per seed (about 1 MiB at hidden=256)."""
    return build_model(root / f"model-{seed}-{hidden}", seed=seed, hidden=hidden)


def node_toml(path: Path, pub: Path | None) -> Path:
    """A node's own weightship.toml: the policy it enforces, whatever a caller says."""
    path.write_text(f'[policy]\nkeys = ["{pub}"]\n' if pub else "")
    return path


def fleet_toml(regions: dict[str, list[dict[str, Any]]], store: str | None = None, pub: Path | None = None) -> str:
    out = []
    if store:
        out.append(f'[store]\nurl = "{store}"\n')
    if pub:
        out.append(f'[policy]\nkeys = ["{pub}"]\n')
    for name, nodes in regions.items():
        out.append(f"[regions.{name}]")
        for n in nodes:
            out.append(f"[[regions.{name}.nodes]]")
            out += [f"{k} = {json.dumps(v)}" for k, v in n.items()]
        out.append("")
    return "\n".join(out) + "\n"


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file below root (symlinks followed) with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def source_files(model_dir: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(model_dir).items() if k != "model.sig"}


def corrupt_largest_blob(store_root: Path, src: Path) -> str:
    """Flip a byte of the file store's copy of the model's largest file (so that a warm
    from it fails its sha256 check); return that file's path in the model."""
    largest = max((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = store_root / "blobs" / "sha256" / hashlib.sha256(largest.read_bytes()).hexdigest()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    return largest.relative_to(src).as_posix()


def on_disk(cache: Path) -> int:
    """Bytes a node holds for any release: verified blobs plus partial downloads."""
    total = 0
    for d in (cache / "blobs" / "sha256", cache / "state" / "partial"):
        if d.is_dir():
            total += sum(p.stat().st_size for p in d.iterdir())
    return total


def record(cache: Path, name: str, version: str) -> dict[str, Any] | None:
    p = cache / "state" / "releases" / name / version / "record.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None


def cli_json(proc) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def spawn_cli(*args, cwd: Path | None = None, env: dict | None = None):
    """Start ``weightship ARGS`` without waiting (for concurrent runs); text pipes."""
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "weightship", *map(str, args)],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def release_bytes_on_disk(cache: Path, manifest: dict[str, Any]) -> int:
    """Bytes of this release already on a node: whole blobs plus partial downloads."""
    total = 0
    for f in {f["sha256"]: f for f in manifest["files"]}.values():
        blob = cache / "blobs" / "sha256" / f["sha256"]
        part = cache / "state" / "partial" / f["sha256"]
        if blob.exists():
            total += f["size"]
        elif part.exists():
            total += min(part.stat().st_size, f["size"])
    return total


def unsafe_warm_request(path: str) -> dict:
    """A warm request whose (unsigned) manifest names ``path``: what an attacker would send."""
    manifest = {
        "schema": "weightship.manifest/v1",
        "name": "evil",
        "version": "1.0",
        "created": None,
        "signature": "unsigned",
        "ignore_paths": [],
        "files": [{"path": path, "size": 3, "sha256": "0" * 64}],
        "total_size": 3,
    }
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return {"protocol": 1, "manifest": base64.b64encode(body).decode(), "signature": None, "source": {"urls": {}}}
