"""Node labels: a real agent started with --kubernetes-node labels its Node with the
releases ready in its cache, against a stand-in of the API server (tests/kubeapi.py)
that records what it was sent."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.fleetkit import Agent, fleet_toml, model, node_toml, publish, start_agents
from tests.helpers import error_line, run_cli
from tests.kubeapi import KubeApi
from weightship.kube.labels import PREFIX, label_key, label_value

FOREIGN = {"kubernetes.io/hostname": "gpu-1", "team": "ml", "nvidia.com/gpu.present": "true"}
LABEL_PART = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def _ours(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith(PREFIX + "/")}


def _eventually(what: Callable[[], object], want: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got = what()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = what()
    assert got == want


def _agent(tmp_path: Path, kube: KubeApi, pub: Path, store: str, node: str = "gpu-1") -> Agent:
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    env = {"KUBECONFIG": str(kubeconfig), "WEIGHTSHIP_KUBERNETES_NODE": node}
    return start_agents([tmp_path / "agent"], node_toml(tmp_path / "node.toml", pub), env, store=store)[0]


def test_labels_follow_warms_tag_moves_and_withdrawals(tmp_path: Path, keypair, kube: KubeApi) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, 1), "m:1.0", store, key, tags=["prod"])
    # A label of ours that the cache no longer calls for (a cache wiped since): removed at start.
    kube.add_node("gpu-1", {**FOREIGN, f"{PREFIX}/gone.prod": "0.9"})
    agent = _agent(tmp_path, kube, pub, store)
    try:
        _eventually(lambda: kube.labels("gpu-1"), FOREIGN)
        (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": [agent.node("gpu-1")]}, store=store, pub=pub))

        def warm(*args: str) -> None:
            proc = run_cli("warm", *args, "--region", "lab", cwd=tmp_path)
            assert proc.returncode == 0, proc.stdout + proc.stderr

        warm("m:prod")
        _eventually(lambda: kube.labels("gpu-1"), {**FOREIGN, f"{PREFIX}/m.prod": "1.0"})

        # A second tag on the same release, then prod moves to a new version.
        warm("m:1.0", "--tag", "canary")
        _eventually(lambda: _ours(kube.labels("gpu-1")), {f"{PREFIX}/m.prod": "1.0", f"{PREFIX}/m.canary": "1.0"})
        publish(model(tmp_path, 2), "m:2.0", store, key, tags=["prod"])
        warm("m:prod")
        _eventually(lambda: _ours(kube.labels("gpu-1")), {f"{PREFIX}/m.prod": "2.0", f"{PREFIX}/m.canary": "1.0"})

        # A release warmed by version only is under no tag: no label for it.
        publish(model(tmp_path, 3), "m:3.0", store, key)
        warm("m:3.0")
        proc = run_cli("gc", "--region", "lab", "--keep", "0", cwd=tmp_path)
        assert proc.returncode == 0 and "m:3.0" in proc.stdout, proc.stdout + proc.stderr

        # Damage the release prod points at: status --verify withdraws it, its label goes.
        shard = next(p for p in (agent.cache / "models" / "m" / "2.0").rglob("*.safetensors"))
        blob = shard.resolve()
        blob.chmod(0o644)
        with open(blob, "r+b") as fh:
            fh.seek(100)
            fh.write(b"\xff\xfe")
        proc = run_cli("status", "m:prod", "--region", "lab", "--verify", cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        _eventually(lambda: _ours(kube.labels("gpu-1")), {f"{PREFIX}/m.canary": "1.0"})
        # A warm repairs it, and the label comes back.
        warm("m:prod")
        _eventually(lambda: _ours(kube.labels("gpu-1")), {f"{PREFIX}/m.prod": "2.0", f"{PREFIX}/m.canary": "1.0"})
    finally:
        agent.stop()
    assert kube.labels("gpu-1").items() >= FOREIGN.items()
    patches = kube.calls("PATCH")
    assert patches, "the agent never patched its node"
    for p in patches:
        # Merge patches of metadata.labels naming only our keys: foreign labels are never sent.
        assert p.content_type == "application/merge-patch+json"
        assert list(p.body) == ["metadata"] and list(p.body["metadata"]) == ["labels"]
        assert all(k.startswith(PREFIX + "/") for k in p.body["metadata"]["labels"]), p.body
    assert {p.path for p in kube.calls()} == {"/api/v1/nodes/gpu-1"}
    assert {p.method for p in kube.calls()} == {"GET", "PATCH"}
    # Exactly one PATCH per change, each naming only what changed (null: remove), in order:
    # a reconcile that changed nothing patched nothing.
    ours = lambda labels: {"metadata": {"labels": {f"{PREFIX}/{k}": v for k, v in labels.items()}}}  # noqa: E731
    assert [p.body for p in patches] == [
        ours({"gone.prod": None}),
        ours({"m.prod": "1.0"}),
        ours({"m.canary": "1.0"}),
        ours({"m.prod": "2.0"}),
        ours({"m.prod": None}),
        ours({"m.prod": "2.0"}),
    ]


def test_warming_goes_on_while_the_api_refuses_or_is_down(tmp_path: Path, keypair, kube: KubeApi) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    publish(model(tmp_path, 4), "m:1.0", store, key, tags=["prod"])
    kube.add_node("gpu-1", dict(FOREIGN))
    kube.mode = "forbidden"  # a ServiceAccount without the ClusterRoleBinding
    agent = _agent(tmp_path, kube, pub, store)
    log = agent.dir / "agent.log"
    try:
        (tmp_path / "weightship.toml").write_text(fleet_toml({"lab": [agent.node("gpu-1")]}, store=store, pub=pub))
        proc = run_cli("warm", "m:prod", "--region", "lab", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (agent.cache / "models" / "m" / "prod").is_dir()
        _eventually(lambda: "403 forbidden" in log.read_text(), True)
        assert kube.labels("gpu-1") == FOREIGN

        kube.stop()  # and now the API server is gone altogether
        publish(model(tmp_path, 5), "m:2.0", store, key, tags=["prod"])
        proc = run_cli("warm", "m:prod", "--region", "lab", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        kube.mode = None
        kube.start()
        # The next reconcile (a retry within RETRY_SECONDS) labels the node.
        _eventually(lambda: kube.labels("gpu-1"), {**FOREIGN, f"{PREFIX}/m.prod": "2.0"}, timeout=40)
        _eventually(lambda: "works again" in log.read_text(), True)
    finally:
        agent.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    warnings = [ln for ln in text.splitlines() if "cannot label node" in ln]
    # One line per distinct failure, however many retries: refused, then unreachable.
    assert 1 <= len(warnings) <= 3, warnings
    assert all("warming goes on" in ln for ln in warnings)


def test_agent_refuses_to_start_without_kubernetes_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("x" * 24)
    base = [
        "agent",
        "serve",
        "--cache",
        tmp_path / "cache",
        "--token-file",
        tmp_path / "token",
        "--listen",
        "127.0.0.1:1",
    ]
    env = {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    proc = run_cli(*base, "--kubernetes-node", "gpu-1", env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "kubeconfig" in error_line(proc) and "missing-kubeconfig" in error_line(proc)
    proc = run_cli(*base, "--kubernetes-node", "GPU_1!", env=env, timeout=60)
    assert proc.returncode == 2 and "not a Kubernetes node name" in error_line(proc)


NAMES = [
    ("llama-3-8b", "prod"),
    ("qwen2.5-7b-instruct", "canary"),
    ("a.b", "c"),
    ("a", "b.c"),
    ("m", "v1+cu12"),
    ("m", "v1-cu12"),
    ("m-", "prod"),
    ("m", "prod_"),
    ("x" * 128, "prod"),
    ("x" * 128, "canary"),
    ("x" * 127 + "y", "prod"),
    ("gpt", "v1-0123456789"),
]


def test_label_scheme_is_valid_kubernetes_and_collision_free() -> None:
    keys = [label_key(n, t) for n, t in NAMES]
    assert len(set(keys)) == len(keys), keys
    for k in keys:
        prefix, _, part = k.partition("/")
        assert prefix == PREFIX and LABEL_PART.match(part), k
    # Names that fit stay readable, so that a person can write the affinity by hand.
    assert label_key("llama-3-8b", "prod") == f"{PREFIX}/llama-3-8b.prod"
    assert label_key("qwen2.5-7b-instruct", "canary") == f"{PREFIX}/qwen2.5-7b-instruct.canary"
    # A tag with a '.' would make the split ambiguous ("a.b"+"c" vs "a"+"b.c"): hashed.
    assert label_key("a.b", "c") == f"{PREFIX}/a.b.c" and label_key("a", "b.c") != f"{PREFIX}/a.b.c"
    # A plain name that looks like a hashed one is hashed too, so the two kinds never meet.
    assert re.search(r"-[0-9a-f]{10}$", label_key("gpt", "v1-0123456789"))
    assert label_key("gpt", "v1-0123456789") != f"{PREFIX}/gpt.v1-0123456789"
    for v in ("1.0", "2024-06-01", "v1+cu12", "1.0-", "z" * 80):
        assert LABEL_PART.match(label_value(v)), v
    assert label_value("1.0") == "1.0"
    assert label_value("v1+cu12") != label_value("v1-cu12")
