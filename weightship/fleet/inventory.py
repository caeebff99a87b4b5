"""The fleet: regions of cache nodes, read from ``weightship.toml`` or a fleet file.

A fleet is ``[regions.NAME]`` tables (``[fleet.regions.NAME]`` and ``[fleet.NAME]`` are
accepted too), each with an optional ``store`` and a list of ``[[regions.NAME.nodes]]``.
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
REGION_KEYS = {"store", "nodes", "ca"}
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
class Region:
    name: str
    nodes: list[Node]
    store: str | None = None


@dataclass
class Fleet:
    regions: dict[str, Region]
    source: Path | None = None

    def region(self, name: str) -> Region:
        if name not in self.regions:
            known = ", ".join(sorted(self.regions)) or "none"
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(f"no region {name!r}{where} (regions: {known})", "add [regions.NAME] to the fleet file")
        return self.regions[name]

    def select(self, region: str | None) -> list[Region]:
        if region:
            return [self.region(region)]
        if not self.regions:
            raise NoFleet(
                "no fleet configured", "add [regions.NAME] tables to weightship.toml or use a fleet file (see docs)"
            )
        return [self.regions[r] for r in sorted(self.regions)]


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
                raise where.error(table, None, key, f"unknown field (known: {', '.join(sorted(REGION_KEYS))})")
        store = rdata.get("store")
        if store is not None:
            if not isinstance(store, str) or not (store.startswith(("s3://", "az://", "file://"))):
                raise where.error(table, None, "store", f"{store!r} is not a store URL (s3://…, az://… or file://…)")
            if store.startswith("file://") and not Path(store[7:]).is_absolute():
                store = "file://" + str(base / store[7:])
        region_ca = rdata.get("ca")
        if region_ca is not None:
            if not isinstance(region_ca, str) or not region_ca:
                raise where.error(table, None, "ca", "must be the path of a PEM file of CA certificates")
            region_ca = str(base / region_ca)  # relative to the fleet file, like token_file
        nodes_data = rdata.get("nodes")
        if not isinstance(nodes_data, list) or not nodes_data:
            raise where.error(table, None, "nodes", f"region has no nodes; add [[{table}.nodes]] entries")
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
            raise bad(key, f"unknown field (known: {', '.join(sorted(NODE_KEYS))})")
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

    def error(self, table: str, index: int | None, key: str | None, why: str) -> ConfigError:
        field_ = table + (f"[{index}]" if index is not None else "") + (f".{key}" if key else "")
        line = self.line_of(table, index, key)
        where = str(self.path) if self.path else "fleet"
        if line is not None:
            where += f":{line}"
        return ConfigError(f"{where}: {field_}: {why}")


def key_pattern(part: str) -> str:
    """A regular expression for a TOML key written bare or quoted (to find its line)."""
    return "(?:" + re.escape(part) + '|"' + re.escape(part) + '"' + "|'" + re.escape(part) + "')"
