"""OMS interoperability fixtures, signed by the reference implementation at test time.

The key-signed and certificate-signed folders are made here, once per session, by
``python -m model_signing sign key|certificate`` (the reference signer, a separate
process): a fresh EC P-256 signing key, an RSA root CA -> RSA intermediate CA -> EC leaf
chain (as in the reference project's own fixtures), and a model folder with ``signme-1``,
``signme-2`` and ``ignore-me``, which the signature leaves out. The Sigstore-signed folder
cannot be made offline; it is committed in tests/fixtures/oms/ (see its README.md).

The result is laid out as the reference project's fixtures are::

    ROOT/keys/{signing-key-pub.pem, signing-key-cert.pem, int-ca-cert.pem, ca-cert.pem}
    ROOT/v1.1.0-elliptic-key/   ROOT/v1.1.0-certificate/   ROOT/v1.1.0-sigstore/
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.helpers import FIXTURES

ELLIPTIC = "v1.1.0-elliptic-key"
CERTIFICATE = "v1.1.0-certificate"
SIGSTORE = "v1.1.0-sigstore"
# The subject of the certificate-signed fixture's leaf, as a verifier reports it.
LEAF_SUBJECT = "CN=model-signing-leaf"


def key_fingerprint(pub_pem: Path) -> str:
    """What OMS puts in ``publicKey.hint``: sha256 of the PEM public key file."""
    return hashlib.sha256(pub_pem.read_bytes()).hexdigest()


def build(root: Path) -> Path:
    """Make ROOT/keys and the three signed folders; returns ROOT."""
    keys = root / "keys"
    keys.mkdir(parents=True)
    private = root / "private"
    private.mkdir()
    _make_keys(keys, private)
    for name in (ELLIPTIC, CERTIFICATE):
        model = root / name
        model.mkdir()
        (model / "signme-1").write_bytes(b"signme-1")
        (model / "signme-2").write_bytes(b"signme-2")
        (model / "ignore-me").write_bytes(b"")
    _reference_sign("key", root / ELLIPTIC, "--private_key", private / "signing-key.pem")
    _reference_sign(
        "certificate",
        root / CERTIFICATE,
        "--private_key",
        private / "signing-key.pem",
        "--signing_certificate",
        keys / "signing-key-cert.pem",
        "--certificate_chain",
        keys / "int-ca-cert.pem",
    )
    shutil.copytree(FIXTURES / SIGSTORE, root / SIGSTORE)
    for p in [root / SIGSTORE, *(root / SIGSTORE).rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return root


def _reference_sign(method: str, model: Path, *args: str | Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "sign",
            method,
            str(model),
            "--signature",
            str(model / "model.sig"),
            "--ignore-paths",
            str(model / "ignore-me"),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and (model / "model.sig").is_file(), (
        f"model_signing sign {method} failed:\n{proc.stdout}{proc.stderr}"
    )


def _make_keys(keys: Path, private: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    int_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    leaf_key = ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    root_name = name("root-ca")
    root_cert = issue(root_name, root_key, root_name, root_key, ca=True)
    int_cert = issue(name("intermediate-ca"), int_key, root_name, root_key, ca=True)
    leaf_cert = issue(name(LEAF_SUBJECT.removeprefix("CN=")), leaf_key, int_cert.subject, int_key, ca=False)

    pem = serialization.Encoding.PEM
    (private / "signing-key.pem").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (keys / "signing-key-pub.pem").write_bytes(
        leaf_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (keys / "signing-key-cert.pem").write_bytes(leaf_cert.public_bytes(pem))
    (keys / "int-ca-cert.pem").write_bytes(int_cert.public_bytes(pem))
    (keys / "ca-cert.pem").write_bytes(root_cert.public_bytes(pem))
