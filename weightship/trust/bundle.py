"""Checking a signature bundle against a trust policy.

One code path verifies every signature weightship reads (``verify``, ``pull``, and the
node engine). It routes on the bundle's verification material: a public-key hint, an
X.509 chain, or a Sigstore certificate with its transparency-log entry. It returns the
parsed statement and a description of who signed, or raises naming the signer found
and the signer required.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from weightship.errors import PolicyError, SignatureError, UsageError
from weightship.trust import oms
from weightship.trust import signers as signing
from weightship.trust.policy import SignerInfo, TrustPolicy, Verified


def _verify_ecdsa(public_key, envelope: oms.Envelope, who: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public_key.verify(
            envelope.signature,
            oms.pae(envelope.payload, envelope.payload_type),
            ec.ECDSA(signing.hash_for_curve(public_key)),
        )
    except InvalidSignature:
        raise SignatureError(
            f"signature does not verify with {who}: the signed statement was altered or the signature is corrupt"
        ) from None


def _verify_key(envelope: oms.Envelope, policy: TrustPolicy) -> SignerInfo:
    hint = (envelope.material.get("publicKey") or {}).get("hint")
    if not policy.keys:
        raise PolicyError(
            f"release is signed by key {str(hint)[:16]} but no public key is trusted",
            "pass --key PUB.pem or add it to [policy] keys",
        )
    candidates = []
    for path in policy.keys:
        pub = signing.load_public_key(path)
        fp = signing.key_fingerprint(pub)
        if not hint or hint == fp:
            candidates.append((pub, fp, path))
    if not candidates:
        raise PolicyError(
            f"release is signed by key {str(hint)[:16]}, not by a trusted key",
            f"required: {policy.describe()}",
        )
    errors = []
    for pub, fp, path in candidates:
        try:
            _verify_ecdsa(pub, envelope, f"key {path}")
            return SignerInfo("key", fingerprint=fp)
        except SignatureError as e:
            errors.append(e)
    raise errors[0]


def _load_anchors(paths: list[Path]):
    from cryptography import x509

    anchors = []
    for p in paths:
        try:
            anchors += x509.load_pem_x509_certificates(Path(p).read_bytes())
        except OSError as e:
            raise UsageError(f"cannot read certificate chain {p}: {e.strerror}") from None
        except ValueError:
            raise UsageError(f"{p} holds no PEM certificates") from None
    return anchors


def _verify_chain(leaf, intermediates: list, anchors: list) -> None:
    """Walk leaf -> intermediates -> a trusted anchor, checking signatures, CA flags and
    validity at signing time (the leaf's notBefore, as the reference verifier does)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    when = leaf.not_valid_before_utc
    anchor_der = {a.tbs_certificate_bytes for a in anchors}
    current = leaf
    pool = list(intermediates) + list(anchors)
    for _ in range(len(pool) + 1):
        if not (current.not_valid_before_utc <= when <= current.not_valid_after_utc):
            raise SignatureError(f"certificate {current.subject.rfc4514_string()} was not valid at signing time")
        if current.tbs_certificate_bytes in anchor_der:
            return
        issuer = None
        for cand in pool:
            if cand is current:
                continue
            try:
                current.verify_directly_issued_by(cand)
            except (ValueError, TypeError, InvalidSignature):
                continue
            try:
                bc = cand.extensions.get_extension_for_class(x509.BasicConstraints).value
                if not bc.ca:
                    continue
            except x509.ExtensionNotFound:
                continue
            # An issuer whose key usage is stated must be allowed to sign certificates.
            try:
                if not cand.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
                    continue
            except x509.ExtensionNotFound:
                pass
            issuer = cand
            break
        if issuer is None:
            raise PolicyError(
                f"certificate {current.subject.rfc4514_string()} does not chain to a trusted certificate",
                "pass the CA that issued it with --cert-chain",
            )
        current = issuer
    raise SignatureError("certificate chain is too long or loops")


def _verify_certificate(envelope: oms.Envelope, policy: TrustPolicy) -> SignerInfo:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    certs_raw = (envelope.material.get("x509CertificateChain") or {}).get("certificates") or []
    if not certs_raw:
        raise SignatureError("signature certificate chain is empty")
    try:
        certs = [x509.load_der_x509_certificate(oms.unb64(c["rawBytes"], "certificate")) for c in certs_raw]
    except (ValueError, KeyError, TypeError):
        raise SignatureError("signature carries a malformed certificate") from None
    leaf = certs[0]
    subject = leaf.subject.rfc4514_string()
    if not policy.cert_chains:
        raise PolicyError(
            f"release is signed by certificate {subject} but no certificate authority is trusted",
            "pass --cert-chain CA.pem or add it to [policy] cert_chains",
        )
    _verify_chain(leaf, certs[1:], _load_anchors(policy.cert_chains))
    usable = False
    with contextlib.suppress(x509.ExtensionNotFound):
        usable = leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    if not usable:
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            usable = ExtendedKeyUsageOID.CODE_SIGNING in eku
        except x509.ExtensionNotFound:
            pass
    if not usable:
        raise SignatureError(f"certificate {subject} is not allowed to sign (key usage)")
    _verify_ecdsa(leaf.public_key(), envelope, f"certificate {subject}")
    return SignerInfo("certificate", subject=subject)


def _verify_sigstore(bundle_bytes: bytes, envelope: oms.Envelope, policy: TrustPolicy) -> SignerInfo:
    from weightship.trust import sigstore as keyless

    return keyless.verify(bundle_bytes, envelope, policy)


def verify_bundle(bundle_bytes: bytes, policy: TrustPolicy) -> Verified:
    """Check a signature bundle against a policy; return its statement and signer."""
    envelope = oms.read_bundle(bundle_bytes)
    if envelope.payload_type != oms.PAYLOAD_TYPE:
        raise SignatureError(f"unexpected DSSE payload type {envelope.payload_type!r}")
    kind = envelope.kind
    if kind == "key":
        signer = _verify_key(envelope, policy)
    elif kind == "certificate":
        signer = _verify_certificate(envelope, policy)
    else:
        signer = _verify_sigstore(bundle_bytes, envelope, policy)
    return Verified(oms.parse_statement(envelope.payload), signer)


def describe_unverified(bundle_bytes: bytes) -> str:
    """Who a bundle claims to be signed by, without trusting it (for ``show``)."""
    env = oms.read_bundle(bundle_bytes)
    if env.kind == "key":
        return f"key {env.material['publicKey'].get('hint', '?')[:16]} (unverified)"
    if env.kind == "certificate":
        from cryptography import x509

        raw = env.material["x509CertificateChain"]["certificates"][0]["rawBytes"]
        cert = x509.load_der_x509_certificate(oms.unb64(raw, "certificate"))
        return f"certificate {cert.subject.rfc4514_string()} (unverified)"
    from weightship.trust import sigstore as keyless

    return keyless.describe(env) + " (unverified)"
