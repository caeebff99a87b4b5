"""Signers: turn OMS statement bytes into a signature bundle.

``KeySigner`` signs with a PEM EC private key (the reference signer's ``key`` method);
``CertificateSigner`` adds an X.509 chain (its ``certificate`` method). Keyless
Sigstore signing lives in ``weightship.keyless``. Every signer has one method,
``sign(payload) -> bundle bytes``, and a ``method`` name recorded in the manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from weightship.errors import SignatureError, UsageError
from weightship.trust import oms


class Signer(Protocol):
    method: str

    def sign(self, payload: bytes) -> bytes: ...


def _ec():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec


def hash_for_curve(public_key):
    """The digest OMS pairs with each curve (as Sigstore's key details do)."""
    from cryptography.hazmat.primitives import hashes

    size = public_key.curve.key_size
    if size == 256:
        return hashes.SHA256()
    if size == 384:
        return hashes.SHA384()
    if size == 521:
        return hashes.SHA512()
    raise SignatureError(f"unsupported EC curve {public_key.curve.name}")


def check_curve(public_key, where: str) -> None:
    ec = _ec()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise UsageError(f"{where}: only EC P-256, P-384 and P-521 keys are supported")


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_key) -> str:
    """sha256 of the PEM public key: the bundle's ``publicKey.hint``."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def load_private_key(path: Path, password: str | None = None):
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError:
        raise UsageError(f"key {path} is encrypted", "pass --key-password or set WEIGHTSHIP_KEY_PASSWORD") from None
    except ValueError as e:
        raise UsageError(f"cannot load private key {path} ({e})", "is the password right?") from None
    check_curve(key.public_key(), str(path))
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read public key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key file names its public key too
            key = serialization.load_pem_private_key(data, None).public_key()
        except (ValueError, TypeError):
            raise UsageError(f"{path} is not a PEM public key") from None
    check_curve(key, str(path))
    return key


def public_key_path(path: Path) -> Path:
    """Where ``keygen`` puts the public key of the private key at ``path``: release.pem -> release.pub."""
    return Path(path).with_suffix(".pub")


def generate_key(path: Path, curve: str = "P-256", *, force: bool = False) -> Path:
    """Write a new EC private key (PEM, 0600) at ``path`` and its public key beside it
    (:func:`public_key_path`); return the public key's path.

    Neither file is ever overwritten unless ``force``, and neither is ever half-written:
    each is written to a temporary file in the same directory, synced, then linked into
    place (which fails if the name exists) or, with ``force``, renamed over it.
    """
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if path.suffix.lower() == ".pub":
        # The private key would go to x.pub, then the public key over it: the key is lost.
        raise UsageError(
            f"{path} ends in .pub, but keygen takes the private key's path",
            "name the private key file, e.g. release.pem (release.pub is written beside it)",
        )
    pub = public_key_path(path)
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist", "create it first")
    if not force:
        for existing in (path, pub):
            if existing.exists() or existing.is_symlink():
                raise _exists(existing)
    ec = _ec()
    curves = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
    key = ec.generate_private_key(curves[curve]())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _install(path, pem, 0o600, force)
    try:
        _install(pub, public_pem(key.public_key()), 0o644, force)
    except BaseException:
        if not force:
            # The public key appeared meanwhile (another keygen): a new private key without
            # its public key is of no use, and nobody has seen it yet.
            path.unlink(missing_ok=True)
        raise
    return pub


def _exists(path: Path) -> UsageError:
    return UsageError(f"{path} exists", "choose another path, or pass --force to replace the key pair")


def _install(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """Put ``data`` at ``path`` whole or not at all; without ``replace``, never over an existing file."""
    import errno
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: the temporary name is ours alone. The mode is set at creation (the umask can
    # only narrow it), so a private key is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails with EEXIST rather than overwrite
            except FileExistsError:
                raise _exists(path) from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # A filesystem without hard links (FAT, some network mounts): check, then
                # rename; only a keygen racing this one in the same directory could slip in.
                if path.exists() or path.is_symlink():
                    raise _exists(path) from None
                os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name survives a crash too
    finally:
        os.close(dir_fd)


class KeySigner:
    """Sign with a local EC private key; the bundle names the key by its fingerprint."""

    method = "key"

    def __init__(self, key_path: Path, password: str | None = None) -> None:
        self._key = load_private_key(key_path, password)

    def _sign(self, payload: bytes) -> bytes:
        ec = _ec()
        pub = self._key.public_key()
        return self._key.sign(oms.pae(payload), ec.ECDSA(hash_for_curve(pub)))

    def _material(self) -> dict:
        return {"publicKey": {"hint": key_fingerprint(self._key.public_key())}, "tlogEntries": []}

    def sign(self, payload: bytes) -> bytes:
        return oms.make_bundle(payload, self._sign(payload), self._material())


class CertificateSigner(KeySigner):
    """Sign with a key whose certificate chain (leaf first) travels in the bundle."""

    method = "certificate"

    def __init__(self, key_path: Path, chain_path: Path, password: str | None = None) -> None:
        from cryptography import x509

        super().__init__(key_path, password)
        try:
            certs = x509.load_pem_x509_certificates(Path(chain_path).read_bytes())
        except OSError as e:
            raise UsageError(f"cannot read certificate chain {chain_path}: {e.strerror}") from None
        except ValueError:
            raise UsageError(f"{chain_path} holds no PEM certificates") from None
        if certs[0].public_key() != self._key.public_key():
            raise UsageError(
                f"the first certificate in {chain_path} is not for this key",
                "put the signing (leaf) certificate first, then its issuers",
            )
        self._chain = certs

    def _material(self) -> dict:
        from cryptography.hazmat.primitives import serialization

        return {
            "x509CertificateChain": {
                "certificates": [{"rawBytes": oms.b64(c.public_bytes(serialization.Encoding.DER))} for c in self._chain]
            },
            "tlogEntries": [],
        }
