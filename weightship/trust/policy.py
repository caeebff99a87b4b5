"""Trust policy: which signers a release must be signed by, and who signed one.

Plain data: the checks that apply a policy to a signature bundle are in
:mod:`weightship.trust.bundle`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightship.trust import oms
from weightship.trust import signers as signing


@dataclass(frozen=True)
class Identity:
    """A Sigstore signer: an OIDC identity (exact or regex) from an issuer."""

    issuer: str
    identity: str | None = None
    identity_regex: str | None = None

    def matches(self, identity: str, issuer: str) -> bool:
        if issuer != self.issuer:
            return False
        if self.identity_regex is not None:
            return re.fullmatch(self.identity_regex, identity) is not None
        return identity == self.identity

    def __str__(self) -> str:
        who = self.identity if self.identity_regex is None else f"/{self.identity_regex}/"
        return f"{who} (issuer {self.issuer})"


@dataclass
class TrustPolicy:
    """The signers a release must be signed by. An empty policy trusts nothing and
    requires nothing; ``required`` says whether unsigned releases are refused."""

    keys: list[Path] = field(default_factory=list)
    cert_chains: list[Path] = field(default_factory=list)
    identities: list[Identity] = field(default_factory=list)
    offline: bool = True
    trust_config: Path | None = None
    staging: bool = False

    @property
    def required(self) -> bool:
        return bool(self.keys or self.cert_chains or self.identities)

    def describe(self) -> str:
        parts = [f"key {signing.key_fingerprint(signing.load_public_key(k))[:16]} ({k})" for k in self.keys]
        parts += [f"a certificate chaining to {c}" for c in self.cert_chains]
        parts += [f"identity {i}" for i in self.identities]
        return " or ".join(parts) if parts else "nothing"

    def merged(self, other: TrustPolicy) -> TrustPolicy:
        return TrustPolicy(
            keys=[*self.keys, *other.keys],
            cert_chains=[*self.cert_chains, *other.cert_chains],
            identities=[*self.identities, *other.identities],
            offline=self.offline and other.offline,
            trust_config=self.trust_config or other.trust_config,
            staging=self.staging or other.staging,
        )


@dataclass(frozen=True)
class SignerInfo:
    """Who signed, as far as the bundle proves it."""

    method: str
    fingerprint: str | None = None
    subject: str | None = None
    identity: str | None = None
    issuer: str | None = None
    tlog_index: int | None = None

    def describe(self) -> str:
        if self.method == "key":
            return f"key {self.fingerprint[:16] if self.fingerprint else '?'}"
        if self.method == "certificate":
            return f"certificate {self.subject}"
        text = f"identity {self.identity} (issuer {self.issuer})"
        if self.tlog_index is not None:
            text += f", transparency log index {self.tlog_index}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Verified:
    statement: oms.Statement
    signer: SignerInfo
