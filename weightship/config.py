"""Configuration: flags win over WEIGHTSHIP_* variables, which win over weightship.toml."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightship.errors import ConfigError
from weightship.trust import Identity, TrustPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "weightship.toml"


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

    def policy(self) -> TrustPolicy:
        """The [policy] table: what a release must be signed by to be pulled or warmed."""
        p = self.data.get("policy") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"{self.path}: [policy] must be a table")
        try:
            idents = []
            for i, item in enumerate(p.get("identities", [])):
                if not isinstance(item, dict) or "issuer" not in item:
                    raise ConfigError(
                        f"{self.path}: policy.identities[{i}] needs issuer and identity (or identity_regex)"
                    )
                if not (item.get("identity") or item.get("identity_regex")):
                    raise ConfigError(f"{self.path}: policy.identities[{i}] needs identity or identity_regex")
                idents.append(
                    Identity(
                        issuer=str(item["issuer"]),
                        identity=item.get("identity"),
                        identity_regex=item.get("identity_regex"),
                    )
                )
            return TrustPolicy(
                keys=[self.base / k for k in p.get("keys", [])],
                cert_chains=[self.base / c for c in p.get("cert_chains", [])],
                identities=idents,
                offline=bool(p.get("offline", True)),
                trust_config=self.base / p["trust_config"] if p.get("trust_config") else None,
                staging=bool(p.get("staging", False)),
            )
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{self.path}: malformed [policy] ({e})") from None


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
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}", "fix the TOML syntax") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    return Config(path.resolve(), data)
