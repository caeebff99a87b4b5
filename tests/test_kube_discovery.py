"""Fleet discovery from Kubernetes: a region written as ``kubernetes = { … }`` is the
Running and Ready agent pods of a namespace, found through the API with the user's
kubeconfig. The API is a stand-in (tests/kubeapi.py) whose pods point at real agents on
loopback addresses (127.0.0.1, 127.0.0.2: one pod IP each, one port, one token, as a
DaemonSet's pods have)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleetkit import cli_json, node_toml, publish, start_agents
from tests.helpers import error_line, run_cli
from tests.kubeapi import KubeApi
from tests.servers import free_port
from tests.test_json_schemas import errors

SELECTOR = "app.kubernetes.io/name=weightship-agent"


def _toml(tmp_path: Path, store: str, pub: Path, kubernetes: str) -> Path:
    path = tmp_path / "weightship.toml"
    path.write_text(
        f'[store]\nurl = "{store}"\n\n[policy]\nkeys = ["{pub}"]\n\n[regions.gpu]\nkubernetes = {kubernetes}\n'
    )
    return path


def test_warm_status_gc_and_ls_find_the_agents_through_the_api(tmp_path: Path, keypair, kube: KubeApi, minilm) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    publish(minilm, "minilm:1.0", store, key, tags=["prod"])
    port, token = free_port(), "t" * 32
    places = [("127.0.0.1", None), ("127.0.0.2", None)]
    dirs = [tmp_path / "agent-a", tmp_path / "agent-b"]
    policy = node_toml(tmp_path / "node.toml", pub)
    agents = start_agents(dirs, policy, {}, store=store, places=places, port=port, token=token)
    try:
        (tmp_path / "agent.token").write_text(token + "\n")
        env = {"KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig"))}
        _toml(
            tmp_path,
            store,
            pub,
            f'{{ namespace = "weightship", selector = "{SELECTOR}", port = {port}, token_file = "agent.token" }}',
        )
        kube.add_pod("weightship-agent-aaaaa", "gpu-a", "127.0.0.1")
        # Not for the fleet: a pod not yet Ready, one Pending, another app's, another namespace's.
        kube.add_pod("weightship-agent-ccccc", "gpu-c", "127.0.0.3", ready=False)
        kube.add_pod("weightship-agent-ddddd", "gpu-d", "", phase="Pending", ready=False)
        kube.add_pod("vllm-0", "gpu-a", "127.0.0.9", namespace="weightship", labels={"app": "vllm"})
        kube.add_pod("weightship-agent-eeeee", "gpu-e", "127.0.0.5", namespace="other")

        def cli(*args: str):
            return run_cli(*args, cwd=tmp_path, env=env)

        proc = cli("warm", "minilm:prod", "--region", "gpu", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [(n["node"], n["state"]) for n in cli_json(proc)["nodes"]] == [("gpu-a", "ready")]
        listed = kube.calls("GET")
        assert listed and listed[-1].path == "/api/v1/namespaces/weightship/pods"
        assert listed[-1].query["labelSelector"] == [SELECTOR]
        assert (agents[0].cache / "models" / "minilm" / "prod" / "model.safetensors").is_file()

        # The autoscaler adds a GPU node; its agent's pod turns Ready: no edit of weightship.toml.
        kube.add_pod("weightship-agent-bbbbb", "gpu-b", "127.0.0.2")
        proc = cli("status", "minilm:prod", "--region", "gpu", "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        states = {n["node"]: n["state"] for n in cli_json(proc)["nodes"]}
        assert states == {"gpu-a": "ready", "gpu-b": "absent"}, states
        proc = cli("warm", "minilm:prod", "--region", "gpu")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = cli("status", "minilm:prod", "--json")  # every region
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert {n["node"]: n["state"] for n in cli_json(proc)["nodes"]} == {"gpu-a": "ready", "gpu-b": "ready"}
        assert (agents[1].cache / "models" / "minilm" / "prod" / "model.safetensors").is_file()

        proc = cli("fleet", "ls", "--json")
        assert proc.returncode == 0, proc.stderr
        nodes = json.loads(proc.stdout)["regions"]["gpu"]["nodes"]
        assert [(n["name"], n["transport"]) for n in nodes] == [
            ("gpu-a", f"agent://127.0.0.1:{port}"),
            ("gpu-b", f"agent://127.0.0.2:{port}"),
        ]
        assert nodes[1]["labels"] == {"pod": "weightship-agent-bbbbb", "kubernetes-node": "gpu-b"}
        proc = cli("gc", "--region", "gpu", "--dry-run")
        assert proc.returncode == 0 and "gpu-a" in proc.stdout and "gpu-b" in proc.stdout, proc.stdout + proc.stderr
        # Only pods were read, and only in the region's namespace.
        assert {(c.method, c.path) for c in kube.calls()} == {("GET", "/api/v1/namespaces/weightship/pods")}
    finally:
        for a in agents:
            a.stop()


def test_api_and_credential_failures_are_one_line(tmp_path: Path, keypair, kube: KubeApi) -> None:
    _, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    (tmp_path / "agent.token").write_text("t" * 32)
    good = kube.kubeconfig(tmp_path / "kubeconfig")
    _toml(tmp_path, store, pub, '{ token_file = "agent.token" }')

    def status(env: dict[str, str]):
        return run_cli("status", "--region", "gpu", cwd=tmp_path, env={"KUBERNETES_SERVICE_HOST": "", **env})

    # The API refuses (no Role to list pods): exit 1, the server's reason, what to check.
    kube.mode = "forbidden"
    proc = status({"KUBECONFIG": str(good)})
    assert proc.returncode == 1 and "403 forbidden" in error_line(proc) and "namespace weightship" in error_line(proc)
    # No Ready agent pod: exit 1, saying which selector found nothing.
    kube.mode = None
    proc = status({"KUBECONFIG": str(good)})
    assert proc.returncode == 1 and "no Running and Ready pods match" in error_line(proc)
    # A wrong token in the kubeconfig.
    proc = status({"KUBECONFIG": str(kube.kubeconfig(tmp_path / "bad-kubeconfig", token="wrong"))})
    assert proc.returncode == 1 and "401" in error_line(proc)
    # The API server is gone.
    proc_env = {"KUBECONFIG": str(good)}
    kube.stop()
    proc = status(proc_env)
    assert proc.returncode == 1 and "cannot reach the API server" in error_line(proc)
    # No kubeconfig at all: a configuration problem, exit 2.
    proc = status({"KUBECONFIG": str(tmp_path / "nowhere.yaml")})
    assert proc.returncode == 2 and "nowhere.yaml not found" in error_line(proc)
    # A context the kubeconfig does not have.
    _toml(tmp_path, store, pub, '{ token_file = "agent.token", context = "prod-cluster" }')
    proc = status({"KUBECONFIG": str(good)})
    assert proc.returncode == 2 and "prod-cluster" in error_line(proc)


@pytest.mark.parametrize(
    ("kubernetes", "expect"),
    [
        ('{ namespce = "weightship", token_file = "agent.token" }', "did you mean namespace?"),
        ('{ selector = "app in (a", token_file = "agent.token" }', "is not a label requirement"),
        ('{ namespace = "Weight_Ship", token_file = "agent.token" }', "not a Kubernetes namespace name"),
        ('{ port = 0, token_file = "agent.token" }', "from 1 to 65535"),
        ('{ namespace = "weightship" }', "token_file"),
        ('"weightship"', "must be a table"),
    ],
)
def test_kubernetes_region_is_checked_strictly(tmp_path: Path, kubernetes: str, expect: str) -> None:
    (tmp_path / "weightship.toml").write_text(f"[regions.gpu]\nkubernetes = {kubernetes}\n")
    # Checked before any API call: no kubeconfig is needed to be told.
    proc = run_cli("fleet", "ls", cwd=tmp_path, env={"KUBECONFIG": str(tmp_path / "none")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert expect in line and "weightship.toml:2" in line, line


def test_kubernetes_table_header_and_both_kinds_refused(tmp_path: Path) -> None:
    (tmp_path / "weightship.toml").write_text(
        '[regions.gpu.kubernetes]\nnamespace = "weightship"\ntoken_fil = "agent.token"\n'
    )
    proc = run_cli("fleet", "ls", cwd=tmp_path)
    assert proc.returncode == 2 and "weightship.toml:3" in error_line(proc)
    assert "did you mean token_file?" in error_line(proc)
    (tmp_path / "weightship.toml").write_text(
        '[regions.gpu]\nkubernetes = { token_file = "t" }\n[[regions.gpu.nodes]]\nname = "a"\ntransport = "local"\n'
        'cache = "c"\n'
    )
    proc = run_cli("fleet", "ls", cwd=tmp_path)
    assert proc.returncode == 2 and "not both" in error_line(proc)


def test_node_names_and_addresses_from_pods(tmp_path: Path, kube: KubeApi) -> None:
    """A node is named after its Kubernetes node; a name too long for a fleet node name is
    shortened with a hash (two long names never meet); an IPv6 pod IP is bracketed."""
    (tmp_path / "agent.token").write_text("t" * 32)
    (tmp_path / "weightship.toml").write_text(
        '[regions.gpu]\nkubernetes = { token_file = "agent.token", port = 7443, ca = "ca.pem" }\n'
    )
    long = "ip-10-0-0-1.us-west-2.compute.internal.gpu-pool-with-a-very-long-name-"
    kube.add_pod("weightship-agent-1", long + "a", "fd00::1")
    kube.add_pod("weightship-agent-2", long + "b", "10.0.0.2")
    # A rollout left two pods on one node: the newer one is the node's agent.
    kube.add_pod("weightship-agent-3", "gpu-c", "10.0.0.3", created="2026-01-01T00:00:00Z")
    kube.add_pod("weightship-agent-4", "gpu-c", "10.0.0.4", created="2026-02-01T00:00:00Z")
    env = {"KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig"))}
    proc = run_cli("fleet", "ls", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)["regions"]["gpu"]["nodes"]
    by_pod = {n["labels"]["pod"]: n for n in nodes}
    assert set(by_pod) == {"weightship-agent-1", "weightship-agent-2", "weightship-agent-4"}
    a, b = by_pod["weightship-agent-1"], by_pod["weightship-agent-2"]
    assert a["name"] != b["name"] and len(a["name"]) <= 64 and len(b["name"]) <= 64
    assert a["labels"]["kubernetes-node"] == long + "a"
    assert a["transport"] == "agent://[fd00::1]:7443" and b["transport"] == "agent://10.0.0.2:7443"
    assert by_pod["weightship-agent-4"]["name"] == "gpu-c"
    assert a["ca"] == str(tmp_path / "ca.pem")
    assert "t" * 32 not in proc.stdout  # the token is never printed
    # Where the agents were looked for, beside them.
    doc = json.loads(proc.stdout)
    assert not errors(doc, "weightship.fleet-ls/v1")
    assert doc["regions"]["gpu"]["kubernetes"] == {
        "namespace": "weightship",
        "selector": SELECTOR,
        "port": 7443,
        "token_file": str(tmp_path / "agent.token"),
        "ca": str(tmp_path / "ca.pem"),
        "context": None,
        "kubeconfig": None,
    }
    text = run_cli("fleet", "ls", cwd=tmp_path, env=env)
    assert text.returncode == 0, text.stderr
    head = text.stdout.splitlines()[0]
    assert head.startswith(f"gpu  (kubernetes: namespace weightship, selector {SELECTOR}, port 7443, token_file "), head
    assert "gpu-c" in text.stdout


def test_fleet_ls_never_prints_an_inline_token(tmp_path: Path, kube: KubeApi) -> None:
    secret = "s" * 32
    (tmp_path / "weightship.toml").write_text(
        f'[regions.gpu]\nkubernetes = {{ namespace = "agents", token = "{secret}", context = "lab" }}\n'
    )
    kube.add_pod("weightship-agent-1", "gpu-a", "10.0.0.1", namespace="agents")
    env = {"KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig", context="lab"))}
    proc = run_cli("fleet", "ls", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert not errors(doc, "weightship.fleet-ls/v1")
    kube_doc = doc["regions"]["gpu"]["kubernetes"]
    assert kube_doc["token_file"] is None and kube_doc["context"] == "lab" and kube_doc["namespace"] == "agents"
    assert [n["name"] for n in doc["regions"]["gpu"]["nodes"]] == ["gpu-a"]
    text = run_cli("fleet", "ls", cwd=tmp_path, env=env)
    assert text.returncode == 0, text.stderr
    assert "context lab" in text.stdout
    assert secret not in proc.stdout + proc.stderr + text.stdout + text.stderr
