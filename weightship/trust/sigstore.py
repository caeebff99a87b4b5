"""Sigstore keyless signing and verification (sigstore-python 4.x).

Signing asks Fulcio for a short-lived certificate bound to an OIDC identity, signs the
exact OMS statement bytes as a DSSE envelope and records the signature in Rekor; the
bundle is sigstore-python's own, as ``model_signing sign sigstore`` writes it.
Verification checks that bundle against a Sigstore trusted root (the one shipped in
the sigstore package when offline) and against the identities a policy trusts.

sigstore is imported inside functions: it pulls in pydantic, requests and TUF, and
``weightship --help`` must not pay for that.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from weightship.errors import PolicyError, SignatureError, UsageError
from weightship.trust import oms

if TYPE_CHECKING:
    from weightship.trust.policy import Identity, SignerInfo, TrustPolicy

# Fulcio certificate extensions, see https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md
_OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"  # raw string (deprecated, still issued)
_OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"  # DER UTF8String
_OID_OTHERNAME = "1.3.6.1.4.1.57264.1.7"  # SAN otherName for "username" identities

_CLIENT_ID = "sigstore"

_NO_TOKEN_HINT = (
    "pass --identity-token TOKEN, or run in CI with an OIDC credential (GitHub Actions: permissions: id-token: write)"
)


def _trust_config(staging: bool, trust_config: Path | None, *, offline: bool):
    """The ClientTrustConfig for the selected Sigstore instance."""
    from sigstore.models import ClientTrustConfig

    if trust_config is not None:
        try:
            text = Path(trust_config).read_text()
        except OSError as e:
            raise UsageError(f"cannot read trust config {trust_config}: {e.strerror}") from None
        try:
            return ClientTrustConfig.from_json(text)
        except ValueError as e:
            raise UsageError(
                f"{trust_config} is not a Sigstore client trust config ({_first_line(e)})",
                "write one with `sigstore trust-instance` or pass --staging",
            ) from None
    if staging:
        return ClientTrustConfig.staging(offline=offline)
    return ClientTrustConfig.production(offline=offline)


def _instance_name(staging: bool, trust_config: Path | None) -> str:
    if trust_config is not None:
        return f"the Sigstore instance in {trust_config}"
    return "Sigstore staging" if staging else "Sigstore public-good"


def _http_detail(e: BaseException) -> str:
    """sigstore's client errors often carry only the HTTP error they wrap."""
    if str(e).strip():
        return _first_line(e)
    response = getattr(e.__cause__, "response", None)
    if response is None:
        return _first_line(e)
    try:
        message = str(response.json().get("message", "")).strip()
    except (ValueError, AttributeError):
        message = ""
    return f"HTTP {response.status_code}" + (f": {message}" if message else "")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """sigstore's messages can span lines and carry whole proofs; weightship errors are
    one line a person can read."""
    text = str(e).strip()
    line = " ".join(text.splitlines()[0].split()) if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- signing -------------------------------------------------------------------------


