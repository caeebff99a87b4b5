"""deploy/kubernetes: the kustomize base, its TLS component and the vLLM example render
to objects that the Kubernetes 1.33 schemas accept in strict mode (kubernetes-validate),
and say what weightship expects: the agent's and ``node wait``'s command lines parse as
the real CLI's options, the readiness probe passes against a real agent (and fails with a
wrong token), the RBAC is nodes get/patch, and the example's node affinity names the
label the agent sets.

kubectl is not needed: the kustomizations are kept to what :func:`render` implements
(resources, namespace, images, components with JSON 6902 patches), and anything else in
them fails the test rather than being ignored. (``kubectl kustomize`` renders the same
objects.)
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fleetkit import start_agents
from tests.helpers import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "components", "patches"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pointer(doc: Any, path: str) -> tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, parts[-1]


def _json6902(obj: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parent, last = _pointer(obj, op["path"])
        if op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"render() does not implement JSON patch op {op['op']!r}")


def _patch(objects: list[dict[str, Any]], patches: list[dict[str, Any]]) -> None:
    for p in patches:
        assert set(p) == {"target", "patch"}, f"render() takes patches with target and patch: {p}"
        target = p["target"]
        hits = [
            o
            for o in objects
            if o["kind"] == target.get("kind", o["kind"])
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        assert hits, f"patch target {target} matches nothing"
        for o in hits:
            _json6902(o, yaml.safe_load(p["patch"]))


def render(root: Path, components: list[Path] = ()) -> list[dict[str, Any]]:
    """What ``kubectl kustomize ROOT`` prints, for the features these kustomizations use."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{root}/kustomization.yaml uses {unknown}, which render() does not implement"
    objects: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = root / res
        objects += render(path) if path.is_dir() else _docs(path)
    for comp in [*(root / c for c in k.get("components", [])), *components]:
        ck = yaml.safe_load((comp / "kustomization.yaml").read_text())
        assert ck["kind"] == "Component" and set(ck) <= KUSTOMIZATION_KEYS - {"components"}, ck
        assert not ck.get("resources"), "render() takes components of patches only"
        _patch(objects, ck.get("patches", []))
    _patch(objects, k.get("patches", []))
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
            for s in o.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    images = {i["name"]: i for i in k.get("images", [])}
    for o in objects:
        for c in _containers(o):
            name, _, tag = c["image"].partition(":")
            if name in images:
                c["image"] = f"{images[name].get('newName', name)}:{images[name].get('newTag', tag or 'latest')}"
    return objects


def _pod_spec(o: dict[str, Any]) -> dict[str, Any] | None:
    return o["spec"]["template"]["spec"] if o["kind"] in ("DaemonSet", "Deployment") else None


