"""A stand-in for the Kubernetes API server: no API server can run here.

It serves, over HTTPS on loopback with a bearer token, just what weightship calls:

    GET   /api/v1/nodes/NAME                              a Node
    PATCH /api/v1/nodes/NAME        merge-patch+json      a JSON merge patch of the Node
    GET   /api/v1/namespaces/NS/pods?labelSelector=…      the pods the selector picks

and records every request, so that a test sees what weightship asked and sent. Errors
are the API's Status documents. ``mode`` makes it answer 403 (a ServiceAccount without
the RBAC rule) or 503; :meth:`KubeApi.stop` makes it unreachable. :meth:`kubeconfig`
writes the kubeconfig a user (or an agent outside a cluster) would have.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fleetkit import Tls, make_tls


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass
class KubeApi:
    tls: Tls
    token: str
    server: ThreadingHTTPServer | None = None
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # None: answer; "forbidden": 403 to everything; "unavailable": 503 to everything.
    mode: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        with self.lock:
            self.nodes[name] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": dict(labels or {}), "resourceVersion": "1"},
            }

    def labels(self, name: str) -> dict[str, str]:
        with self.lock:
            return dict(self.nodes[name]["metadata"].get("labels") or {})

    def add_pod(
        self,
        name: str,
        node: str,
        ip: str,
        *,
        namespace: str = "weightship",
        labels: dict[str, str] | None = None,
        phase: str = "Running",
        ready: bool = True,
        created: str = "2026-01-01T00:00:00Z",
    ) -> None:
        with self.lock:
            self.pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": dict(labels or {"app.kubernetes.io/name": "weightship-agent"}),
                        "creationTimestamp": created,
                    },
                    "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "weightship"}]},
                    "status": {
                        "phase": phase,
                        "podIP": ip,
                        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                    },
                }
            )

    def calls(self, method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if method is None or r.method == method]

    def kubeconfig(self, path: Path, *, token: str | None = None, context: str = "standin") -> Path:
        """A kubeconfig for this server (JSON is YAML): its CA, a token, one context."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "standin", "cluster": {"server": self.url, "certificate-authority": str(self.tls.ca)}}
            ],
            "users": [{"name": "standin-user", "user": {"token": token or self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "standin", "user": "standin-user"}}],
            "current-context": context,
        }
        path.write_text(json.dumps(doc, indent=1))
        return path

    def start(self) -> KubeApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._answer(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with api.lock:
                    api.requests.append(
                        Request(self.command, url.path, parse_qs(url.query), self.headers.get("Content-Type"), body)
                    )
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                if api.mode == "forbidden":
                    return self._status(
                        403,
                        "Forbidden",
                        f"{self.command.lower()} at {url.path} is forbidden:"
                        ' User "system:serviceaccount:weightship:agent" cannot do it',
                    )
                if api.mode == "unavailable":
                    return self._status(
                        503, "ServiceUnavailable", "the server is currently unable to handle the request"
                    )
                m = re.fullmatch(r"/api/v1/nodes/([^/]+)", url.path)
                if m:
                    return self._node(m.group(1), body)
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)
                if m and self.command == "GET":
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    with api.lock:
                        items = [
                            copy.deepcopy(p)
                            for p in api.pods
                            if p["metadata"]["namespace"] == m.group(1) and matches(selector, p["metadata"]["labels"])
                        ]
                    return self._answer(
                        200,
                        {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items},
                    )
                return self._status(404, "NotFound", f"the server could not find the requested resource {url.path}")

            def _node(self, name: str, body: Any) -> None:
                with api.lock:
                    node = api.nodes.get(name)
                    if node is None:
                        return self._status(404, "NotFound", f'nodes "{name}" not found')
                    if self.command == "PATCH":
                        if self.headers.get("Content-Type") != "application/merge-patch+json":
                            return self._status(415, "UnsupportedMediaType", "this stand-in takes merge patches")
                        api.nodes[name] = node = merge_patch(node, body)
                        node["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
                    elif self.command != "GET":
                        return self._status(405, "MethodNotAllowed", "get and patch only")
                    doc = copy.deepcopy(node)
                self._answer(200, doc)

            do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True, name="kubeapi").start()
        return self

    def stop(self) -> None:
        """Unreachable from now on (connections are refused); :meth:`start` serves again
        on the same port."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def start_kubeapi(d: Path) -> KubeApi:
    return KubeApi(make_tls(d / "kubeapi-tls", hosts=("127.0.0.1",)), secrets.token_urlsafe(24)).start()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether ``labels`` satisfy a label selector as the API server reads it."""
    for req in filter(None, (r.strip() for r in re.split(r",(?![^()]*\))", selector))):
        m = re.fullmatch(r"(\S+?)\s+(in|notin)\s+\((.*)\)", req)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            ok = labels.get(m.group(1)) in values
            if (m.group(2) == "in") != ok:
                return False
        elif "!=" in req:
            k, v = req.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in req:
            k, v = re.split(r"==?", req, maxsplit=1)
            if labels.get(k) != v:
                return False
        elif req.startswith("!"):
            if req[1:] in labels:
                return False
        elif req not in labels:
            return False
    return True
