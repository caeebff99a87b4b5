"""Release references: ``NAME:VERSION``, ``NAME:TAG`` and ``NAME@sha256:HEX``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightship.errors import UsageError

# Names become store keys and node directory names, so the alphabet is kept to what is
# safe everywhere: no separators, no leading dot (so never "." or "..").
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid model name {name!r}",
            "use letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def check_label(label: str, what: str = "version") -> str:
    if not _LABEL_RE.match(label):
        raise UsageError(
            f"invalid {what} {label!r}",
            "use letters, digits, '.', '_', '+' or '-', starting with a letter or digit",
        )
    return label


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise UsageError(f"invalid digest {digest!r}", "expected sha256: followed by 64 hex digits")
    return digest


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of ``label`` (version or tag) and ``digest`` is set."""

    name: str
    label: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        if "@" in text:
            name, _, digest = text.partition("@")
            return cls(check_name(name), digest=check_digest(digest))
        name, sep, label = text.partition(":")
        if not sep or not label:
            raise UsageError(
                f"invalid reference {text!r}",
                "write NAME:VERSION, NAME:TAG or NAME@sha256:HEX",
            )
        return cls(check_name(name), label=check_label(label, "version or tag"))

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.label}"


def parse_release(text: str) -> tuple[str, str]:
    """Parse ``NAME:VERSION`` for publishing (a digest cannot be published to)."""
    ref = Ref.parse(text)
    if ref.label is None:
        raise UsageError(f"cannot publish to a digest {text!r}", "write NAME:VERSION")
    return ref.name, ref.label
