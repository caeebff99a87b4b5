"""The fleet: regions of cache nodes, read from ``weightship.toml`` or a fleet file.

A fleet is ``[regions.NAME]`` tables (``[fleet.regions.NAME]`` and ``[fleet.NAME]`` are
accepted too), each with an optional ``store`` and either a list of ``[[regions.NAME.nodes]]``
or a ``kubernetes = { namespace, selector, port, token_file }`` table: the region's nodes
are then the Running and Ready agent pods of a Kubernetes cluster, found when a command
first asks for the region (:meth:`Fleet.region`), so that autoscaled nodes need no edit.
A fleet file is edited by hand and read by every warm, so a mistake is refused with the
file, line and field at fault rather than surfacing later as a strange transport error.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightship.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NODE_KEYS = {"name", "transport", "cache", "capacity", "labels", "command", "config", "token", "token_file", "ca"}
REGION_KEYS = {"store", "nodes", "ca", "kubernetes"}
KUBERNETES_KEYS = {"namespace", "selector", "port", "token", "token_file", "ca", "context", "kubeconfig"}
# What deploy/kubernetes installs: a region's kubernetes table may name only the token.
KUBERNETES_DEFAULTS = {"namespace": "weightship", "selector": "app.kubernetes.io/name=weightship-agent", "port": 7070}
DEFAULT_COMMAND = "weightship"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Node:
    """One cache node and how to reach it."""

    name: str
    region: str
    kind: str  # "ssh", "agent" or "local"
    transport: str  # as written in the fleet file
    host: str | None = None
    port: int | None = None
    user: str | None = None
    cache: str | None = None
    capacity: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    command: str = DEFAULT_COMMAND
    # weightship.toml on the node whose [policy] the node enforces (ssh and local nodes).
    config: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    # An agent serving TLS: the CA (PEM) its certificate must chain to; None: plain HTTP.
    ca: str | None = None

    @property
    def agent_url(self) -> str:
        """Where this agent node is reached, by the CLI and by its peers: https:// when
        the fleet file gives it a CA (its agent serves --tls-cert), else http://."""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'https' if self.ca else 'http'}://{host}:{self.port}"

    def read_token(self) -> str:
        if self.token:
            return self.token
        assert self.token_file
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"node {self.name}: cannot read token_file {self.token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"node {self.name}: token_file {self.token_file} is empty")
        return token

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "region": self.region,
            "transport": self.transport,
            "cache": self.cache,
            "capacity": self.capacity,
            "labels": dict(self.labels),
            "command": self.command,
        }
        if self.config:
            d["config"] = self.config
        if self.ca:
            d["ca"] = self.ca
        return d


