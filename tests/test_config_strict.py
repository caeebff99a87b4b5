"""weightship.toml and policy files are checked, not skimmed: a misspelt table or key, or a
value of the wrong type, is a usage error (exit 2) naming the file and the dotted key. A typo
in [policy] must never read as "no policy", which would pull or warm unsigned releases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleetkit import publish
from tests.helpers import error_line, run_cli, tree_digest
from tests.servers import free_port


@pytest.fixture(scope="module")
def signed_store(tmp_path_factory) -> tuple[str, Path, Path]:
    """A file store holding demo:1.0 signed with release.pem and demo:unsigned, unsigned."""
    from weightship.demo import build_model
    from weightship.trust.signers import generate_key

    d = tmp_path_factory.mktemp("signed")
    key = d / "release.pem"
    pub = generate_key(key)
    model = build_model(d / "model", hidden=64)
    store = f"file://{d / 'store'}"
    publish(model, "demo:1.0", store, key)
    publish(model, "demo:unsigned", store)
    return store, key, pub


# Each: the config text, the dotted key the error must name, and words it must contain.
BAD_CONFIGS = {
    "unknown-table": ('[polcy]\nkeys = ["{pub}"]\n', "polcy", ["unknown table", "did you mean policy?"]),
    "unknown-policy-key": ('[policy]\nkey = ["{pub}"]\n', "policy.key", ["known: cert_chains", "policy.keys?"]),
    "dotted-policy-key": ('policy.kes = ["{pub}"]\n', "policy.kes", ["unknown key", "policy.keys?"]),
    "url-not-a-string": ('[store]\nurl = 5\n[policy]\nkeys = ["{pub}"]\n', "store.url", ["store URL", "not 5"]),
    "keys-not-a-list": ('[policy]\nkeys = "{pub}"\n', "policy.keys", ["a list of paths"]),
    "offline-not-a-bool": ('[policy]\nkeys = ["{pub}"]\noffline = "yes"\n', "policy.offline", ["true or false"]),
    "identity-typo": (
        '[policy]\nkeys = ["{pub}"]\nidentities = [{{ identiy = "me", issuer = "https://issuer" }}]\n',
        "policy.identities[0].identiy",
        ["known: identity, identity_regex, issuer", "did you mean policy.identities[0].identity?"],
    ),
    "identity-without-issuer": (
        '[policy]\nidentities = [{{ identity = "me" }}]\n',
        "policy.identities[0]",
        ["needs issuer"],
    ),
    "identity-bad-regex": (
        '[policy]\nidentities = [{{ identity_regex = "((", issuer = "https://issuer" }}]\n',
        "policy.identities[0].identity_regex",
        ["regular expression"],
    ),
    "key-outside-any-table": ('url = "file:///x"\n[policy]\nkeys = ["{pub}"]\n', "url", ["url under [store]"]),
    "signing-key-not-a-path": ('[signing]\nkey = ["a.pem"]\n[policy]\nkeys = ["{pub}"]\n', "signing.key", []),
    "node-key-typo": (
        '[policy]\nkeys = ["{pub}"]\n[[regions.lab.nodes]]\nname = "n"\ntransport = "local"\n'
        'cache = "/c"\ncahce = "/d"\n',
        "regions.lab.nodes[0].cahce",
        ["unknown field"],
    ),
    "regions-and-fleet": (
        '[policy]\nkeys = ["{pub}"]\n[[regions.a.nodes]]\nname = "n"\ntransport = "local"\ncache = "/c"\n'
        '[[fleet.regions.b.nodes]]\nname = "m"\ntransport = "local"\ncache = "/c"\n',
        "fleet",
        ["not both"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_stops_pull_before_it_writes(tmp_path: Path, signed_store, case: str) -> None:
    store, _, pub = signed_store
    text, dotted, words = BAD_CONFIGS[case]
    cfg = tmp_path / "weightship.toml"
    cfg.write_text(text.format(pub=pub))
    dest = tmp_path / "out"
    # demo:unsigned: with the policy read as written-but-misspelt, it would be pulled.
    proc = run_cli("pull", "demo:unsigned", dest, "--store", store, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert f"{cfg}:" in line, line
    assert f": {dotted}: " in line, line
    for w in words:
        assert w in line, line
    assert not dest.exists()


def test_bad_config_named_by_config_flag_names_its_line(tmp_path: Path, signed_store) -> None:
    store, _, pub = signed_store
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[store]\nurl = "{store}"\n\n[policy]\n# trusted signers\nkey = ["{pub}"]\n')
    proc = run_cli("--config", cfg, "pull", "demo:unsigned", tmp_path / "out")
    assert proc.returncode == 2
    assert f"{cfg}:6: policy.key: unknown key" in error_line(proc)
    assert not (tmp_path / "out").exists()


def test_valid_full_config_publishes_and_pulls_verified(tmp_path: Path, signed_store) -> None:
    """Every table and key the schema knows, in one file: accepted, and its policy enforced."""
    from weightship.demo import build_model
    from weightship.trust.signers import generate_key

    _, _, trusted_pub = signed_store
    gh = "https://token.actions.githubusercontent.com"
    (tmp_path / "keys").mkdir()
    generate_key(tmp_path / "keys" / "release.pem")
    (tmp_path / "weightship.toml").write_text(
        f"""\
