"""Trust: OMS signatures made by key, certificate chain and Sigstore, checked against policies.

Every signature here is real. The fixtures are the reference implementation's (model_signing)
own signatures: the key- and certificate-signed ones are made by it at test time
(tests/oms_fixtures.py), the Sigstore one is committed (tests/fixtures/oms/). weightship's
own signatures are checked by model_signing's CLI; keyless signing runs sigstore-python
end to end against a private Sigstore instance whose only stand-ins are the Fulcio and
Rekor HTTP endpoints (tests/fake_sigstore.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fake_sigstore import EMAIL_ISSUER, GITHUB_ISSUER, FakeSigstore, identity_token
from tests.helpers import FIXTURES, assert_model_signing_ok, model_signing, run_cli
from tests.oms_fixtures import LEAF_SUBJECT, key_fingerprint
from weightship import release
from weightship.artifact import pack
from weightship.errors import IntegrityError, PolicyError, SignatureError, UsageError
from weightship.trust import oms
from weightship.trust import signers as signing
from weightship.trust import sigstore as keyless
from weightship.trust.bundle import describe_unverified, verify_bundle
from weightship.trust.policy import Identity, TrustPolicy
from weightship.trust.verify import verify_directory

FIXTURE_IDENTITY = "stefanb@us.ibm.com"
FIXTURE_ISSUER = "https://sigstore.verify.ibm.com/oauth2"


def sigstore_policy() -> TrustPolicy:
    return TrustPolicy(identities=[Identity(issuer=FIXTURE_ISSUER, identity=FIXTURE_IDENTITY)], offline=True)


# Each fixture (a folder of the ``oms_fixtures`` root) with the parameters model_signing
# itself verifies it with.
FIXTURE_POLICIES = {
    "v1.1.0-elliptic-key": lambda oms: TrustPolicy(keys=[oms / "keys" / "signing-key-pub.pem"]),
    "v1.1.0-certificate": lambda oms: TrustPolicy(cert_chains=[oms / "keys" / "ca-cert.pem"]),
    "v1.1.0-sigstore": lambda oms: sigstore_policy(),
}

CI_VARIABLES = (
    "GITHUB_ACTIONS",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_URL",
    "GITLAB_CI",
    "SIGSTORE_ID_TOKEN",
    "BUILDKITE",
    "CIRCLECI",
    "GOOGLE_SERVICE_ACCOUNT_NAME",
)


@pytest.fixture(autouse=True)
def _isolated_sigstore(tmp_path_factory, monkeypatch):
    """Keep sigstore's TUF cache out of the home directory, so every run verifies against
    the trusted root shipped in the package, and keep a CI runner's own OIDC credential
    out of the tests."""
    home = tmp_path_factory.mktemp("sigstore-home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    for name in CI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    keyless._verifier.cache_clear()
    yield
    keyless._verifier.cache_clear()


def writable_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dest


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


def sign_dir(model: Path, signer) -> bytes:
    """Sign a directory the way ``weightship sign`` does and write DIR/model.sig."""
    bundle = release.sign_packed(pack.pack(model), signer)
    (model / pack.SIGNATURE_FILE).write_bytes(bundle)
    return bundle


def statement_of(model: Path) -> bytes:
    packed = pack.pack(model)
    return oms.build_statement(
        packed.root.resolve().name,
        packed.manifest.digests(),
        ignore_paths=packed.ignore_paths,
        allow_symlinks=packed.has_symlinks,
    )


# -- the reference implementation's signatures -----------------------------------------


def test_generated_fixtures_verify_with_model_signing(oms_fixtures: Path) -> None:
    """The fixtures made at test time are what the reference verifier accepts."""
    keys = oms_fixtures / "keys"
    for method, name, trust in (
        ("key", "v1.1.0-elliptic-key", ["--public_key", keys / "signing-key-pub.pem"]),
        ("certificate", "v1.1.0-certificate", ["--certificate_chain", keys / "ca-cert.pem"]),
    ):
        model = oms_fixtures / name
        assert_model_signing_ok(
            model_signing(
                "verify",
                method,
                model,
                "--signature",
                model / "model.sig",
                *trust,
                "--ignore-paths",
                model / "ignore-me",
            )
        )


@pytest.mark.parametrize("name", sorted(FIXTURE_POLICIES))
def test_reference_fixture_verifies_offline(name: str, oms_fixtures: Path, tmp_path: Path) -> None:
    model = writable_copy(oms_fixtures / name, tmp_path / name)

    verified = verify_directory(model, FIXTURE_POLICIES[name](oms_fixtures), ignore=["ignore-me"])

    assert sorted(verified.statement.resources) == ["signme-1", "signme-2"]
    signer = verified.signer
    if name == "v1.1.0-elliptic-key":
        pub_pem = oms_fixtures / "keys" / "signing-key-pub.pem"
        pub = signing.load_public_key(pub_pem)
        assert (signer.method, signer.fingerprint) == ("key", signing.key_fingerprint(pub))
        assert signer.fingerprint == key_fingerprint(pub_pem)
    elif name == "v1.1.0-certificate":
        assert (signer.method, signer.subject) == ("certificate", LEAF_SUBJECT)
    else:
        assert (signer.method, signer.identity, signer.issuer) == (
            "sigstore",
            FIXTURE_IDENTITY,
            FIXTURE_ISSUER,
        )
        assert signer.tlog_index == 598151086


@pytest.mark.parametrize("name", sorted(FIXTURE_POLICIES))
def test_reference_fixture_fails_after_one_byte_change(name: str, oms_fixtures: Path, tmp_path: Path) -> None:
    model = writable_copy(oms_fixtures / name, tmp_path / name)
    flip_one_byte(model / "signme-1")

    with pytest.raises(IntegrityError, match="signme-1"):
        verify_directory(model, FIXTURE_POLICIES[name](oms_fixtures), ignore=["ignore-me"])


def test_reference_fixture_fails_when_a_file_is_added(tmp_path: Path) -> None:
    model = writable_copy(FIXTURES / "v1.1.0-sigstore", tmp_path / "m")
    (model / "signme-3").write_text("smuggled")

    with pytest.raises(IntegrityError, match="signme-3"):
        verify_directory(model, sigstore_policy(), ignore=["ignore-me"])


@pytest.mark.parametrize(
    ("identity", "issuer"),
    [
        ("mallory@example.com", FIXTURE_ISSUER),
        (FIXTURE_IDENTITY, "https://accounts.google.com"),
    ],
    ids=["other-identity", "other-issuer"],
)
def test_sigstore_fixture_refuses_other_signer(identity: str, issuer: str, tmp_path: Path) -> None:
    model = writable_copy(FIXTURES / "v1.1.0-sigstore", tmp_path / "m")
    policy = TrustPolicy(identities=[Identity(issuer=issuer, identity=identity)])

    with pytest.raises(PolicyError) as err:
        verify_directory(model, policy, ignore=["ignore-me"])

    message = str(err.value)
    assert "\n" not in message
    assert f"{FIXTURE_IDENTITY} (issuer {FIXTURE_ISSUER})" in message  # found
    assert f"{identity} (issuer {issuer})" in message  # required


def test_sigstore_fixture_with_identity_regex(tmp_path: Path) -> None:
    model = writable_copy(FIXTURES / "v1.1.0-sigstore", tmp_path / "m")
    ok = Identity(issuer=FIXTURE_ISSUER, identity_regex=r"[a-z]+@us\.ibm\.com")
    # A prefix match is not enough: the whole identity must match.
    too_short = Identity(issuer=FIXTURE_ISSUER, identity_regex=r"stefanb@us\.ibm")

    signer = verify_directory(model, TrustPolicy(identities=[ok]), ignore=["ignore-me"]).signer
    assert (signer.identity, signer.issuer) == (FIXTURE_IDENTITY, FIXTURE_ISSUER)
    with pytest.raises(PolicyError, match=FIXTURE_IDENTITY):
        verify_directory(model, TrustPolicy(identities=[too_short]), ignore=["ignore-me"])


def test_sigstore_fixture_tries_every_trusted_identity(tmp_path: Path) -> None:
    model = writable_copy(FIXTURES / "v1.1.0-sigstore", tmp_path / "m")
    policy = TrustPolicy(
        identities=[
            Identity(issuer=GITHUB_ISSUER, identity_regex=r"https://github\.com/acme/.*"),
            Identity(issuer=FIXTURE_ISSUER, identity=FIXTURE_IDENTITY),
        ]
    )

    assert verify_directory(model, policy, ignore=["ignore-me"]).signer.identity == FIXTURE_IDENTITY


def test_sigstore_fixture_without_trusted_identity_says_what_to_pass(oms_fixtures: Path) -> None:
    bundle = (FIXTURES / "v1.1.0-sigstore" / "model.sig").read_bytes()

    with pytest.raises(PolicyError, match="--identity") as err:
        verify_bundle(bundle, TrustPolicy(keys=[oms_fixtures / "keys" / "signing-key-pub.pem"]))
    assert FIXTURE_IDENTITY in str(err.value)


def test_sigstore_fixture_rewritten_statement_does_not_verify(tmp_path: Path) -> None:
    """Tampering with a file and rewriting the signed digest to match must fail on the
    signature, not pass on the digest."""
    model = writable_copy(FIXTURES / "v1.1.0-sigstore", tmp_path / "m")
    flip_one_byte(model / "signme-1")
    raw = json.loads((model / "model.sig").read_text())
    statement = json.loads(base64.b64decode(raw["dsseEnvelope"]["payload"]))
    resources = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    resources["signme-1"] = hashlib.sha256((model / "signme-1").read_bytes()).hexdigest()
    statement["predicate"]["resources"] = [
        {"name": n, "algorithm": "sha256", "digest": d} for n, d in sorted(resources.items())
    ]
    statement["subject"][0]["digest"]["sha256"] = oms.root_digest(resources)
    raw["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (model / "model.sig").write_text(json.dumps(raw))

    with pytest.raises(SignatureError) as err:
        verify_directory(model, sigstore_policy(), ignore=["ignore-me"])
    assert not isinstance(err.value, PolicyError)
    assert "does not verify" in str(err.value)


def test_sigstore_fixture_from_another_instance_is_refused(tmp_path: Path) -> None:
    """A public-good signature checked against a different trusted root fails cleanly."""
    bundle = (FIXTURES / "v1.1.0-sigstore" / "model.sig").read_bytes()
    other = FakeSigstore().write_trust_config(tmp_path / "trust.json")
    policy = TrustPolicy(identities=[Identity(issuer=FIXTURE_ISSUER, identity=FIXTURE_IDENTITY)], trust_config=other)

    with pytest.raises(SignatureError, match=re.escape(f"against the Sigstore instance in {other}")) as err:
        verify_bundle(bundle, policy)
    assert not isinstance(err.value, PolicyError)
    assert "\n" not in str(err.value)


def test_describe_unverified_sigstore_fixture() -> None:
    bundle = (FIXTURES / "v1.1.0-sigstore" / "model.sig").read_bytes()

    assert describe_unverified(bundle) == (
        f"identity {FIXTURE_IDENTITY} (issuer {FIXTURE_ISSUER}), transparency log index 598151086 (unverified)"
    )


# -- certificate chains ----------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(subject, key, issuer_name, issuer_key, *, ca: bool, path_length, start, days):
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(sign=not ca, ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384() if ca else hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_pki(where: Path, label: str = "acme") -> dict[str, Path]:
    """Root CA -> intermediate CA -> code-signing leaf, all EC, as files."""
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    root_key = ec.generate_private_key(ec.SECP384R1())
    int_key = ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name(f"{label} root CA")
    root = _issue(
        root_name, root_key, root_name, root_key, ca=True, path_length=1, start=now - timedelta(days=2), days=3650
    )
    inter = _issue(
        _name(f"{label} signing CA"),
        int_key,
        root_name,
        root_key,
        ca=True,
        path_length=0,
        start=now - timedelta(days=1),
        days=365,
    )
    leaf = _issue(
        _name(f"{label} release signer"),
        leaf_key,
        inter.subject,
        int_key,
        ca=False,
        path_length=None,
        start=now - timedelta(minutes=5),
        days=30,
    )
    files = {"ca": where / "ca.pem", "chain": where / "chain.pem", "key": where / "leaf.pem"}
    files["ca"].write_bytes(_pem(root))
    files["chain"].write_bytes(_pem(leaf, inter))  # leaf first, as --cert-chain expects
    files["key"].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path / "pki")


def test_certificate_signed_minilm_verifies_with_model_signing(
    minilm: Path, pki: dict[str, Path], tmp_path: Path
) -> None:
    proc = run_cli("sign", minilm, "--key", pki["key"], "--cert-chain", pki["chain"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    ref = model_signing(
        "verify",
        "certificate",
        minilm,
        "--signature",
        minilm / "model.sig",
        "--certificate_chain",
        pki["ca"],
    )
    assert_model_signing_ok(ref)
    verified = verify_directory(minilm, TrustPolicy(cert_chains=[pki["ca"]]))
    assert verified.signer.subject == "CN=acme release signer,O=acme"
    assert "model.safetensors" in verified.statement.resources


def test_key_signed_minilm_verifies_with_model_signing(minilm: Path, keypair) -> None:
    key, pub = keypair
    sign_dir(minilm, signing.KeySigner(key))

    assert_model_signing_ok(
        model_signing("verify", "key", minilm, "--signature", minilm / "model.sig", "--public_key", pub)
    )
    assert verify_directory(minilm, TrustPolicy(keys=[pub])).signer.method == "key"


def test_certificate_from_untrusted_ca_is_refused(small_model: Path, pki, tmp_path: Path) -> None:
    bundle = sign_dir(small_model, signing.CertificateSigner(pki["key"], pki["chain"]))
    other = make_pki(tmp_path / "other", label="evil")

    with pytest.raises(PolicyError, match="does not chain to a trusted certificate"):
        verify_bundle(bundle, TrustPolicy(cert_chains=[other["ca"]]))
    with pytest.raises(PolicyError, match="no certificate authority is trusted"):
        verify_bundle(bundle, TrustPolicy(keys=[]))
    assert verify_bundle(bundle, TrustPolicy(cert_chains=[pki["ca"]])).signer.method == "certificate"


def test_certificate_with_tampered_statement_does_not_verify(small_model: Path, pki) -> None:
    bundle = json.loads(sign_dir(small_model, signing.CertificateSigner(pki["key"], pki["chain"])))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["subject"][0]["name"] = "renamed"
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()

    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(json.dumps(bundle).encode(), TrustPolicy(cert_chains=[pki["ca"]]))


# -- policies over key signatures --------------------------------------------------------


def test_key_signature_by_another_key_names_both(small_model: Path, tmp_path: Path) -> None:
    signer_key = tmp_path / "signer.pem"
    signer_pub = signing.generate_key(signer_key)
    trusted_pub = signing.generate_key(tmp_path / "trusted.pem")
    bundle = sign_dir(small_model, signing.KeySigner(signer_key))
    found = signing.key_fingerprint(signing.load_public_key(signer_pub))
    required = signing.key_fingerprint(signing.load_public_key(trusted_pub))

    with pytest.raises(PolicyError) as err:
        verify_bundle(bundle, TrustPolicy(keys=[trusted_pub]))

    assert found[:16] in str(err.value)
    assert required[:16] in str(err.value)
    assert verify_bundle(bundle, TrustPolicy(keys=[trusted_pub, signer_pub])).signer.fingerprint == found


def test_key_signature_without_trusted_key_is_refused(small_model: Path, keypair) -> None:
    key, _ = keypair
    bundle = sign_dir(small_model, signing.KeySigner(key))

    with pytest.raises(PolicyError, match="--key"):
        verify_bundle(bundle, TrustPolicy())


# -- keyless (Sigstore) ------------------------------------------------------------------


@pytest.fixture
def sigstore_instance(monkeypatch, tmp_path: Path) -> tuple[FakeSigstore, Path]:
    fake = FakeSigstore().install(monkeypatch)
    return fake, fake.write_trust_config(tmp_path / "trust-config.json")


def _policy(trust_config: Path, *identities: Identity) -> TrustPolicy:
    return TrustPolicy(identities=list(identities), trust_config=trust_config)


def test_keyless_signature_of_minilm(minilm: Path, sigstore_instance) -> None:
    fake, trust_config = sigstore_instance
    token = identity_token("release-bot@acme.example")
    statement = statement_of(minilm)

    bundle_bytes = keyless.SigstoreSigner(identity_token=token, trust_config=trust_config).sign(statement)

    # Only Fulcio and Rekor were stood in for: one certificate, one log entry.
    assert [r.split()[1].split("/api/")[1] for r in fake.requests] == ["v2/signingCert", "v1/log/entries"]
    from sigstore.models import Bundle

    bundle = Bundle.from_json(bundle_bytes)
    assert bundle._dsse_envelope is not None
    assert base64.b64decode(json.loads(bundle_bytes)["dsseEnvelope"]["payload"]) == statement
    assert bundle.signing_certificate == fake.issued[0]
    envelope = oms.read_bundle(bundle_bytes)
    assert envelope.kind == "sigstore"
    assert envelope.payload == statement

    (minilm / "model.sig").write_bytes(bundle_bytes)
    signer = verify_directory(
        minilm, _policy(trust_config, Identity(issuer=EMAIL_ISSUER, identity="release-bot@acme.example"))
    ).signer
    assert (signer.method, signer.identity, signer.issuer) == (
        "sigstore",
        "release-bot@acme.example",
        EMAIL_ISSUER,
    )
    assert signer.tlog_index == 5  # after the five entries already in the log

    assert_model_signing_ok(
        model_signing(
            "verify",
            "sigstore",
            minilm,
            "--signature",
            minilm / "model.sig",
            "--identity",
            "release-bot@acme.example",
            "--identity_provider",
            EMAIL_ISSUER,
            "--trust_config",
            trust_config,
        )
    )


def test_keyless_github_workflow_identity_and_regex_policy(small_model: Path, sigstore_instance) -> None:
    _, trust_config = sigstore_instance
    workflow = "acme/models/.github/workflows/release.yml@refs/tags/v1.4.0"
    token = identity_token(workflow, issuer=GITHUB_ISSUER)
    bundle = sign_dir(small_model, keyless.SigstoreSigner(identity_token=token, trust_config=trust_config))
    san = f"https://github.com/{workflow}"
    release_tags = Identity(
        issuer=GITHUB_ISSUER,
        identity_regex=r"https://github\.com/acme/models/\.github/workflows/release\.yml@refs/tags/v.*",
    )
    other_repo = Identity(
        issuer=GITHUB_ISSUER,
        identity_regex=r"https://github\.com/acme/other/\.github/workflows/.*",
    )
    right_regex_wrong_issuer = Identity(issuer=EMAIL_ISSUER, identity_regex=r".*")

    signer = verify_bundle(bundle, _policy(trust_config, release_tags)).signer
    assert (signer.identity, signer.issuer) == (san, GITHUB_ISSUER)
    assert describe_unverified(bundle).startswith(f"identity {san} (issuer {GITHUB_ISSUER})")
    for wrong in (other_repo, right_regex_wrong_issuer):
        with pytest.raises(PolicyError) as err:
            verify_bundle(bundle, _policy(trust_config, wrong))
        assert san in str(err.value)
        assert str(wrong) in str(err.value)


def test_keyless_bundle_with_rewritten_payload_does_not_verify(small_model: Path, sigstore_instance) -> None:
    _, trust_config = sigstore_instance
    token = identity_token("release-bot@acme.example")
    bundle = json.loads(sign_dir(small_model, keyless.SigstoreSigner(identity_token=token, trust_config=trust_config)))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["subject"][0]["name"] = "renamed"
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    policy = _policy(trust_config, Identity(issuer=EMAIL_ISSUER, identity="release-bot@acme.example"))

    with pytest.raises(SignatureError) as err:
        verify_bundle(json.dumps(bundle).encode(), policy)
    assert not isinstance(err.value, PolicyError)
    assert "\n" not in str(err.value)


def test_keyless_bundle_against_public_good_root_is_refused(small_model: Path, sigstore_instance) -> None:
    _, trust_config = sigstore_instance
    token = identity_token("release-bot@acme.example")
    bundle = sign_dir(small_model, keyless.SigstoreSigner(identity_token=token, trust_config=trust_config))
    policy = TrustPolicy(identities=[Identity(issuer=EMAIL_ISSUER, identity="release-bot@acme.example")])

    with pytest.raises(SignatureError, match="does not chain to the Fulcio CA of Sigstore public-good"):
        verify_bundle(bundle, policy)


def test_keyless_uses_ambient_ci_credential(small_model: Path, sigstore_instance, monkeypatch) -> None:
    fake, trust_config = sigstore_instance
    # GitLab CI hands the job its token in SIGSTORE_ID_TOKEN (id_tokens: aud: sigstore).
    monkeypatch.setenv("GITLAB_CI", "true")
    monkeypatch.setenv("SIGSTORE_ID_TOKEN", identity_token("ci@acme.example"))

    bundle = sign_dir(small_model, keyless.SigstoreSigner(trust_config=trust_config))

    assert fake.issued[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name
    ) == ["ci@acme.example"]
    policy = _policy(trust_config, Identity(issuer=EMAIL_ISSUER, identity="ci@acme.example"))
    assert verify_bundle(bundle, policy).signer.identity == "ci@acme.example"


def test_keyless_explicit_token_beats_ambient_credential(small_model: Path, sigstore_instance, monkeypatch) -> None:
    fake, trust_config = sigstore_instance
    monkeypatch.setenv("GITLAB_CI", "true")
    monkeypatch.setenv("SIGSTORE_ID_TOKEN", identity_token("ci@acme.example"))

    sign_dir(
        small_model, keyless.SigstoreSigner(identity_token=identity_token("me@acme.example"), trust_config=trust_config)
    )

    assert keyless.cert_identities(fake.issued[0]) == ["me@acme.example"]


def test_keyless_github_job_without_id_token_permission(small_model: Path, sigstore_instance, monkeypatch) -> None:
    fake, trust_config = sigstore_instance
    monkeypatch.setenv("GITHUB_ACTIONS", "true")  # but no ACTIONS_ID_TOKEN_REQUEST_* variables

    with pytest.raises(UsageError, match="id-token: write") as err:
        keyless.SigstoreSigner(trust_config=trust_config).sign(statement_of(small_model))
    assert "\n" not in str(err.value)
    assert fake.requests == []


def test_keyless_without_token_off_a_terminal(small_model: Path, sigstore_instance) -> None:
    fake, trust_config = sigstore_instance
    signer = keyless.SigstoreSigner(trust_config=trust_config, interactive=True)

    # pytest's stdin is not a terminal, so no browser flow may start.
    with pytest.raises(UsageError, match="--identity-token"):
        signer.sign(statement_of(small_model))
    assert fake.requests == []


def test_keyless_expired_or_malformed_token(small_model: Path, sigstore_instance) -> None:
    fake, trust_config = sigstore_instance
    for token in (identity_token("me@acme.example", lifetime=-60), "not.a.jwt"):
        with pytest.raises(UsageError, match="--identity-token"):
            keyless.SigstoreSigner(identity_token=token, trust_config=trust_config).sign(statement_of(small_model))
    assert fake.requests == []


def test_keyless_fulcio_refusal_is_one_line(small_model: Path, sigstore_instance) -> None:
    fake, trust_config = sigstore_instance
    fake.fulcio_refuses = True
    signer = keyless.SigstoreSigner(identity_token=identity_token("me@acme.example"), trust_config=trust_config)

    with pytest.raises(SignatureError, match=r"Fulcio .* refused a signing certificate .*HTTP 401") as err:
        signer.sign(statement_of(small_model))
    assert "\n" not in str(err.value)


def test_keyless_staging_and_trust_config_conflict(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--staging"):
        keyless.SigstoreSigner(staging=True, trust_config=tmp_path / "trust.json")


def test_keyless_bad_identity_regex_is_a_usage_error(tmp_path: Path) -> None:
    bundle = (FIXTURES / "v1.1.0-sigstore" / "model.sig").read_bytes()
    policy = TrustPolicy(identities=[Identity(issuer=FIXTURE_ISSUER, identity_regex="(unclosed")])

    with pytest.raises(UsageError, match="--identity-regex"):
        verify_bundle(bundle, policy)


def _tamper_set(entry: dict) -> None:
    sig = bytearray(base64.b64decode(entry["inclusionPromise"]["signedEntryTimestamp"]))
    sig[-1] ^= 0x01
    entry["inclusionPromise"]["signedEntryTimestamp"] = base64.b64encode(bytes(sig)).decode()


def _tamper_checkpoint(entry: dict) -> None:
    proof = entry["inclusionProof"]
    proof["checkpoint"]["envelope"] = proof["checkpoint"]["envelope"].replace("\n6\n", "\n7\n", 1)


def _tamper_index(entry: dict) -> None:
    entry["inclusionProof"]["logIndex"] = "4"


@pytest.mark.parametrize("tamper", [_tamper_set, _tamper_checkpoint, _tamper_index], ids=["set", "checkpoint", "proof"])
def test_keyless_log_entry_not_from_the_log_is_refused(small_model: Path, sigstore_instance, tamper) -> None:
    """Verification checks the transparency log's promises, not just the signature."""
    _, trust_config = sigstore_instance
    token = identity_token("release-bot@acme.example")
    bundle = json.loads(sign_dir(small_model, keyless.SigstoreSigner(identity_token=token, trust_config=trust_config)))
    tamper(bundle["verificationMaterial"]["tlogEntries"][0])
    policy = _policy(trust_config, Identity(issuer=EMAIL_ISSUER, identity="release-bot@acme.example"))

    with pytest.raises(SignatureError, match=r"invalid log entry|inclusion") as err:
        verify_bundle(json.dumps(bundle).encode(), policy)
    assert not isinstance(err.value, PolicyError)


def test_keyless_certificate_not_from_the_trusted_fulcio_is_refused(
    small_model: Path, sigstore_instance, tmp_path: Path
) -> None:
    _, trust_config = sigstore_instance
    token = identity_token("release-bot@acme.example")
    bundle = sign_dir(small_model, keyless.SigstoreSigner(identity_token=token, trust_config=trust_config))
    # Same services, other keys: an instance the node does not trust.
    impostor = FakeSigstore().write_trust_config(tmp_path / "other-trust-config.json")
    policy = _policy(impostor, Identity(issuer=EMAIL_ISSUER, identity="release-bot@acme.example"))

    with pytest.raises(SignatureError, match="does not chain to the Fulcio CA of the Sigstore instance in"):
        verify_bundle(bundle, policy)