@dataclass(frozen=True)
class Kubernetes:
    """Where a region's agents are found: the pods ``selector`` picks in ``namespace``,
    each reached at its pod IP and ``port`` with the token of ``token_file``."""

    namespace: str
    selector: str
    port: int
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    ca: str | None = None
    context: str | None = None
    kubeconfig: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What ``fleet ls --json`` shows of it: every setting but an inline ``token``, whose
        value is a secret (``token_file`` is then null)."""
        return {
            "namespace": self.namespace,
            "selector": self.selector,
            "port": self.port,
            "token_file": self.token_file,
            "ca": self.ca,
            "context": self.context,
            "kubeconfig": self.kubeconfig,
        }


@dataclass(frozen=True)
class Region:
    name: str
    nodes: list[Node]
    store: str | None = None
    # Set when the nodes come from Kubernetes: ``nodes`` is then empty until
    # :meth:`Fleet.region` has discovered them.
    kubernetes: Kubernetes | None = None


@dataclass
class Fleet:
    regions: dict[str, Region]
    source: Path | None = None
    # Regions whose nodes were discovered in Kubernetes, once per command.
    _discovered: dict[str, Region] = field(default_factory=dict, repr=False)

    def region(self, name: str) -> Region:
        """The region, with its nodes: a Kubernetes region's are discovered now (ConfigError,
        exit 2, for missing credentials; KubeError, exit 1, when the API fails)."""
        if name not in self.regions:
            known = ", ".join(sorted(self.regions)) or "none"
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(f"no region {name!r}{where} (regions: {known})", "add [regions.NAME] to the fleet file")
        reg = self.regions[name]
        if reg.kubernetes is None:
            return reg
        if name not in self._discovered:
            self._discovered[name] = discover(reg)
        return self._discovered[name]

    def select(self, region: str | None) -> list[Region]:
        if region:
            return [self.region(region)]
        if not self.regions:
            raise NoFleet(
                "no fleet configured", "add [regions.NAME] tables to weightship.toml or use a fleet file (see docs)"
            )
        return [self.region(r) for r in sorted(self.regions)]


def discover(region: Region) -> Region:
    """``region`` with its nodes: the agent pods its ``kubernetes`` table names, each node
    named after the Kubernetes node it runs on."""
    from weightship.kube.client import KubeError
    from weightship.kube.discovery import find_agents

    kube = region.kubernetes
    assert kube is not None
    pods = find_agents(kube.namespace, kube.selector, kubeconfig=kube.kubeconfig, context=kube.context)
    if not pods:
        raise KubeError(
            f"region {region.name}: no Running and Ready pods match {kube.selector} in namespace {kube.namespace}",
            f"check the agents (kubectl -n {kube.namespace} get pods -l {kube.selector}) and the region's selector",
        )
    nodes = []
    for pod in pods:
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        nodes.append(
            Node(
                name=_node_name(pod.node),
                region=region.name,
                kind="agent",
                transport=f"agent://{host}:{kube.port}",
                host=pod.ip,
                port=kube.port,
                labels={"pod": pod.pod, "kubernetes-node": pod.node},
                token=kube.token,
                token_file=kube.token_file,
                ca=kube.ca,
            )
        )
    return Region(region.name, nodes, region.store, kube)


def _node_name(kube_node: str) -> str:
    """A Kubernetes node name (a DNS subdomain, up to 253 characters) as a fleet node name
    (at most 64): kept when it fits, else shortened with a hash of the whole, so that two
    nodes never share a name."""
    import hashlib

    if _NAME_RE.match(kube_node):
        return kube_node
    return kube_node[:52].rstrip(".-_") + "-" + hashlib.sha256(kube_node.encode()).hexdigest()[:10]


class NoFleet(ConfigError):
    """Neither weightship.toml nor a fleet file names any region."""


def parse_size(value: Any) -> int:
    """``1073741824``, ``"500G"``, ``"1.5TiB"`` -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            mult = 1024 ** "KMGTP".find(m.group(2).upper()) * 1024 if m.group(2) else 1
            n = int(float(m.group(1)) * mult)
            if n > 0:
                return n
    raise ValueError(f'{value!r} is not a size; write bytes or e.g. "500G"')