[store]
url = "file://store"

[signing]
key = "keys/release.pem"

[policy]
keys = ["keys/release.pub", "{trusted_pub}"]
identities = [
  {{ identity = "https://github.com/acme/models/.github/workflows/publish.yml@refs/heads/main", issuer = "{gh}" }},
  {{ identity_regex = 'https://github\\.com/acme/models/.*', issuer = "{gh}" }},
]
offline = true
staging = false

[regions.lab]
[[regions.lab.nodes]]
name = "gpu-1"
transport = "local"
cache = "nodes/gpu-1"
"""
    )
    model = build_model(tmp_path / "model", hidden=64)
    proc = run_cli("publish", model, "m:1.0", cwd=tmp_path)  # signed with [signing] key
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("pull", "m:1.0", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "signature verified (key)" in proc.stdout
    pulled = tree_digest(tmp_path / "out")
    assert pulled.pop("model.sig") and pulled == tree_digest(model)
    # The policy is in force: an unsigned release is refused.
    assert run_cli("publish", model, "m:2.0", "--store", f"file://{tmp_path / 'store'}").returncode == 0
    proc = run_cli("pull", "m:2.0", tmp_path / "out2", cwd=tmp_path)
    assert proc.returncode == 1 and "unsigned" in error_line(proc)
    assert not (tmp_path / "out2").exists()
    assert run_cli("fleet", "ls", cwd=tmp_path).returncode == 0


def _bad_policy(tmp_path: Path, pub: Path) -> Path:
    bad = tmp_path / "BAD.toml"
    bad.write_text(f'[policy]\nkey = ["{pub}"]\n')
    return bad


def test_agent_with_bad_policy_refuses_to_start(tmp_path: Path, signed_store) -> None:
    _, _, pub = signed_store
    bad = _bad_policy(tmp_path, pub)
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    cmd = [sys.executable, "-m", "weightship", "agent", "serve", "--cache", str(tmp_path / "cache")]
    cmd += ["--listen", f"127.0.0.1:{free_port()}", "--token-file", str(token), "--policy", str(bad)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # It started serving: an agent that would warm unsigned releases. Stop it, then fail.
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the agent started with a misspelt policy: {err}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert done.returncode == 2, err
    line = error_line(done)
    assert f"{bad}:2: policy.key: unknown key" in line and "policy.keys?" in line, line
    assert not (tmp_path / "cache").exists()


def test_node_command_with_bad_policy_is_a_usage_error(tmp_path: Path, signed_store) -> None:
    _, _, pub = signed_store
    bad = _bad_policy(tmp_path, pub)
    proc = run_cli("node", "status", "demo:1.0", "--cache", tmp_path / "cache", "--policy", bad)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:2: policy.key" in error_line(proc)
