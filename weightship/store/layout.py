"""The store layout: where each object of a release lives (docs/format.md).

Every store (file://, s3://, az://) holds the same keys, ``/``-separated and relative to
the store's root or prefix. Only this module spells them out.
"""

from __future__ import annotations

from weightship.artifact.manifest import SIGNATURE_FILE


def blob_key(hexdigest: str) -> str:
    """File contents, content-addressed, written once."""
    return f"blobs/sha256/{hexdigest}"


def manifest_key(name: str, version: str) -> str:
    """The release's canonical manifest: its sha256 is the release digest."""
    return f"releases/{name}/{version}/manifest.json"


def signature_key(name: str, version: str, digest: str) -> str:
    """Where the signature of the manifest with ``digest`` lives. Keyed by the manifest's
    digest, not by the version alone: two publishers racing for one version each write
    their own signature, and the one whose manifest wins the exclusive write is the one
    every reader finds (the loser's is deleted, or left as an orphan prune collects)."""
    return f"releases/{name}/{version}/sha256-{digest.removeprefix('sha256:')}.sig"


def legacy_signature_key(name: str, version: str) -> str:
    """Where weightship 0.1.0 wrote every signature; still read for releases it published."""
    return f"releases/{name}/{version}/{SIGNATURE_FILE}"


def tag_key(name: str, tag: str) -> str:
    """The version a movable tag points at."""
    return f"tags/{name}/{tag}"


__all__ = ["blob_key", "legacy_signature_key", "manifest_key", "signature_key", "tag_key"]
