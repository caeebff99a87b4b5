"""Configuration: flags win over WEIGHTSHIP_* variables, which win over weightship.toml.

weightship.toml, and a node's ``--policy`` file (which is one), is checked against
:data:`SCHEMA` when it is loaded: a misspelt table or key, or a value of the wrong type,
is a :class:`ConfigError` naming the file, line and dotted key. A typo in ``[policy]``
must never read as "no policy", which would pull and warm unsigned releases.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightship.errors import ConfigError
from weightship.fleet.inventory import key_pattern, parse_fleet
from weightship.trust.policy import Identity, TrustPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "weightship.toml"


@dataclass(frozen=True)
class Expect:
    """What one key holds: ``expected`` completes "must be ..." in the error."""

    expected: str
    check: Callable[[Any], bool]


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_store_url(v: Any) -> bool:
    # A bare path is a file store too (open_store accepts it); any other scheme is not a store.
    return _is_text(v) and ("://" not in v or v.startswith(("file://", "s3://", "az://", "oci://")))


def _is_paths(v: Any) -> bool:
    return isinstance(v, list) and all(_is_text(p) for p in v)


def _is_regex(v: Any) -> bool:
    if not _is_text(v):
        return False
    try:
        re.compile(v)
    except re.error:
        return False
    return True


_TEXT = Expect("a non-empty string", _is_text)
_BOOL = Expect("true or false", lambda v: isinstance(v, bool))
_PATHS = Expect('a list of paths, e.g. ["keys/release.pub"]', _is_paths)

# Each table of weightship.toml and the keys it may hold. [regions] and [fleet] are the
# fleet, whose schema (region and node keys) weightship.fleet owns: see FLEET_TABLES.
SCHEMA: dict[str, dict[str, Expect]] = {
    "store": {
        "url": Expect(
            'a store URL, e.g. "s3://bucket/prefix", "az://container/prefix", "oci://registry.example/models"'
            ' or "file:///srv/weights"',
            _is_store_url,
        )
    },
    "signing": {"key": Expect('the path of a PEM private key, e.g. "keys/release.pem"', _is_text)},
    "publish": {
        # What publish and pack do about pickle files (weightship.artifact.pickles).
        "pickle": Expect('one of "warn", "refuse" or "allow"', lambda v: v in ("warn", "refuse", "allow")),
    },
    "policy": {
        "keys": _PATHS,
        "cert_chains": Expect('a list of CA certificate paths, e.g. ["keys/ca.pem"]', _is_paths),
        "identities": Expect(
            'a list of tables, e.g. [{ identity = "…", issuer = "…" }]',
            lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v),
        ),
        "offline": _BOOL,
        "trust_config": Expect('the path of a Sigstore trust config, e.g. "sigstore-trust.json"', _is_text),
        "staging": _BOOL,
    },
}
# One item of policy.identities: issuer, and exactly one of identity and identity_regex.
IDENTITY_SCHEMA: dict[str, Expect] = {
    "identity": _TEXT,
    "identity_regex": Expect("a regular expression matching the whole identity", _is_regex),
    "issuer": Expect('an OIDC issuer URL, e.g. "https://token.actions.githubusercontent.com"', _is_text),
}
FLEET_TABLES = ("regions", "fleet")


@dataclass
class Config:
    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def store_url(self, flag: str | None = None) -> str | None:
        if flag:
            return flag
        if os.environ.get("WEIGHTSHIP_STORE"):
            return os.environ["WEIGHTSHIP_STORE"]
        url = (self.data.get("store") or {}).get("url")
        if url and url.startswith("file://") and not Path(url[7:]).is_absolute():
            # A relative file store in weightship.toml is relative to that file.
            return "file://" + str(self.base / url[7:])
        return url

    def signing_key(self, flag: Path | None = None) -> Path | None:
        if flag:
            return flag
        if os.environ.get("WEIGHTSHIP_SIGNING_KEY"):
            return Path(os.environ["WEIGHTSHIP_SIGNING_KEY"])
        key = (self.data.get("signing") or {}).get("key")
        return self.base / key if key else None

    def pickle_mode(self, refuse_flag: bool = False) -> str:
        """What to do about pickle files: ``refuse`` with --refuse-pickle, else
        [publish] pickle, else ``warn``."""
        if refuse_flag:
            return "refuse"
        return str((self.data.get("publish") or {}).get("pickle", "warn"))

    def policy(self) -> TrustPolicy:
        """The [policy] table: what a release must be signed by to be pulled or warmed."""
        p = self.data.get("policy") or {}
        # load() checked the whole file; a Config built by hand gets its [policy] checked here.
        validate({"policy": p}, self.path)
        return TrustPolicy(
            keys=[self.base / k for k in p.get("keys", [])],
            cert_chains=[self.base / c for c in p.get("cert_chains", [])],
            identities=[
                Identity(issuer=i["issuer"], identity=i.get("identity"), identity_regex=i.get("identity_regex"))
                for i in p.get("identities", [])
            ],
            offline=p.get("offline", True),
            trust_config=self.base / p["trust_config"] if p.get("trust_config") else None,
            staging=p.get("staging", False),
        )


def load(path: Path | None = None) -> Config:
    """Load ``--config PATH``, else WEIGHTSHIP_CONFIG, else ./weightship.toml if present."""
    if path is None and os.environ.get("WEIGHTSHIP_CONFIG"):
        path = Path(os.environ["WEIGHTSHIP_CONFIG"])
    explicit = path is not None
    path = path or Path.cwd() / CONFIG_FILE
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} not found")
        return Config()
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}", "fix the TOML syntax") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    validate(data, path, text)
    return Config(path.resolve(), data)


def validate(data: dict[str, Any], path: Path | None, text: str = "") -> None:
    """Refuse anything in a weightship.toml that :data:`SCHEMA` does not describe.

    Raises :class:`ConfigError` for the first problem, as ``FILE[:LINE]: dotted.key: why``.
    ``text`` (the file's contents) only serves to find the line.
    """
    where = _Where(path, text)
    for table, value in data.items():
        if table in FLEET_TABLES:
            continue
        if table not in SCHEMA:
            what = "table" if isinstance(value, dict) else "key"
            raise where.unknown(table, None, _known_tables(), what, _top_level_hint(table))
        if not isinstance(value, dict):
            first = next(iter(SCHEMA[table]))
            raise where.error(table, None, f"must be a table, e.g. [{table}] {first} = …")
        _check_table(value, SCHEMA[table], table, where)
    for i, item in enumerate((data.get("policy") or {}).get("identities", [])):
        _check_identity(item, f"policy.identities[{i}]", where)
    _check_fleet(data, path, text, where)


def _check_table(value: dict[str, Any], schema: dict[str, Expect], name: str, where: _Where) -> None:
    for key, v in value.items():
        if key not in schema:
            raise where.unknown(f"{name}.{key}", key, sorted(schema))
        if not schema[key].check(v):
            raise where.error(f"{name}.{key}", key, f"must be {schema[key].expected}, not {_show(v)}")


def _check_identity(item: dict[str, Any], name: str, where: _Where) -> None:
    _check_table(item, IDENTITY_SCHEMA, name, where)
    if "identity" in item and "identity_regex" in item:
        raise where.error(name, None, "has both identity and identity_regex; keep one")
    if "issuer" not in item or not ("identity" in item or "identity_regex" in item):
        raise where.error(
            name,
            None,
            "needs issuer and one of identity or identity_regex, e.g. "
            '{ identity = "https://github.com/ORG/REPO/.github/workflows/W.yml@refs/heads/main", '
            'issuer = "https://token.actions.githubusercontent.com" }',
        )


def _check_fleet(data: dict[str, Any], path: Path | None, text: str, where: _Where) -> None:
    """The fleet tables are validated by the fleet's own parser, here as well as by warm, so
    a typo in a node fails every command, not only the fleet commands."""
    if not any(t in data for t in FLEET_TABLES):
        return
    fleet = data.get("fleet")
    if "regions" in data and fleet is not None:
        # parse_fleet reads [regions] and would silently skip [fleet].
        raise where.error("fleet", None, "the fleet is [regions.NAME] or [fleet.regions.NAME], not both; use one")
    if isinstance(fleet, dict) and "regions" in fleet and len(fleet) > 1:
        extra = sorted(k for k in fleet if k != "regions")[0]
        raise where.error(
            f"fleet.{extra}", extra, "unknown key: [fleet] holds only regions ([fleet.regions.NAME] tables)"
        )
    if fleet is not None and not isinstance(fleet, dict):
        raise where.error("fleet", None, "must be a table of regions, e.g. [fleet.regions.NAME]")
    parse_fleet(data, path, text)


def _known_tables() -> list[str]:
    return sorted([*SCHEMA, *FLEET_TABLES])


def _top_level_hint(key: str) -> str:
    # `url = …` above every table header belongs in a table: say which.
    for table, keys in SCHEMA.items():
        if key in keys:
            return f"{key} under [{table}]"
    return ""


def _show(v: Any) -> str:
    """A value as it would be written in TOML, short enough for one line."""
    import json

    if isinstance(v, dict):
        return "a table"
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Where:
    """Turns a dotted key into ``FILE[:LINE]: key: why``. tomllib keeps no positions, so the
    line is found again in the text: the table header, then the key below it."""

    def __init__(self, path: Path | None, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, dotted: str, key: str | None) -> int | None:
        table = dotted[: -len(key) - 1] if key is not None and dotted.endswith("." + key) else dotted
        m = re.fullmatch(r"(.*?)\[(\d+)\]", table)
        table, index = (m.group(1), int(m.group(2))) if m else (table, 0)
        header = re.compile(r"^\s*\[\[?\s*" + r"\s*\.\s*".join(key_pattern(p) for p in table.split(".")) + r"\s*\]\]?")
        starts = [n for n, line in enumerate(self.lines) if header.match(line)]
        if not starts:
            # Written as a dotted key (policy.keys = …) or in an inline table: find the key alone.
            last = key or table.rsplit(".", 1)[-1]
            key_re = re.compile(r"(?:^|[{,])\s*(?:[\w\"'.-]+\s*\.\s*)?" + key_pattern(last) + r"\s*[=.]")
            hits = [n for n, line in enumerate(self.lines) if key_re.search(line)]
            return hits[0] + 1 if len(hits) == 1 else None
        start = starts[index] if index < len(starts) else starts[0]
        if key is None or dotted == table:
            return start + 1
        key_re = re.compile(r"^\s*" + key_pattern(key) + r"\s*=")
        for n in range(start + 1, len(self.lines)):
            if re.match(r"^\s*\[", self.lines[n]):
                break
            if key_re.match(self.lines[n]):
                return n + 1
        return start + 1

    def error(self, dotted: str, key: str | None, why: str, hint: str | None = None) -> ConfigError:
        where = str(self.path) if self.path else CONFIG_FILE
        line = self.line_of(dotted, key)
        if line is not None:
            where += f":{line}"
        return ConfigError(f"{where}: {dotted}: {why}", hint)

    def unknown(
        self, dotted: str, key: str | None, known: list[str], what: str = "key", instead: str = ""
    ) -> ConfigError:
        """``key`` is None for a top-level name, which has no table around it."""
        import difflib  # only on the way to an error: not on every command's start-up path

        name = key or dotted
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if not instead and close:
            instead = dotted[: -len(name)] + close[0]
        hint = f"did you mean {instead}?" if instead else None
        return self.error(dotted, key, f"unknown {what} (known: {', '.join(known)})", hint)
