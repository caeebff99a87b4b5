"""Exceptions that say what went wrong and what to do about it.

Every error weightship raises on purpose is a :class:`WeightshipError`. Its ``str`` is
one line meant for a person: what is wrong, naming the file, key or ref at fault,
followed by what to do. The CLI prints exactly that line and exits with ``exit_code``.
"""

from __future__ import annotations


class WeightshipError(Exception):
    """Base class: a failure weightship understood and can explain in one line."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text = f"{text}; {' '.join(self.hint.split())}"
        return text


class UsageError(WeightshipError):
    """The command was called with arguments that cannot work."""

    exit_code = 2


class ConfigError(WeightshipError):
    """weightship.toml, a fleet file or a WEIGHTSHIP_* variable is malformed."""

    exit_code = 2


class ModelError(WeightshipError):
    """A model directory cannot be packed: unsafe path, bad symlink, broken safetensors."""


class IntegrityError(WeightshipError):
    """Bytes do not match the digest they were published with."""


class SignatureError(WeightshipError):
    """A signature is missing, malformed, or does not verify."""


class PolicyError(SignatureError):
    """A signature verifies but was not made by a signer the policy trusts."""


class StoreError(WeightshipError):
    """The store could not be read or written."""


class NotFoundError(StoreError):
    """A release, tag or blob does not exist in the store."""


class ConflictError(StoreError):
    """A write would overwrite something immutable (a version) or shadow a version."""


class SpaceError(WeightshipError):
    """A disk is full, or a cache cannot hold a release even after evicting what it may."""


class LocalWriteError(WeightshipError):
    """Bytes could not be written to this machine's own disk (not the store's fault, so not
    worth retrying against the store)."""


def write_error(e: OSError, what: str) -> WeightshipError:
    """The error to raise when writing ``what`` on this machine failed with ``e``."""
    import errno

    where = f"{e.filename or what}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceError(
            f"the disk is full ({where})",
            "free space (on a node, weightship gc removes failed releases and their partial "
            "downloads), then run the same command again: it resumes from the bytes already here",
        )
    return LocalWriteError(f"cannot write {where}")
