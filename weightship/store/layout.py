"""The store layout: where each object of a release lives (docs/format.md).

Every store (file://, s3://, az://) holds the same keys, ``/``-separated and relative to
the store's root or prefix. Only this module spells them out.
"""

from __future__ import annotations

from weightship.artifact.manifest import SIGNATURE_FILE

# Where blobs live: prune lists this prefix.
BLOB_PREFIX = "blobs/sha256/"
# Markers of prunes in progress (docs/format.md "Deleting: rm and prune").
PRUNE_PREFIX = "prune/"


def blob_key(hexdigest: str) -> str:
    """File contents, content-addressed, written once."""
    return f"{BLOB_PREFIX}{hexdigest}"


def parse_release_key(key: str) -> tuple[str, str, str] | None:
    """``releases/NAME/VERSION/FILE`` -> (NAME, VERSION, FILE); None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "releases":
        return None
    return parts[1], parts[2], parts[3]


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


def removed_key(name: str, version: str) -> str:
    """The record that ``rm`` removed the version: what it held, so that the version can
    never name other files (docs/format.md, "Deleting: rm and prune")."""
    return f"releases/{name}/{version}/removed.json"


def tag_key(name: str, tag: str) -> str:
    """The version a movable tag points at."""
    return f"tags/{name}/{tag}"


__all__ = [
    "BLOB_PREFIX",
    "PRUNE_PREFIX",
    "blob_key",
    "legacy_signature_key",
    "manifest_key",
    "parse_release_key",
    "removed_key",
    "signature_key",
    "tag_key",
]
