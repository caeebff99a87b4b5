"""Agents over TLS, and the agent's start-up defects: real ``weightship agent serve``
processes on loopback with a throwaway CA (tests.fleetkit.make_tls), the real CLI.

* ``agent serve --tls-cert/--tls-key`` serves HTTPS only; ``--tls-ca`` is what its peers'
  certificates must chain to; a fleet node (or region) with ``ca`` is reached over HTTPS,
  checked against that CA, and handed to its peers as an https:// URL.
* a port in use, a malformed peer token, a non-loopback address without TLS, a missing
  --policy, --store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleetkit import (
    Agent,
    Tls,
    cli_json,
    fleet_toml,
    make_tls,
    model,
    node_toml,
    publish,
    source_files,
    start_agents,
    tree,
)
from tests.helpers import error_line, run_cli
from tests.servers import free_port
from weightship.node.protocol import peer_token


@dataclasses.dataclass
class Lab:
    root: Path
    store: str
    key: Path
    pub: Path
    tls: Tls
    policy: Path

    def publish(self, seed: int, ref: str) -> Path:
        src = model(self.root / "models", seed)
        publish(src, ref, self.store, self.key, tags=["prod"])
        return src

    def work(self, name: str, text: str) -> Path:
        d = self.root / "work" / name
        d.mkdir(parents=True)
        (d / "weightship.toml").write_text(text)
        return d


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    from weightship.trust.signers import generate_key

    root = tmp_path_factory.mktemp("tls")
    key = root / "release.pem"
    pub = generate_key(key)
    (root / "store").mkdir()
    return Lab(
        root,
        f"file://{root / 'store'}",
        key,
        pub,
        make_tls(root / "pki"),
        node_toml(root / "node.toml", pub),
    )


@pytest.fixture
def agents(request) -> list[Agent]:
    """Agents a test starts through ``agents.append``; stopped by PID afterwards."""
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in doc["nodes"]}


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- HTTPS end to end ----------------------------------------------------------------------


def test_tls_agents_warm_over_https_and_relay_to_each_other_over_tls(lab: Lab, agents: list[Agent]) -> None:
    agents += start_agents([lab.root / "a1", lab.root / "a2"], lab.policy, {}, store=lab.store, tls=lab.tls)
    for a in agents:
        assert a.url.startswith("https://")
        log = (a.dir / "agent.log").read_text()
        assert f"on https://{a.address}" in log and "clear text" not in log and "no --policy" not in log, log
        # HTTPS only: plain HTTP on the same port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{a.address}/v1/health", headers=_headers(a.token), timeout=5)
        # And the certificate is checked: a client that does not trust the CA is refused.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{a.url}/v1/health", headers=_headers(a.token), timeout=5)

    # The region's ca, relative to the fleet file as token_file is; agent-2's own ca wins
    # over it (the same CA, through another path).
    (lab.root / "work").mkdir(exist_ok=True)
    other_path = lab.root / "work" / "same-ca.pem"
    other_path.write_bytes(lab.tls.ca.read_bytes())
    text = (
        f'[store]\nurl = "{lab.store}"\n[policy]\nkeys = ["{lab.pub}"]\n'
        f'[regions.tls]\nca = "../../pki/ca.pem"\n'
        f'[[regions.tls.nodes]]\nname = "agent-1"\ntransport = "agent://{agents[0].address}"\n'
        f'token_file = "{agents[0].dir / "token"}"\n'
        f'[[regions.tls.nodes]]\nname = "agent-2"\ntransport = "agent://{agents[1].address}"\n'
        f'token_file = "{agents[1].dir / "token"}"\nca = "{other_path}"\n'
    )
    work = lab.work("https", text)
    fl = run_cli("fleet", "ls", "--json", cwd=work)
    assert fl.returncode == 0, fl.stderr
    nodes = {n["name"]: n for n in cli_json(fl)["regions"]["tls"]["nodes"]}
    assert nodes["agent-1"]["ca"] == str(work / "../../pki/ca.pem")
    assert Path(nodes["agent-1"]["ca"]).resolve() == lab.tls.ca.resolve()
    assert nodes["agent-2"]["ca"] == str(other_path)

    src = lab.publish(1, "tls1:1.0")
    proc = run_cli("warm", "tls1:prod", "--region", "tls", "--json", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = cli_json(proc)
    assert doc["ready"] == 2, doc
    total = sum(len(v) for v in source_files(src).values())
    by = _by_name(doc)
    # Each agent fetched about half from the store and the rest from the other agent,
    # which serves HTTPS only: the peer URLs were https:// and verified against --tls-ca.
    assert sum(sum(n["bytes_from_peers"].values()) for n in by.values()) > 0, doc
    for n in by.values():
        assert n["state"] == "ready" and n["verified"] and not n["bad_peers"], n
    for a in agents:
        got = {k: v for k, v in tree(a.cache / "models" / "tls1" / "prod").items() if k != "model.sig"}
        assert got == source_files(src)
    assert total > 0

    status = run_cli("status", "tls1:prod", "--region", "tls", "--require", "all", "--json", cwd=work)
    assert status.returncode == 0, status.stdout + status.stderr
    assert cli_json(status)["ready"] == 2


def test_an_agent_checks_its_peers_certificates_against_tls_ca(lab: Lab, agents: list[Agent]) -> None:
    """Without --tls-ca the agent trusts only the system's roots: the private CA's peer is
    refused, and the blob comes from the store instead. The peer URL is https://."""
    untrusting = dataclasses.replace(lab.tls, trust_peers=False)
    agents += start_agents([lab.root / "b1"], lab.policy, {}, store=lab.store, tls=lab.tls)
    agents += start_agents([lab.root / "b2"], lab.policy, {}, store=lab.store, tls=untrusting)
    work = lab.work("peer-ca", fleet_toml({"pair": [agents[0].node("b1"), agents[1].node("b2")]}, lab.store, lab.pub))
    lab.publish(2, "tls2:1.0")
    proc = run_cli("warm", "tls2:prod", "--region", "pair", "--json", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = _by_name(cli_json(proc))
    assert by["b1"]["state"] == by["b2"]["state"] == "ready"
    assert sum(by["b1"]["bytes_from_peers"].values()) > 0 and not by["b1"]["bad_peers"], by["b1"]
    assert not sum(by["b2"]["bytes_from_peers"].values()), by["b2"]
    errors = " ".join(p["error"] for p in by["b2"]["bad_peers"])
    assert by["b2"]["bad_peers"] and "CERTIFICATE_VERIFY_FAILED" in errors, by["b2"]


def test_fleet_ca_must_match_the_agents_certificate(lab: Lab, agents: list[Agent]) -> None:
    agents += start_agents([lab.root / "c1"], lab.policy, {}, store=lab.store, tls=lab.tls)
    a = agents[0]
    stranger = make_tls(lab.root / "pki-stranger")
    wrong = {**a.node("c1"), "ca": str(stranger.ca)}
    plain = {k: v for k, v in a.node("c1").items() if k != "ca"}
    work = lab.work("mismatch", fleet_toml({"wrong": [wrong], "plain": [plain]}, lab.store, lab.pub))

    proc = run_cli("status", "--region", "wrong", "--json", cwd=work)
    assert proc.returncode != 0
    node = cli_json(proc)["nodes"][0]
    assert node["state"] == "unreachable", node
    text = json.dumps(node)
    assert "does not verify against ca" in text and str(stranger.ca) in text, node

    # A node without ca is spoken to in plain HTTP, which a TLS agent does not answer:
    # the error says what to set.
    proc = run_cli("status", "--region", "plain", "--json", cwd=work)
    assert proc.returncode != 0
    node = cli_json(proc)["nodes"][0]
    assert node["state"] == "unreachable" and "set ca for this node" in json.dumps(node), node


def test_fleet_file_ca_is_for_agent_nodes(lab: Lab) -> None:
    ssh = {"name": "s", "transport": "ssh://root@127.0.0.1:22", "cache": "/nvme/w", "ca": "ca.pem"}
    work = lab.work("ca-ssh", fleet_toml({"r": [ssh]}))
    proc = run_cli("fleet", "ls", cwd=work)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "regions.r.nodes[0].ca" in line and "only agent nodes" in line, line

    agent = {"name": "a", "transport": "agent://127.0.0.1:7070", "token": "x" * 20, "ca": 3}
    work = lab.work("ca-type", fleet_toml({"r": [agent]}))
    proc = run_cli("fleet", "ls", cwd=work)
    assert proc.returncode == 2 and "ca" in error_line(proc)

    # A region's ca concerns its agents; its ssh nodes stay as they are.
    work = lab.work(
        "ca-region",
        '[regions.r]\nca = "pki/ca.pem"\n'
        '[[regions.r.nodes]]\nname = "s"\ntransport = "ssh://root@127.0.0.1:22"\ncache = "/nvme/w"\n'
        '[[regions.r.nodes]]\nname = "a"\ntransport = "agent://127.0.0.1:7070"\ntoken = "xxxxxxxxxxxxxxxxxxxx"\n',
    )
    proc = run_cli("fleet", "ls", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    nodes = {n["name"]: n for n in cli_json(proc)["regions"]["r"]["nodes"]}
    assert "ca" not in nodes["s"] and nodes["a"]["ca"] == str(work / "pki" / "ca.pem")


# -- start-up ------------------------------------------------------------------------------


def _serve(args: list[str], tls: Tls | None = None, timeout: float = 30) -> tuple[int, str]:
    """Start ``agent serve ARGS``, wait until it answers on loopback, stop it; return
    (port, its stderr)."""
    port = free_port()
    listen = args.pop(args.index("--listen") + 1).replace("PORT", str(port))
    args.remove("--listen")
    cmd = [sys.executable, "-m", "weightship", "agent", "serve", "--listen", listen, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + timeout
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/health"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(url, timeout=1, verify=tls.context() if tls else True)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"agent did not come up: {proc.communicate(timeout=10)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    return port, err


def _args(cache: Path, token: Path, listen: str) -> list[str]:
    return ["--cache", str(cache), "--token-file", str(token), "--listen", listen]


def _token(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "token").write_text("t" * 24 + "\n")
    return d / "token"


def test_startup_warnings_clear_text_and_no_policy(lab: Lab, tmp_path: Path) -> None:
    token = _token(tmp_path)
    # Every address, no TLS, no policy: two warnings, one line each, after the serving line.
    port, err = _serve(_args(tmp_path / "c1", token, "0.0.0.0:PORT"))
    lines = err.splitlines()
    assert lines[0].startswith("weightship agent ") and f"on http://0.0.0.0:{port}" in lines[0], err
    clear = [ln for ln in lines if "clear text" in ln]
    assert len(clear) == 1 and clear[0].startswith("warning: ") and "--tls-cert" in clear[0], err
    assert "token" in clear[0] and "blobs" in clear[0]
    policy = [ln for ln in lines if "no --policy" in ln]
    assert policy == [
        "warning: no --policy: this agent accepts unsigned releases and any signer;"
        " pass --policy weightship.toml with a [policy] naming the keys or identities to trust"
    ], err

    # Loopback with a policy: nothing to warn about.
    _, err = _serve([*_args(tmp_path / "c2", token, "127.0.0.1:PORT"), "--policy", str(lab.policy)])
    assert "warning:" not in err and "serving" in err, err

    # Every address with TLS: the token is not in clear text.
    tls = ["--tls-cert", str(lab.tls.cert), "--tls-key", str(lab.tls.key)]
    _, err = _serve([*_args(tmp_path / "c3", token, "0.0.0.0:PORT"), "--policy", str(lab.policy), *tls], tls=lab.tls)
    assert "warning:" not in err and "on https://0.0.0.0:" in err, err

    # A --policy file without a [policy] is no policy either.
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    _, err = _serve([*_args(tmp_path / "c4", token, "127.0.0.1:PORT"), "--policy", str(empty)])
    assert f"warning: --policy {empty} has no [policy]" in err and "accepts unsigned releases" in err, err


def test_port_in_use_is_one_error_and_nothing_claimed(tmp_path: Path) -> None:
    token = _token(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(
            "agent", "serve", "--cache", tmp_path / "c", "--token-file", token, "--listen", f"127.0.0.1:{port}"
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert f"port {port} is in use" in line and "--listen" in line, line
    assert "serving" not in proc.stdout + proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [line]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "KEY"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "CERT", "--tls-key", "MISSING"], "--tls-key"),
        (["--tls-cert", "CERT", "--tls-key", "OTHERKEY"], "cannot use --tls-cert"),
        (["--tls-cert", "CERT", "--tls-key", "ENCRYPTED"], "--tls-key is encrypted"),
        (["--tls-cert", "CERT", "--tls-key", "KEY", "--tls-ca", "NOTPEM"], "no PEM CA certificate"),
        (["--store", "file://"], "--store"),
    ],
)
def test_bad_tls_and_store_options_are_usage_errors(lab: Lab, tmp_path: Path, args: list[str], says: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    enc = tmp_path / "enc.key"
    enc.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (tmp_path / "notpem").write_text("hello\n")
    other = make_tls(tmp_path / "other")
    subst = {
        "CERT": str(lab.tls.cert),
        "KEY": str(lab.tls.key),
        "OTHERKEY": str(other.key),
        "ENCRYPTED": str(enc),
        "NOTPEM": str(tmp_path / "notpem"),
        "MISSING": str(tmp_path / "missing"),
    }
    token = _token(tmp_path)
    port = free_port()
    proc = run_cli(
        "agent",
        "serve",
        "--cache",
        tmp_path / "c",
        "--token-file",
        token,
        "--listen",
        f"127.0.0.1:{port}",
        *[subst.get(a, a) for a in args],
        input="",  # an encrypted key must not make it wait for a passphrase
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in error_line(proc)
    assert "serving" not in proc.stderr


def test_agent_store_limits_file_sources(lab: Lab, agents: list[Agent]) -> None:
    """An agent reads file:// sources only inside its --store; without --store, none."""
    elsewhere = lab.root / "elsewhere"
    elsewhere.mkdir()
    agents += start_agents([lab.root / "d1"], lab.policy, {}, store=f"file://{elsewhere}")
    agents += start_agents([lab.root / "d2"], lab.policy, {})
    agents += start_agents([lab.root / "d3"], lab.policy, {}, store=lab.store)
    regions = {f"r{i}": [a.node(f"d{i}")] for i, a in enumerate(agents, 1)}
    work = lab.work("store", fleet_toml(regions, lab.store, lab.pub))
    lab.publish(3, "st:1.0")
    for region, says in (("r1", "outside this node's store"), ("r2", "does not read local files")):
        proc = run_cli("warm", "st:prod", "--region", region, "--json", "--no-peers", cwd=work)
        assert proc.returncode != 0
        node = cli_json(proc)["nodes"][0]
        assert node["state"] == "failed" and says in json.dumps(node), node
    proc = run_cli("warm", "st:prod", "--region", "r3", "--json", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cli_json(proc)["ready"] == 1


# -- peer tokens -----------------------------------------------------------------------------


def test_malformed_peer_tokens_are_401_not_500(lab: Lab, agents: list[Agent]) -> None:
    agents += start_agents([lab.root / "e1"], lab.policy, {})
    a = agents[0]
    blob = f"{a.url}/v1/blobs/sha256/{'0' * 64}"
    # A blob this node holds, for the Range check below.
    data = b"weights" * 1000
    held = hashlib.sha256(data).hexdigest()
    (a.cache / "blobs" / "sha256" / held).write_bytes(data)
    bad: list[bytes] = [
        b"Bearer peer.abc.def",
        b"Bearer peer.notanumber.x",
        b"Bearer peer..x",
        b"Bearer peer.1.2.3",
        "Bearer peer.\u00b2.x".encode(),  # str.isdigit() says yes, int() says no
        "Bearer peer.\u0663\u0663.x".encode(),  # Arabic-Indic digits
        b"Bearer peer." + b"9" * 5000 + b".x",  # more digits than int() converts
        b"Bearer peer.99999999999." + b"\xff\xfe",
        "Bearer peer.1.\u00e9".encode("latin-1"),
        b"Bearer peer.\xff.x",
        b"Bearer " + b"\xc3\xa9" * 40,
        peer_token("not-the-agent-token-xxxx", int(time.time()) + 600).encode().join([b"Bearer ", b""]),
        peer_token(a.token, int(time.time()) - 1).encode().join([b"Bearer ", b""]),  # expired
    ]
    with httpx.Client(timeout=10) as c:
        for value in bad:
            r = c.get(blob, headers=[(b"Authorization", value)])
            assert r.status_code == 401, (value[:40], r.status_code, r.text)
        # A valid peer token opens the blob endpoint (404: not here) and nothing else.
        good = peer_token(a.token, int(time.time()) + 600)
        assert c.get(blob, headers=_headers(good)).status_code == 404
        assert c.get(f"{a.url}/v1/health", headers=_headers(good)).status_code == 401
        # A Range too long for int() is refused as a bad range, not a crash.
        held_url = f"{a.url}/v1/blobs/sha256/{held}"
        r = c.get(held_url, headers={**_headers(a.token), "Range": "bytes=" + "9" * 5000 + "-"})
        assert r.status_code == 416, (r.status_code, r.text)
        r = c.get(held_url, headers={**_headers(good), "Range": "bytes=7-"})
        assert r.status_code == 206 and r.content == data[7:]
    assert a.proc.poll() is None
    assert "Traceback" not in (a.dir / "agent.log").read_text()