def _containers(o: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(o)
    return [*spec.get("initContainers", []), *spec["containers"]] if spec else []


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, (kind, name, [o["metadata"]["name"] for o in objects])
    return hits[0]


BASE = render(DEPLOY)
TLS = render(DEPLOY, [DEPLOY / "components" / "tls"])
EXAMPLE = render(DEPLOY / "examples" / "vllm")


@pytest.mark.parametrize(("what", "objects"), [("base", BASE), ("tls", TLS), ("vllm", EXAMPLE)])
def test_manifests_validate_against_kubernetes_1_33_strict(what: str, objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    assert objects
    for o in objects:
        kubernetes_validate.validate(o, "1.33.0", strict=True)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(set(names)) == len(names), names


def test_every_resource_file_validates_on_its_own() -> None:
    """Each file is valid as written (so an edit that kustomize would mask still fails)."""
    import kubernetes_validate

    files = [p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"]
    assert len(files) >= 6
    for path in files:
        for doc in _docs(path):
            kubernetes_validate.validate(doc, "1.33.0", strict=True)


def _parse(args: list[str]) -> dict[str, Any]:
    """``weightship ARGS`` parsed by the real CLI (nothing runs): the options it gets, or a
    click error naming an option or argument it does not take."""
    import typer

    from weightship.cli.app import app

    cmd: Any = typer.main.get_command(app)
    words, path = list(args), []
    while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
        path.append(words[0])
        cmd = cmd.commands[words.pop(0)]
    ctx = cmd.make_context(cmd.name, words)
    return {**ctx.params, "command": " ".join(path)}


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def test_agent_daemonset_runs_what_the_cli_takes() -> None:
    for objects in (BASE, TLS):
        ds = _one(objects, "DaemonSet", "weightship-agent")
        spec = _pod_spec(ds)
        (agent,) = spec["containers"]
        assert agent["args"][:2] == ["agent", "serve"]
        opts = _parse(agent["args"])
        assert opts["command"] == "agent serve"
        assert opts["kubernetes_node"] == "$(NODE_NAME)"  # the kubelet expands it
        assert opts["cache"] == "/cache" and opts["listen"] == "0.0.0.0:7070"
        env = {e["name"]: e for e in agent["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert spec["serviceAccountName"] == _one(objects, "ServiceAccount")["metadata"]["name"]
        assert agent["image"] == "registry.example.com/weightship:0.1.0"
        mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/cache"]]["hostPath"]["path"] == "/mnt/nvme/weightship"
        assert agent["resources"]["requests"]
    tls = _parse(_pod_spec(_one(TLS, "DaemonSet"))["containers"][0]["args"])
    assert str(tls["tls_cert"]).startswith("/etc/weightship/tls/") and tls["tls_key"] and tls["tls_ca"]


def test_rbac_is_get_and_patch_of_nodes_only() -> None:
    role = _one(BASE, "ClusterRole", "weightship-agent")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = _one(BASE, "ClusterRoleBinding", "weightship-agent")
    sa = _one(BASE, "ServiceAccount")
    assert binding["roleRef"]["name"] == "weightship-agent"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    discovery = _one(BASE, "Role", "weightship-discovery")
    assert discovery["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]


def test_example_requires_the_agents_label_and_waits_for_the_release() -> None:
    from weightship.kube.labels import label_key

    dep = _one(EXAMPLE, "Deployment")
    spec = _pod_spec(dep)
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = [e["key"] for t in terms for e in t["matchExpressions"]]
    assert keys == [label_key("llama-3-8b", "prod")]
    (init,) = spec["initContainers"]
    opts = _parse(init["args"])
    assert opts["command"] == "node wait" and opts["ref"] == "llama-3-8b:prod"
    assert opts["cache"] == "/cache" and opts["timeout"] == "10m"
    (server,) = spec["containers"]
    assert "--model=/cache/models/llama-3-8b/prod" in server["args"]
    # The serving pod reads the directory the agent writes, read-only.
    volumes = {v["name"]: v for v in spec["volumes"]}
    agent_cache = next(v for v in _pod_spec(_one(BASE, "DaemonSet"))["volumes"] if v["name"] == "cache")
    for c in (init, server):
        m = next(m for m in c["volumeMounts"] if m["mountPath"] == "/cache")
        assert m["readOnly"] is True
        assert volumes[m["name"]]["hostPath"]["path"] == agent_cache["hostPath"]["path"]


def _probe_script(port: int, token_file: Path) -> str:
    ds = _one(BASE, "DaemonSet")
    probe = _pod_spec(ds)["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "-c"]
    script = probe[2]
    assert "/etc/weightship/token/token" in script and "127.0.0.1:7070" in script
    return script.replace("/etc/weightship/token/token", str(token_file)).replace("127.0.0.1:7070", f"127.0.0.1:{port}")


def test_readiness_probe_passes_against_a_real_agent_and_needs_the_token(tmp_path: Path) -> None:
    agent = start_agents([tmp_path / "agent"], None, {})[0]
    try:
        ok = subprocess.run([sys.executable, "-c", _probe_script(agent.port, agent.dir / "token")], timeout=30)
        assert ok.returncode == 0
        (tmp_path / "wrong").write_text("not-the-token-at-all\n")
        bad = subprocess.run(
            [sys.executable, "-c", _probe_script(agent.port, tmp_path / "wrong")], capture_output=True, timeout=30
        )
        assert bad.returncode != 0 and b"401" in bad.stderr
    finally:
        agent.stop()
    down = subprocess.run(
        [sys.executable, "-c", _probe_script(agent.port, agent.dir / "token")], capture_output=True, timeout=30
    )
    assert down.returncode != 0