def load_fleet(config_data: dict[str, Any], config_path: Path | None, fleet_file: Path | None = None) -> Fleet:
    """The fleet from ``fleet_file`` (or the file WEIGHTSHIP_FLEET names), else from
    weightship.toml (``config_data``, as read from ``config_path``)."""
    if fleet_file is None and os.environ.get("WEIGHTSHIP_FLEET"):
        fleet_file = Path(os.environ["WEIGHTSHIP_FLEET"])
    if fleet_file is not None:
        try:
            text = fleet_file.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read fleet file {fleet_file}: {e.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{fleet_file}: {e}", "fix the TOML syntax") from None
        return parse_fleet(data, fleet_file.resolve(), text)
    text = ""
    if config_path is not None:
        try:
            text = config_path.read_text()
        except OSError:
            text = ""
    return parse_fleet(config_data, config_path, text)


def parse_fleet(data: dict[str, Any], path: Path | None, text: str = "") -> Fleet:
    base = path.parent if path else Path.cwd()
    prefix = "regions"
    regions_data = data.get("regions")
    if regions_data is None and isinstance(data.get("fleet"), dict):
        fleet = data["fleet"]
        if "regions" in fleet:
            regions_data, prefix = fleet["regions"], "fleet.regions"
        else:
            regions_data, prefix = fleet, "fleet"
    regions: dict[str, Region] = {}
    if regions_data is None:
        return Fleet(regions, path)
    where = _Locator(path, text)
    if not isinstance(regions_data, dict):
        raise where.error(prefix, None, None, "must be a table of regions")
    for rname, rdata in regions_data.items():
        if not _NAME_RE.match(rname):
            raise where.error(f"{prefix}.{rname}", None, None, "region names use letters, digits, '.', '_' or '-'")
        if not isinstance(rdata, dict):
            raise where.error(f"{prefix}.{rname}", None, None, "must be a table")
        table = f"{prefix}.{rname}"
        for key in rdata:
            if key not in REGION_KEYS:
                raise where.unknown(table, None, key, REGION_KEYS)
        store = rdata.get("store")
        if store is not None:
            if not isinstance(store, str) or not (store.startswith(("s3://", "az://", "oci://", "file://"))):
                raise where.error(
                    table, None, "store", f"{store!r} is not a store URL (s3://…, az://…, oci://… or file://…)"
                )
            if store.startswith("file://") and not Path(store[7:]).is_absolute():
                store = "file://" + str(base / store[7:])
        region_ca = rdata.get("ca")
        if region_ca is not None:
            if not isinstance(region_ca, str) or not region_ca:
                raise where.error(table, None, "ca", "must be the path of a PEM file of CA certificates")
            region_ca = str(base / region_ca)  # relative to the fleet file, like token_file
        if "kubernetes" in rdata:
            if "nodes" in rdata:
                raise where.error(
                    table, None, "kubernetes", "a region lists nodes or discovers them in Kubernetes, not both; use one"
                )
            kube = _parse_kubernetes(rdata["kubernetes"], f"{table}.kubernetes", base, where, region_ca)
            regions[rname] = Region(rname, [], store, kube)
            continue
        nodes_data = rdata.get("nodes")
        if not isinstance(nodes_data, list) or not nodes_data:
            raise where.error(
                table,
                None,
                "nodes",
                f"region has no nodes; add [[{table}.nodes]] entries or a kubernetes = {{ … }} table",
            )
        nodes: list[Node] = []
        for i, nd in enumerate(nodes_data):
            if not isinstance(nd, dict):
                raise where.error(f"{table}.nodes", i, None, "must be a table")
            nodes.append(_parse_node(nd, rname, f"{table}.nodes", i, base, where, region_ca))
        seen: set[str] = set()
        for i, n in enumerate(nodes):
            if n.name in seen:
                raise where.error(f"{table}.nodes", i, "name", f"node name {n.name!r} is used twice in the region")
            seen.add(n.name)
        regions[rname] = Region(rname, nodes, store)
    return Fleet(regions, path)


def _parse_node(
    nd: dict[str, Any], region: str, table: str, i: int, base: Path, where: _Locator, region_ca: str | None = None
) -> Node:
    def bad(key: str | None, why: str) -> ConfigError:
        return where.error(table, i, key, why)

    for key in nd:
        if key not in NODE_KEYS:
            raise where.unknown(table, i, key, NODE_KEYS)
    for key in ("name", "transport", "cache", "command", "config", "token", "token_file", "ca"):
        if key in nd and not isinstance(nd[key], str):
            raise bad(key, "must be a string")
    name = nd.get("name")
    if not name:
        raise bad("name", "every node needs a name")
    if not _NAME_RE.match(name):
        raise bad("name", f"{name!r}: use letters, digits, '.', '_' or '-'")
    transport = nd.get("transport")
    if not transport:
        raise bad("transport", "missing; write ssh://USER@HOST:PORT, agent://HOST:PORT or local")
    kind, host, port, user = _parse_transport(transport, bad)
    cache = nd.get("cache")
    if kind != "agent" and not cache:
        raise bad("cache", "missing: the cache directory on the node")
    if kind == "local" and cache and not Path(cache).is_absolute():
        cache = str(base / cache)
    elif kind == "ssh" and cache and not cache.startswith("/"):
        raise bad("cache", f"{cache!r} must be an absolute path on the node")
    capacity = None
    if "capacity" in nd:
        try:
            capacity = parse_size(nd["capacity"])
        except ValueError as e:
            raise bad("capacity", str(e)) from None
    labels = _parse_labels(nd.get("labels", {}), bad)
    token, token_file = nd.get("token"), nd.get("token_file")
    if kind == "agent":
        if not token and not token_file:
            raise bad("token_file", "agent nodes need token_file (or token): the agent's bearer token")
        if token_file and not Path(token_file).is_absolute():
            token_file = str(base / token_file)
        if "config" in nd:
            raise bad("config", "an agent takes its policy from `weightship agent serve --policy`, not the fleet file")
    elif token or token_file:
        raise bad("token" if token else "token_file", f"only agent nodes take a token, this node is {kind}")
    # The node's own ca wins over its region's; a region's ca concerns its agents only.
    ca = region_ca if kind == "agent" else None
    if "ca" in nd:
        if kind != "agent":
            raise bad("ca", f"only agent nodes take a ca (the CA of the agent's TLS certificate), this node is {kind}")
        if not nd["ca"]:
            raise bad("ca", "must be the path of a PEM file of CA certificates")
        ca = str(base / nd["ca"])
    config = nd.get("config")
    if kind == "local" and config and not Path(config).is_absolute():
        config = str(base / config)
    command = nd.get("command", DEFAULT_COMMAND)
    if not command.strip():
        raise bad("command", "must not be empty")
    return Node(
        name=name,
        region=region,
        kind=kind,
        transport=transport,
        host=host,
        port=port,
        user=user,
        cache=cache,
        capacity=capacity,
        labels=labels,
        command=command,
        config=config,
        token=token,
        token_file=token_file,
        ca=ca,
    )


def _parse_kubernetes(value: Any, table: str, base: Path, where: _Locator, region_ca: str | None) -> Kubernetes:
    """``kubernetes = { namespace, selector, port, token_file, ca, context, kubeconfig }``,
    checked now: nothing is asked of the API until a command needs the region's nodes."""
    region_table, _, _ = table.rpartition(".")

    def bad(key: str | None, why: str) -> ConfigError:
        # An inline table's keys have no line of their own: point at `kubernetes = {`.
        if where.has_table(table):
            return where.error(table, None, key, why)
        return where.error(region_table, None, "kubernetes", f"{key}: {why}" if key else why)

    if not isinstance(value, dict):
        raise bad(None, 'must be a table, e.g. kubernetes = { namespace = "weightship", token_file = "agent.token" }')
    for key in value:
        if key not in KUBERNETES_KEYS:
            if where.has_table(table):
                raise where.unknown(table, None, key, KUBERNETES_KEYS)
            raise where.unknown(region_table, None, "kubernetes", KUBERNETES_KEYS, inner=key)
    for key in ("namespace", "selector", "token", "token_file", "ca", "context", "kubeconfig"):
        if key in value and (not isinstance(value[key], str) or not value[key].strip()):
            raise bad(key, "must be a non-empty string")
    opts = KUBERNETES_DEFAULTS | value
    namespace, selector, port = opts["namespace"], opts["selector"], opts["port"]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise bad("namespace", f"{namespace!r} is not a Kubernetes namespace name (lower-case letters, digits, '-')")
    from weightship.kube.discovery import parse_selector

    try:
        parse_selector(selector)
    except ValueError as e:
        raise bad("selector", str(e)) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad("port", "must be the agents' port, a number from 1 to 65535")
    token, token_file = value.get("token"), value.get("token_file")
    if not token and not token_file:
        raise bad("token_file", "the agents need a bearer token: name the file holding it (token_file)")
    if token and token_file:
        raise bad("token", "give token_file or token, not both")
    if token_file:
        token_file = str(base / token_file)
    ca = str(base / value["ca"]) if "ca" in value else region_ca
    kubeconfig = value.get("kubeconfig")
    if kubeconfig:
        kubeconfig = str(base / Path(kubeconfig).expanduser())
    return Kubernetes(namespace, selector, port, token, token_file, ca, value.get("context"), kubeconfig)


def _parse_transport(text: str, bad) -> tuple[str, str | None, int | None, str | None]:
    if text == "local":
        return "local", None, None, None
    u = urlsplit(text)
    if u.scheme not in ("ssh", "agent") or not u.hostname or u.path not in ("", "/") or u.query:
        raise bad("transport", f"{text!r} is not a transport; write ssh://USER@HOST:PORT, agent://HOST:PORT or local")
    try:
        port = u.port
    except ValueError:
        raise bad("transport", f"{text!r} has an invalid port") from None
    if u.scheme == "agent":
        if port is None:
            raise bad("transport", f"{text!r} needs a port: agent://HOST:PORT")
        if u.username:
            raise bad("transport", f"{text!r}: an agent URL has no user; the token authenticates")
    # ssh: user and port may come from ~/.ssh/config, so both are optional here.
    return u.scheme, u.hostname, port, u.username


def _parse_labels(value: Any, bad) -> dict[str, str]:
    if isinstance(value, dict):
        if not all(isinstance(v, str | int | float | bool) for v in value.values()):
            raise bad("labels", "label values must be strings")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        out = {}
        for item in value:
            k, _, v = item.partition("=")
            out[k] = v
        return out
    raise bad("labels", 'write a table, e.g. labels = { gpu = "h100" }, or a list of "key=value"')


class _Locator:
    """Best-effort ``file:line`` for a field: tomllib keeps no positions, so the line is
    found again in the text by walking to the table header and then to the key."""

    def __init__(self, path: Path | None, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: str, index: int | None, key: str | None) -> int | None:
        if not self.lines:
            return None
        header = re.compile(r"^\s*\[\[?\s*" + r"\s*\.\s*".join(key_pattern(p) for p in table.split(".")) + r"\s*\]\]?")
        starts = [n for n, line in enumerate(self.lines) if header.match(line)]
        if index is not None and index < len(starts):
            start = starts[index]
        elif starts:
            start = starts[0]
        else:
            return self._key_anywhere(key)
        if key is None:
            return start + 1
        key_re = re.compile(r"^\s*" + key_pattern(key) + r"\s*=")
        for n in range(start + 1, len(self.lines)):
            if re.match(r"^\s*\[", self.lines[n]):
                break
            if key_re.match(self.lines[n]):
                return n + 1
        return start + 1

    def _key_anywhere(self, key: str | None) -> int | None:
        if key is None:
            return None
        key_re = re.compile(r"^\s*" + key_pattern(key) + r"\s*=")
        hits = [n for n, line in enumerate(self.lines) if key_re.match(line)]
        return hits[0] + 1 if len(hits) == 1 else None

    def error(self, table: str, index: int | None, key: str | None, why: str, hint: str | None = None) -> ConfigError:
        field_ = table + (f"[{index}]" if index is not None else "") + (f".{key}" if key else "")
        line = self.line_of(table, index, key)
        where = str(self.path) if self.path else "fleet"
        if line is not None:
            where += f":{line}"
        return ConfigError(f"{where}: {field_}: {why}", hint)

    def unknown(
        self, table: str, index: int | None, key: str, known: set[str], *, inner: str | None = None
    ) -> ConfigError:
        """An unknown field (``inner``: one inside the inline table ``key``), with the
        closest known one as a hint."""
        import difflib  # only on the way to an error

        name = inner or key
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else None
        why = f"unknown field (known: {', '.join(sorted(known))})"
        return self.error(table, index, key, f"{inner}: {why}" if inner else why, hint)

    def has_table(self, table: str) -> bool:
        """Whether ``[table]`` is written as a table header (not as an inline table)."""
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(key_pattern(p) for p in table.split(".")) + r"\s*\]")
        return any(header.match(line) for line in self.lines)


def key_pattern(part: str) -> str:
    """A regular expression for a TOML key written bare or quoted (to find its line)."""
    return "(?:" + re.escape(part) + '|"' + re.escape(part) + '"' + "|'" + re.escape(part) + "')"