class SigstoreSigner:
    """Sign keyless: an OIDC identity token buys a short-lived Fulcio certificate."""

    method = "sigstore"

    def __init__(
        self,
        identity_token: str | None = None,
        *,
        staging: bool = False,
        trust_config: Path | None = None,
        oidc_issuer: str | None = None,
        interactive: bool = True,
    ) -> None:
        if staging and trust_config is not None:
            raise UsageError(
                "--staging and --trust-config select different Sigstore instances",
                "pass only one of them",
            )
        if trust_config is not None and not Path(trust_config).is_file():
            raise UsageError(f"trust config {trust_config} does not exist")
        self._token = identity_token
        self._staging = staging
        self._trust_config = Path(trust_config) if trust_config is not None else None
        self._oidc_issuer = oidc_issuer
        self._interactive = interactive

    def _identity_token(self, config):
        """Explicit token, then the ambient CI credential, then a browser on a terminal
        (the order sigstore-python and model_signing use)."""
        from sigstore.oidc import IdentityError, IdentityToken, Issuer, detect_credential

        if self._token:
            try:
                return IdentityToken(self._token, _CLIENT_ID)
            except IdentityError as e:
                raise UsageError(
                    f"--identity-token is not a usable OIDC token ({_first_line(e)})",
                    "get a fresh token with audience 'sigstore'",
                ) from None
        try:
            ambient = detect_credential(_CLIENT_ID)
        except IdentityError as e:
            raise UsageError(
                f"the CI OIDC credential could not be fetched ({_first_line(e)})",
                "in GitHub Actions give the job `permissions: id-token: write`; pull requests from forks cannot sign",
            ) from None
        if ambient:
            try:
                return IdentityToken(ambient, _CLIENT_ID)
            except IdentityError as e:
                raise UsageError(f"the CI OIDC credential is not usable ({_first_line(e)})") from None
        if not (self._interactive and sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError("no OIDC identity token for Sigstore signing", _NO_TOKEN_HINT)
        issuer_url = self._oidc_issuer or config.signing_config.get_oidc_url()
        try:
            return Issuer(issuer_url).identity_token(client_id=_CLIENT_ID, client_secret="")
        except IdentityError as e:
            raise UsageError(f"OIDC sign-in with {issuer_url} failed ({_first_line(e)})") from None

    def sign(self, payload: bytes) -> bytes:
        """Sign the OMS statement bytes; return the Sigstore bundle as JSON bytes."""
        import requests
        from sigstore import dsse
        from sigstore._internal.fulcio.client import ExpiredCertificate, FulcioClientError
        from sigstore._internal.rekor import RekorClientError
        from sigstore.errors import Error as SigstoreError
        from sigstore.errors import NetworkError, TUFError
        from sigstore.oidc import ExpiredIdentity, IssuerError
        from sigstore.sign import SigningContext

        where = _instance_name(self._staging, self._trust_config)
        try:
            # Signing talks to Fulcio and Rekor anyway, so refresh the instance's
            # configuration (service URLs, keys) through TUF rather than trust a stale copy.
            config = _trust_config(self._staging, self._trust_config, offline=False)
            token = self._identity_token(config)
            context = SigningContext.from_trust_config(config)
            statement = dsse.Statement(payload)
            with context.signer(token, cache=True) as signer:
                bundle = signer.sign_dsse(statement)
        except TUFError as e:
            raise SignatureError(
                f"cannot refresh the trust root of {where} through TUF ({_first_line(e)})",
                "check network access to the TUF repository",
            ) from None
        except ExpiredIdentity:
            raise UsageError("the OIDC identity token has expired", "get a fresh one") from None
        except ExpiredCertificate:
            raise SignatureError("the Fulcio signing certificate expired before signing finished") from None
        except FulcioClientError as e:
            raise SignatureError(
                f"Fulcio at {where} refused a signing certificate ({_http_detail(e)})",
                "is the identity token from an issuer this instance accepts, and still valid?",
            ) from None
        except RekorClientError as e:
            raise SignatureError(f"Rekor at {where} refused the log entry ({_http_detail(e)})") from None
        except (NetworkError, IssuerError, requests.RequestException) as e:
            raise SignatureError(f"cannot reach {where} ({_first_line(e)})", "check network access and retry") from None
        except SigstoreError as e:
            raise SignatureError(f"Sigstore signing failed ({_first_line(e)})") from None
        data = bundle.to_json().encode()
        # The statement bytes are what publish hashed and recorded; sigstore keeps them
        # opaque, and this makes sure a future version does not re-serialise them.
        if oms.read_bundle(data).payload != payload:
            raise SignatureError("sigstore changed the statement bytes while signing")
        return data


# -- reading the Fulcio certificate ---------------------------------------------------


def _der_utf8(value: bytes) -> str | None:
    """Decode a DER UTF8String (tag 0x0c, short or long length), else None."""
    if len(value) < 2 or value[0] != 0x0C:
        return None
    length, offset = value[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or len(value) < 2 + n:
            return None
        length, offset = int.from_bytes(value[2 : 2 + n], "big"), 2 + n
    if len(value) != offset + length:
        return None
    try:
        return value[offset:].decode()
    except UnicodeDecodeError:
        return None


def cert_issuer(cert) -> str | None:
    """The OIDC issuer Fulcio recorded in the certificate."""
    from cryptography import x509

    for dotted, der in ((_OID_ISSUER_V2, True), (_OID_ISSUER_V1, False)):
        try:
            raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(dotted)).value.value
        except x509.ExtensionNotFound:
            continue
        text = _der_utf8(raw) if der else raw.decode(errors="replace")
        if text:
            return text
    return None


def cert_identities(cert) -> list[str]:
    """The identities in the certificate's SAN, as sigstore's Identity policy reads them."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = list(san.get_values_for_type(x509.RFC822Name))
    out += san.get_values_for_type(x509.UniformResourceIdentifier)
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id.dotted_string == _OID_OTHERNAME:
            out.append(_der_utf8(other.value) or other.value.decode(errors="replace"))
    return out


def _leaf(envelope: oms.Envelope):
    from cryptography import x509

    try:
        raw = envelope.material["certificate"]["rawBytes"]
        return x509.load_der_x509_certificate(oms.unb64(raw, "certificate"))
    except (KeyError, TypeError, ValueError):
        raise SignatureError("Sigstore signature carries a malformed certificate") from None


def _tlog_index(envelope: oms.Envelope) -> int | None:
    try:
        return int(envelope.material["tlogEntries"][0]["logIndex"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _who(cert) -> tuple[str, str]:
    ids = cert_identities(cert)
    return (ids[0] if ids else "?"), (cert_issuer(cert) or "?")


def describe(envelope: oms.Envelope) -> str:
    """Who the Fulcio certificate names, without checking anything."""
    identity, issuer = _who(_leaf(envelope))
    text = f"identity {identity} (issuer {issuer})"
    index = _tlog_index(envelope)
    if index is not None:
        text += f", transparency log index {index}"
    return text


# -- verification --------------------------------------------------------------------


class _TrustedIdentities:
    """A sigstore VerificationPolicy accepting any one of a policy's identities.

    Exact identities go through sigstore's own ``Identity`` policy; regex identities
    are matched here against the same SAN values and the issuer extension. sigstore
    calls this only after the certificate chained to Fulcio and its SCT verified, so
    what it reads is authenticated.
    """

    def __init__(self, identities: list[Identity]) -> None:
        self._identities = identities
        self.matched: Identity | None = None
        self.matched_san: str | None = None
        self.rejected = False

    def verify(self, cert) -> None:
        from sigstore.errors import VerificationError
        from sigstore.verify.policy import Identity as SigstoreIdentity

        issuer = cert_issuer(cert)
        sans = cert_identities(cert)
        for ident in self._identities:
            if ident.identity_regex is None:
                try:
                    SigstoreIdentity(identity=str(ident.identity), issuer=ident.issuer).verify(cert)
                except VerificationError:
                    continue
                self.matched, self.matched_san = ident, ident.identity
                return
            for san in sans:
                if issuer is not None and ident.matches(san, issuer):
                    self.matched, self.matched_san = ident, san
                    return
        self.rejected = True
        raise VerificationError("certificate identity is not trusted by the policy")


@functools.lru_cache(maxsize=8)
def _verifier(staging: bool, trust_config: str | None, offline: bool):
    """One sigstore Verifier per instance per process: building it parses the trusted
    root, and when online refreshes it through TUF."""
    from sigstore.verify import Verifier

    if offline:
        # Offline is weightship's normal mode, not something to warn about on every verify.
        logging.getLogger("sigstore._internal.tuf").setLevel(logging.ERROR)
    if trust_config is not None:
        config = _trust_config(False, Path(trust_config), offline=offline)
        return Verifier(trusted_root=config.trusted_root)
    if staging:
        return Verifier.staging(offline=offline)
    return Verifier.production(offline=offline)


def _check_regexes(identities: list[Identity]) -> None:
    for ident in identities:
        if ident.identity_regex is not None:
            try:
                re.compile(ident.identity_regex)
            except re.error as e:
                raise UsageError(f"--identity-regex {ident.identity_regex!r} is not a regex ({e})") from None


def verify(bundle_bytes: bytes, envelope: oms.Envelope, policy: TrustPolicy) -> SignerInfo:
    """Verify a Sigstore bundle and that one of the policy's identities signed it."""
    from sigstore.errors import CertValidationError, TUFError, VerificationError
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle

    from weightship.trust.policy import SignerInfo

    found_identity, found_issuer = _who(_leaf(envelope))
    found = f"{found_identity} (issuer {found_issuer})"
    if not policy.identities:
        raise PolicyError(
            f"release is signed with Sigstore by {found} but no Sigstore identity is trusted",
            "pass --identity ID --issuer URL (or --identity-regex) for the signer you trust, "
            "or add it to [policy] identities",
        )
    _check_regexes(policy.identities)
    where = _instance_name(policy.staging and policy.trust_config is None, policy.trust_config)
    required = " or ".join(str(i) for i in policy.identities)
    trusted = _TrustedIdentities(policy.identities)
    try:
        verifier = _verifier(
            policy.staging,
            str(policy.trust_config) if policy.trust_config is not None else None,
            policy.offline,
        )
        bundle = Bundle.from_json(bundle_bytes)
        payload_type, payload = verifier.verify_dsse(bundle, trusted)
    except TUFError as e:
        raise SignatureError(
            f"cannot refresh the trust root of {where} through TUF ({_first_line(e)})",
            "verify with --offline to use the trusted root shipped with sigstore",
        ) from None
    except VerificationError as e:
        if trusted.rejected:
            raise PolicyError(
                f"release is signed with Sigstore by {found}, not by a trusted identity",
                f"required: {required}",
            ) from None
        if isinstance(e, CertValidationError):
            raise SignatureError(
                f"the Sigstore certificate of {found} does not chain to the Fulcio CA of {where} "
                f"at signing time ({_first_line(e, 160)})",
                "if it was signed on another Sigstore instance pass --staging or --trust-config",
            ) from None
        raise SignatureError(
            f"Sigstore signature by {found} does not verify against {where} ({_first_line(e, 160)})",
            "it was altered, or signed on another Sigstore instance (--staging, --trust-config)",
        ) from None
    except (SigstoreError, ValueError, TypeError, KeyError) as e:
        raise SignatureError(f"malformed Sigstore bundle ({_first_line(e)})") from None
    except OSError as e:
        raise SignatureError(f"cannot load the trusted root of {where} ({e})") from None
    # weightship parses the statement from its own read of the bundle: it must be the
    # very payload sigstore just verified.
    if payload_type != envelope.payload_type or payload != envelope.payload:
        raise SignatureError("Sigstore verified a different payload than the bundle carries")
    matched = trusted.matched
    if matched is None:  # verify_dsse returned, so the policy must have accepted someone
        raise SignatureError("Sigstore verification ended without checking the signer's identity")
    return SignerInfo(
        method="sigstore",
        identity=trusted.matched_san,
        issuer=matched.issuer,
        tlog_index=_tlog_index(envelope),
    )
