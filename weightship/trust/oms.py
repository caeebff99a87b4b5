"""The OpenSSF Model Signing (OMS) v1.0 format, exactly as the reference signer writes it.

This module is the wire format only: the in-toto statement over a model's files, the
DSSE pre-authentication encoding, and the Sigstore bundle around them. Who signs and
who is trusted live in ``weightship.signing`` and ``weightship.policy``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from weightship.artifact.manifest import SINGLE_FILE_RESOURCE, check_relpath, path_sort_key
from weightship.errors import SignatureError

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"


def pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    return b"DSSEv1 %d %s %d %s" % (
        len(payload_type),
        payload_type.encode(),
        len(payload),
        payload,
    )


def root_digest(resources: dict[str, str]) -> str:
    """The subject digest: sha256 over the resource digests in path-component order."""
    h = hashlib.sha256()
    for path in sorted(resources, key=path_sort_key):
        h.update(bytes.fromhex(resources[path]))
    return h.hexdigest()


def build_statement(
    model_name: str,
    resources: dict[str, str],
    *,
    ignore_paths: list[str],
    allow_symlinks: bool = False,
) -> bytes:
    """The in-toto Statement v1 a model signature covers, as payload bytes."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": allow_symlinks,
                "ignore_paths": list(ignore_paths),
            },
            "resources": [
                {"name": p, "algorithm": "sha256", "digest": resources[p]} for p in sorted(resources, key=path_sort_key)
            ],
        },
    }
    return json.dumps(statement, indent=2).encode()


@dataclass(frozen=True)
class Statement:
    """A parsed, self-consistent OMS statement (its signature is checked elsewhere)."""

    model_name: str
    resources: dict[str, str]
    ignore_paths: list[str]
    allow_symlinks: bool


def parse_statement(payload: bytes) -> Statement:
    """Parse and sanity-check the statement inside a verified envelope.

    Everything here is attacker-controlled until the signature is checked, and even
    then the signer may be careless: every resource name must be a safe relative path.
    """
    try:
        st = json.loads(payload)
        if st.get("_type") != STATEMENT_TYPE:
            raise SignatureError(f"signature payload is not an in-toto statement ({st.get('_type')})")
        if st.get("predicateType") != PREDICATE_TYPE:
            raise SignatureError(
                f"unsupported predicate type {st.get('predicateType')!r}",
                f"weightship reads OMS {PREDICATE_TYPE}",
            )
        subjects = st["subject"]
        if len(subjects) != 1:
            raise SignatureError(f"signature must have one subject, found {len(subjects)}")
        predicate = st["predicate"]
        ser = predicate["serialization"]
        if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
            raise SignatureError(
                f"unsupported serialization {ser.get('method')}/{ser.get('hash_type')}",
                "re-sign with file serialization and sha256",
            )
        resources: dict[str, str] = {}
        listed = predicate["resources"]
        for r in listed:
            if r.get("algorithm") != "sha256":
                raise SignatureError(f"resource {r.get('name')!r} uses {r.get('algorithm')}")
            name = str(r["name"])
            # "." is how the reference signer names a model that is one file (the path of
            # the file relative to itself); it is only meaningful as the sole resource.
            if name != SINGLE_FILE_RESOURCE or len(listed) != 1:
                check_relpath(name)
            if name in resources:
                raise SignatureError(f"resource {name!r} listed twice in the signature")
            resources[name] = str(r["digest"]).lower()
        expected = subjects[0]["digest"]["sha256"]
        if root_digest(resources) != expected:
            raise SignatureError("signature is inconsistent: resources do not hash to its subject")
        ignores = [str(p) for p in ser.get("ignore_paths", [])]
        return Statement(str(subjects[0].get("name", "")), resources, ignores, bool(ser.get("allow_symlinks")))
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SignatureError(f"malformed signature statement ({e!r})") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SignatureError(f"malformed base64 in signature {what}") from None


def make_bundle(payload: bytes, signature: bytes, verification_material: dict[str, Any]) -> bytes:
    """A Sigstore v0.3 bundle wrapping a DSSE envelope, as the reference signer writes it."""
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": verification_material,
        "dsseEnvelope": {
            "payload": b64(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": b64(signature), "keyid": ""}],
        },
    }
    return json.dumps(bundle, indent=2).encode()


@dataclass(frozen=True)
class Envelope:
    """The parts of a bundle a verifier needs, decoded but not yet trusted."""

    raw: dict[str, Any]
    payload: bytes
    payload_type: str
    signature: bytes
    material: dict[str, Any]

    @property
    def kind(self) -> str:
        """How it was signed, read from the verification material."""
        m = self.material
        if "publicKey" in m:
            return "key"
        if "x509CertificateChain" in m:
            return "certificate"
        if "certificate" in m and m.get("tlogEntries"):
            return "sigstore"
        raise SignatureError(
            "signature has no verification material weightship understands",
            "expected a public key hint, a certificate chain, or a Sigstore certificate with a transparency-log entry",
        )


def read_bundle(data: bytes) -> Envelope:
    try:
        raw = json.loads(data)
        if raw.get("mediaType") != BUNDLE_MEDIA_TYPE:
            raise SignatureError(f"signature is not a Sigstore v0.3 bundle (mediaType {raw.get('mediaType')!r})")
        env = raw["dsseEnvelope"]
        sigs = env["signatures"]
        if len(sigs) != 1:
            raise SignatureError(f"signature envelope must carry one signature, found {len(sigs)}")
        return Envelope(
            raw=raw,
            payload=unb64(env["payload"], "payload"),
            payload_type=str(env["payloadType"]),
            signature=unb64(sigs[0]["sig"], "value"),
            material=dict(raw["verificationMaterial"]),
        )
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SignatureError(f"malformed signature bundle ({e!r})") from None
