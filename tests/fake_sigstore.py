"""A private Sigstore instance inside the test process: a Fulcio CA, a CT log, a Rekor log.

Only the two network calls a keyless signature makes are answered here: Fulcio's
``POST /api/v2/signingCert`` and Rekor's ``POST /api/v1/log/entries``, by replacing
``requests.Session.request``. Everything else is sigstore-python's own code: the CSR,
the DSSE envelope over the statement, the SCT check on the certificate, the bundle, and
on the way back the whole verification (chain, SCT, Merkle inclusion proof, signed
checkpoint, signed entry timestamp). Any other HTTP request fails the test, so nothing
here reaches the internet.

The instance is described by a client trust config (``write_trust_config``), which is
how weightship (``--trust-config``) and model_signing (``--trust_config``) are pointed at
a non-public-good Sigstore deployment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import requests
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FULCIO_URL = "https://fulcio.weightship.test"
REKOR_URL = "https://rekor.weightship.test"
CTFE_URL = "https://ctfe.weightship.test"
OIDC_URL = "https://oauth2.weightship.test/auth"
EMAIL_ISSUER = "https://accounts.weightship.test"
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"

_OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
_OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
_OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(key) -> bytes:
    """RFC 6962 key id: sha256 of the DER SubjectPublicKeyInfo (as sigstore computes it)."""
    return hashlib.sha256(_spki(key)).digest()


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    # Whole seconds: SCT and Rekor times are milliseconds/seconds, and sigstore converts
    # them through floats; a fractional second could round to the wrong side.
    return datetime.now(timezone.utc).replace(microsecond=0)


def identity_token(
    identity: str,
    *,
    issuer: str = EMAIL_ISSUER,
    lifetime: int = 600,
    **claims: Any,
) -> str:
    """An unsigned-looking but well-formed OIDC JWT with the claims Fulcio reads.

    sigstore-python never checks the token's signature (Fulcio does, and ours trusts
    it); an email issuer's identity is the ``email`` claim, GitHub's is
    ``job_workflow_ref`` (as a URI SAN), anything else ``sub``.
    """
    now = int(_now().timestamp())
    body: dict[str, Any] = {
        "iss": issuer,
        "aud": "sigstore",
        "sub": identity,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
    }
    if issuer == GITHUB_ISSUER:
        body["job_workflow_ref"] = identity
        body["sub"] = "repo:" + identity.split("/.github/")[0]
    else:
        body["email"] = identity
        body["email_verified"] = True
    body.update(claims)
    return jwt.encode(body, "not-a-real-identity-provider-signing-key", algorithm="HS256")


def _merkle_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two below n
    return _node(_merkle_root(leaves[:k]), _merkle_root(leaves[k:]))


def _merkle_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 audit path, leaf level first (the order sigstore folds it in)."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return [*_merkle_path(index, leaves[:k]), _merkle_root(leaves[k:])]
    return [*_merkle_path(index - k, leaves[k:]), _merkle_root(leaves[:k])]


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


class FakeSigstore:
    """Fulcio, a CT log and Rekor v1, with their keys in a client trust config."""

    def __init__(self) -> None:
        now = _now()
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "weightship.test"),
                x509.NameAttribute(NameOID.COMMON_NAME, "fake-fulcio"),
            ]
        )
        ca_pub = self.ca_key.public_key()
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_pub), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_origin = "rekor.weightship.test - 4242"
        # Someone else's entries already in the log, so inclusion proofs are not trivial.
        self.leaves: list[bytes] = [_leaf_hash(b"earlier entry %d" % i) for i in range(5)]
        self.issued: list[x509.Certificate] = []
        self.requests: list[str] = []
        self.fulcio_refuses = False

    # -- trust config ---------------------------------------------------------------

    def _public_key_json(self, key, start: datetime) -> dict[str, Any]:
        return {
            "rawBytes": b64(_spki(key.public_key())),
            "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": {"start": _iso(start)},
        }

    def trust_config(self) -> dict[str, Any]:
        start = self.ca_cert.not_valid_before_utc
        service = {"majorApiVersion": 1, "validFor": {"start": _iso(start)}, "operator": "weightship.test"}
        return {
            "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
            "trustedRoot": {
                "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
                "tlogs": [
                    {
                        "baseUrl": REKOR_URL,
                        "hashAlgorithm": "SHA2_256",
                        "publicKey": self._public_key_json(self.rekor_key, start),
                        "logId": {"keyId": b64(_key_id(self.rekor_key.public_key()))},
                    }
                ],
                "certificateAuthorities": [
                    {
                        "subject": {"organization": "weightship.test", "commonName": "fake-fulcio"},
                        "uri": FULCIO_URL,
                        "certChain": {
                            "certificates": [{"rawBytes": b64(self.ca_cert.public_bytes(serialization.Encoding.DER))}]
                        },
                        "validFor": {"start": _iso(start)},
                    }
                ],
                "ctlogs": [
                    {
                        "baseUrl": CTFE_URL,
                        "hashAlgorithm": "SHA2_256",
                        "publicKey": self._public_key_json(self.ct_key, start),
                        "logId": {"keyId": b64(_key_id(self.ct_key.public_key()))},
                    }
                ],
                "timestampAuthorities": [],
            },
            "signingConfig": {
                "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
                "caUrls": [{"url": FULCIO_URL, **service}],
                "oidcUrls": [{"url": OIDC_URL, **service}],
                "rekorTlogUrls": [{"url": REKOR_URL, **service}],
                "tsaUrls": [],
                "rekorTlogConfig": {"selector": "ANY"},
                "tsaConfig": {"selector": "ANY"},
            },
        }

    def write_trust_config(self, path: Path) -> Path:
        path.write_text(json.dumps(self.trust_config(), indent=2))
        return path

    # -- Fulcio ----------------------------------------------------------------------

    def _sct_list(self, tbs_precert: bytes, when: datetime) -> bytes:
        """A TLS-encoded SignedCertificateTimestampList with one precert SCT (RFC 6962)."""
        timestamp = int(when.timestamp()) * 1000
        issuer_key_id = _key_id(self.ca_key.public_key())
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp, 1)  # v1, certificate_timestamp, precert_entry
            + issuer_key_id
            + len(tbs_precert).to_bytes(3, "big")
            + tbs_precert
            + struct.pack("!H", 0)  # no extensions
        )
        signature = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        sct = (
            struct.pack("!B", 0)
            + _key_id(self.ct_key.public_key())
            + struct.pack("!QH", timestamp, 0)
            + struct.pack("!BBH", 4, 3, len(signature))  # sha256, ecdsa
            + signature
        )
        serialized = struct.pack("!H", len(sct)) + sct
        return struct.pack("!H", len(serialized)) + serialized

    def issue(self, csr: x509.CertificateSigningRequest, claims: dict[str, Any]) -> x509.Certificate:
        """What Fulcio does: a 10-minute code-signing certificate naming the token's identity."""
        issuer = claims["iss"]
        if issuer == GITHUB_ISSUER:
            san: x509.GeneralName = x509.UniformResourceIdentifier("https://github.com/" + claims["job_workflow_ref"])
        else:
            san = x509.RFC822Name(claims["email"])
        now = _now()
        pub = csr.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=5))
            .not_valid_after(now + timedelta(minutes=10))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            # An empty subject makes the SAN the only name, so it must be critical.
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.UnrecognizedExtension(_OID_ISSUER_V1, issuer.encode()), critical=False)
            .add_extension(x509.UnrecognizedExtension(_OID_ISSUER_V2, _der(0x0C, issuer.encode())), critical=False)
        )
        precert = builder.sign(self.ca_key, hashes.SHA256())
        scts = self._sct_list(precert.tbs_certificate_bytes, now)
        cert = builder.add_extension(x509.UnrecognizedExtension(_OID_SCT_LIST, _der(0x04, scts)), critical=False).sign(
            self.ca_key, hashes.SHA256()
        )
        # The SCT signs the certificate minus its SCT list; that must be what we signed.
        assert cert.tbs_precertificate_bytes == precert.tbs_certificate_bytes
        self.issued.append(cert)
        return cert

    def _fulcio(self, headers: dict[str, str], data: str) -> tuple[int, dict[str, Any]]:
        token = headers["Authorization"].removeprefix("Bearer ")
        claims = jwt.decode(token, options={"verify_signature": False}, audience="sigstore")
        if self.fulcio_refuses:
            return 401, {"code": 401, "message": "error processing the identity token"}
        pem = base64.b64decode(json.loads(data)["certificateSigningRequest"])
        csr = x509.load_pem_x509_csr(pem)
        assert csr.is_signature_valid  # proof of possession of the ephemeral key
        cert = self.issue(csr, claims)
        chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, self.ca_cert)]
        return 201, {"signedCertificateEmbeddedSct": {"chain": {"certificates": chain}}}

    # -- Rekor -----------------------------------------------------------------------

    def _rekor(self, proposed: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Integrate a proposed dsse entry the way Rekor v1 does and answer with the
        entry, its signed entry timestamp, and an inclusion proof to a signed checkpoint."""
        assert proposed["kind"] == "dsse", proposed["kind"]
        content = proposed["spec"]["proposedContent"]
        envelope = json.loads(content["envelope"])
        body = {
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "envelopeHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(content["envelope"].encode()).hexdigest(),
                },
                "payloadHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(base64.b64decode(envelope["payload"])).hexdigest(),
                },
                "signatures": [
                    {"signature": s["sig"], "verifier": content["verifiers"][0]} for s in envelope["signatures"]
                ],
            },
        }
        canonical = rfc8785.dumps(body)
        index = len(self.leaves)
        self.leaves.append(_leaf_hash(canonical))
        size = len(self.leaves)
        root = _merkle_root(self.leaves)
        log_key = self.rekor_key.public_key()
        log_id = _key_id(log_key).hex()
        integrated = int(_now().timestamp())
        set_payload = rfc8785.dumps(
            {"body": b64(canonical), "integratedTime": integrated, "logID": log_id, "logIndex": index}
        )
        note = f"{self.rekor_origin}\n{size}\n{b64(root)}\n"
        note_sig = self.rekor_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        checkpoint = note + "\n" + f"\u2014 rekor.weightship.test {b64(_key_id(log_key)[:4] + note_sig)}\n"
        entry = {
            "body": b64(canonical),
            "integratedTime": integrated,
            "logID": log_id,
            "logIndex": index,
            "verification": {
                "inclusionProof": {
                    "checkpoint": checkpoint,
                    "hashes": [h.hex() for h in _merkle_path(index, self.leaves)],
                    "logIndex": index,
                    "rootHash": root.hex(),
                    "treeSize": size,
                },
                "signedEntryTimestamp": b64(self.rekor_key.sign(set_payload, ec.ECDSA(hashes.SHA256()))),
            },
        }
        uuid = hashlib.sha256(canonical).hexdigest()
        return 201, {uuid: entry}

    # -- the network boundary ----------------------------------------------------------

    def _answer(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self.requests.append(f"{method} {url}")
        if method == "POST" and url == f"{FULCIO_URL}/api/v2/signingCert":
            status, body = self._fulcio(kwargs.get("headers") or {}, kwargs["data"])
        elif method == "POST" and url == f"{REKOR_URL}/api/v1/log/entries":
            status, body = self._rekor(kwargs["json"])
        else:
            raise requests.ConnectionError(f"the test blocks network access ({method} {url})")
        resp = requests.Response()
        resp.status_code = status
        resp._content = json.dumps(body).encode()
        resp.headers["Content-Type"] = "application/json"
        resp.encoding = "utf-8"
        resp.url = url
        return resp

    def install(self, monkeypatch) -> FakeSigstore:
        fake = self

        def request(session, method, url, *args, **kwargs):
            return fake._answer(method.upper(), url, **kwargs)

        monkeypatch.setattr(requests.Session, "request", request)
        return self
