"""The release lifecycle beyond publish: an idempotent publish retry, rm, untag, tag's
previous target, prune with its grace period (and its race with a publish that reuses a
blob), pull --force / --include / --exclude, and pull's word about an absent policy.

Store commands run against every store kind (``store_url``: file, s3 on a real
SeaweedFS, az on a real Azurite), as real ``weightship`` processes; the JSON documents
are checked against their shipped schemas.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import weightship
from tests.fleetkit import cli_json, model, source_files, spawn_cli, tree
from tests.helpers import error_line, run_cli
from weightship import release, schemas
from weightship.errors import ConflictError, NotFoundError, UsageError
from weightship.store import Store, blob_key, open_store
from weightship.trust.policy import TrustPolicy
from weightship.trust.signers import KeySigner, generate_key


@pytest.fixture(params=["file", "s3", "az"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue(f"{request.param}_store_url")


def valid(doc: dict[str, Any], schema_id: str) -> dict[str, Any]:
    assert doc["schema"] == schema_id
    errors = sorted(e.message for e in Draft202012Validator(schemas.load(schema_id)).iter_errors(doc))
    assert not errors, errors
    return doc


def cli_doc(proc, schema_id: str) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return valid(cli_json(proc), schema_id)


def keys_of(url: str) -> list[str]:
    st = open_store(url)
    try:
        return st.list("blobs/") + st.list("releases/") + st.list("tags/")
    finally:
        st.close()


def variant(src: Path, dest: Path, config: str) -> Path:
    """A copy of a model with another config.json: every other blob shared."""
    shutil.copytree(src, dest)
    (dest / "config.json").write_text(config)
    return dest


def file_blob_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. a retried publish ---------------------------------------------------------------


def test_a_retried_publish_succeeds_and_anything_else_is_refused(store_url: str, tmp_path: Path, keypair) -> None:
    key, _pub = keypair
    src = model(tmp_path, 1)
    first = cli_doc(
        run_cli("publish", src, "m:1", "--key", key, "--store", store_url, "--json"), "weightship.publish/v1"
    )
    assert first["already_published"] is False

    # The CI job runs again: same files, same key (a new, different ECDSA signature).
    again = run_cli("publish", src, "m:1", "--key", key, "--tag", "prod", "--store", store_url, "--json")
    doc = cli_doc(again, "weightship.publish/v1")
    assert doc["already_published"] is True
    assert doc["digest"] == first["digest"] and doc["release"] == first["release"]
    assert doc["tags"] == ["prod"] and doc["signed"] == "key"
    assert doc["bytes_uploaded"] == 0
    assert release.tags(open_store(store_url), "m") == {"prod": "1"}  # the retry's tag was applied
    human = run_cli("publish", src, "m:1", "--key", key, "--store", store_url)
    assert human.returncode == 0, human.stderr
    assert "m:1 was already published" in human.stdout and first["digest"] in human.stdout
    sigs = [k for k in keys_of(store_url) if k.endswith(".sig")]
    assert len(sigs) == 1, sigs  # nothing written beside the existing release

    before = keys_of(store_url)
    other_key = tmp_path / "other" / "release.pem"
    other_key.parent.mkdir()
    generate_key(other_key)
    changed = variant(src, tmp_path / "changed", '{"hidden": 1}')
    for args, words in (
        ((changed, "m:1", "--key", key), ("m:1", "different files", "config.json")),
        ((src, "m:1", "--key", other_key), ("m:1", "signed by key", "not by key")),
        ((src, "m:1"), ("m:1", "not by nobody (unsigned)")),
    ):
        proc = run_cli("publish", *args, "--store", store_url)
        assert proc.returncode == 1, proc.stderr
        line = error_line(proc)
        for w in words:
            assert w in line, line
    assert keys_of(store_url) == before  # refused before any byte was uploaded


def test_a_keyless_retry_is_the_same_signer_by_identity(monkeypatch, tmp_path: Path) -> None:
    """Sigstore signs with a fresh key and certificate every time: a retry by the same
    identity is the same signer; another identity is not (a private Sigstore instance,
    tests/fake_sigstore.py)."""
    from tests.fake_sigstore import FakeSigstore, identity_token
    from weightship.trust.sigstore import SigstoreSigner

    fake = FakeSigstore().install(monkeypatch)
    trust = fake.write_trust_config(tmp_path / "trust-config.json")
    store = open_store(f"file://{tmp_path / 'store'}")
    src = model(tmp_path, 12)

    def signer(who: str) -> SigstoreSigner:
        return SigstoreSigner(identity_token=identity_token(who), trust_config=trust)

    first = release.publish(src, "k:1", store, signer=signer("release-bot@acme.example"))
    again = release.publish(src, "k:1", store, signer=signer("release-bot@acme.example"))
    assert again.already_published and again.digest == first.digest and again.signed == "sigstore"
    assert len(fake.issued) == 2 and fake.issued[0] != fake.issued[1]  # two certificates, two keys
    with pytest.raises(ConflictError, match=r"k:1 already exists .*not by identity intruder@acme\.example"):
        release.publish(src, "k:1", store, signer=signer("intruder@acme.example"))


def test_racing_identical_publishers_both_succeed(store_url: str, tmp_path: Path, keypair) -> None:
    """Two processes publish the same directory with the same key to one version at once:
    one commits, the other finds the very same release and exits 0 too, with its digest."""
    key, pub = keypair
    src = model(tmp_path, 2)
    procs = [spawn_cli("-q", "publish", src, "same:1", "--key", key, "--store", store_url, "--json") for _ in range(2)]
    outs = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    docs = [valid(json.loads(out), "weightship.publish/v1") for _, out, _ in outs]
    assert docs[0]["digest"] == docs[1]["digest"]
    assert sorted(d["already_published"] for d in docs) in ([False, True], [False, False])
    sigs = [k for k in keys_of(store_url) if k.endswith(".sig")]
    assert len(sigs) == 1, sigs  # the loser's signature is not left behind
    out = tmp_path / "out"
    assert run_cli("pull", "same:1", out, "--key", pub, "--store", store_url).returncode == 0
    assert source_files(out) == source_files(src)


# -- 2. rm, untag, tag ------------------------------------------------------------------


def test_rm_untag_and_tag_previous(store_url: str, tmp_path: Path, keypair) -> None:
    key, pub = keypair
    src = model(tmp_path, 3)
    run = lambda *a: run_cli(*a, "--store", store_url)  # noqa: E731
    assert run("publish", src, "m:1", "--key", key, "--tag", "prod").returncode == 0
    assert run("publish", variant(src, tmp_path / "v2", '{"v": 2}'), "m:2", "--key", key).returncode == 0

    moved = cli_doc(run("tag", "m:2", "prod", "--json"), "weightship.tag/v1")
    assert moved["version"] == "2" and moved["previous"] == "1"
    new = cli_doc(run("tag", "m:2", "canary", "--json"), "weightship.tag/v1")
    assert new["previous"] is None
    same = run("tag", "m:2", "canary")
    assert same.returncode == 0 and "(unchanged)" in same.stdout
    assert "(was 2)" in run("tag", "m:1", "canary").stdout
    assert run("tag", "m:2", "canary").returncode == 0

    # A tagged release is refused, naming the tags; nothing changes.
    before = keys_of(store_url)
    refused = run("rm", "m:2")
    assert refused.returncode == 1
    line = error_line(refused)
    assert "m:2" in line and "canary, prod" in line and "--force" in line, line
    assert keys_of(store_url) == before
    # A tag is not a version, and a version is not a tag (usage errors, exit 2).
    for args, word in ((("rm", "m:prod"), "untag"), (("untag", "m:2"), "weightship rm m:2")):
        proc = run(*args)
        assert proc.returncode == 2 and word in error_line(proc), proc.stderr
    missing = run("rm", "m:9")
    assert missing.returncode == 1 and "m:9 not found" in error_line(missing)

    gone = cli_doc(run("rm", "m:2", "--force", "--json"), "weightship.rm/v1")
    assert gone["version"] == "2" and gone["tags_removed"] == ["canary", "prod"]
    st = open_store(store_url)
    assert release.versions(st, "m") == ["1"] and release.tags(st, "m") == {}
    for ref in ("m:2", "m:prod", gone["release"]):
        proc = run("pull", ref, tmp_path / f"no-{ref.replace(':', '-').replace('@', '-')}")
        assert proc.returncode == 1, proc.stderr
        assert "not found" in error_line(proc) or "no release of m has digest" in error_line(proc)
    # The blobs stay until prune: the other release still pulls and verifies.
    assert st.list("blobs/") and run("pull", "m:1", tmp_path / "out", "--key", pub).returncode == 0

    assert run("tag", "m:1", "prod").returncode == 0
    untagged = cli_doc(run("untag", "m:prod", "--json"), "weightship.untag/v1")
    assert untagged["tag"] == "prod" and untagged["version"] == "1"
    proc = run("untag", "m:prod")
    assert proc.returncode == 1 and "no tag 'prod'" in error_line(proc)
    assert release.tags(st, "m") == {} and release.versions(st, "m") == ["1"]
    st.close()


def test_a_removed_version_never_comes_back_with_other_files(store_url: str, tmp_path: Path, keypair) -> None:
    key, pub = keypair
    src = model(tmp_path, 4)
    run = lambda *a: run_cli(*a, "--store", store_url)  # noqa: E731
    assert run("publish", src, "m:1", "--key", key).returncode == 0
    assert run("rm", "m:1").returncode == 0
    # Nodes that still hold m:1 know it by its version: other files under it are refused.
    other = run("publish", variant(src, tmp_path / "other", '{"v": "other"}'), "m:1", "--key", key)
    assert other.returncode == 1, other.stderr
    line = error_line(other)
    assert "m:1 was removed" in line and "new version" in line, line
    st = open_store(store_url)
    try:
        assert release.versions(st, "m") == []
        # prune keeps the record, whatever its age.
        release.prune(st, grace=timedelta(0))
        assert st.removed_record("m", "1") is not None
    finally:
        st.close()
    # The very same files may come back (a removal undone).
    again = run("publish", src, "m:1", "--key", key)
    assert again.returncode == 0, again.stderr
    assert run("pull", "m:1", tmp_path / "back", "--key", pub).returncode == 0
    assert source_files(src) == source_files(tmp_path / "back")


# -- 3. prune -----------------------------------------------------------------------------


def test_prune_deletes_what_no_release_needs_once_older_than_the_grace_period(
    store_url: str, tmp_path: Path, keypair
) -> None:
    key, pub = keypair
    src = model(tmp_path, 4)
    v2 = variant(src, tmp_path / "v2", '{"v": 2}')
    run = lambda *a: run_cli(*a, "--store", store_url)  # noqa: E731
    assert run("publish", src, "m:1", "--key", key).returncode == 0
    assert run("publish", v2, "m:2", "--key", key, "--tag", "prod").returncode == 0
    only_1 = file_blob_sha(src / "config.json")
    assert run("rm", "m:1").returncode == 0
    st = open_store(store_url)
    sig_1 = [k for k in st.list("releases/m/1/") if k.endswith(".sig")]
    assert len(sig_1) == 1 and st.has_blob(only_1)

    # Within the grace period: kept, and counted.
    kept = cli_doc(run("prune", "--json"), "weightship.prune/v1")
    assert kept["blobs"] == [] and kept["signatures"] == [] and kept["bytes_freed"] == 0
    assert kept["blobs_in_grace"] == 1 and kept["grace_seconds"] == 24 * 3600
    assert kept["blobs_in_use"] == len(set(source_files(v2).values()))

    time.sleep(2.2)  # ages by the store's clock, which counts in whole seconds on S3
    dry = cli_doc(run("prune", "--grace", "1s", "--dry-run", "--json"), "weightship.prune/v1")
    assert dry["dry_run"] is True
    assert [b["sha256"] for b in dry["blobs"]] == [only_1]
    assert [s["key"] for s in dry["signatures"]] == sig_1
    removed = ["releases/m/1/removed.json"]  # rm's record of what m:1 held: never pruned
    assert st.has_blob(only_1) and st.list("releases/m/1/") == removed + sig_1  # nothing deleted

    done = cli_doc(run("prune", "--grace", "1s", "--json"), "weightship.prune/v1")
    assert done["dry_run"] is False
    assert [b["sha256"] for b in done["blobs"]] == [only_1]
    assert [s["key"] for s in done["signatures"]] == sig_1
    assert done["bytes_freed"] == sum(b["size"] for b in done["blobs"] + done["signatures"] + done["leftovers"])
    assert not st.has_blob(only_1) and st.list("releases/m/1/") == removed
    assert st.list("prune/") == []  # its marker is gone
    # Everything m:2 needs is still there, and a second prune finds nothing.
    out = tmp_path / "out"
    assert run("pull", "m:prod", out, "--key", pub).returncode == 0
    assert source_files(out) == source_files(v2)
    again = cli_doc(run("prune", "--grace", "0", "--json"), "weightship.prune/v1")
    assert again["blobs"] == [] and again["signatures"] == [] and again["bytes_freed"] == 0
    human = run("prune", "--grace", "0", "--dry-run")
    assert human.returncode == 0 and "would delete 0 blobs" in human.stdout
    bad = run("prune", "--grace", "soon")
    assert bad.returncode == 2 and "--grace" in error_line(bad)
    st.close()


class _Hooked:
    """A real store with a hook run before one operation: how the tests below put a
    prune exactly where a race would."""

    def __init__(self, store: Store, **hooks: Any) -> None:
        self._store = store
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if key.endswith("/manifest.json") and (hook := self._hooks.pop("before_manifest", None)):
            hook()
        self._store.write(key, data, exclusive=exclusive)
        if key.endswith("/manifest.json") and (hook := self._hooks.pop("after_manifest", None)):
            hook()

    def delete(self, key: str) -> None:
        if key.startswith("blobs/") and (hook := self._hooks.get("before_blob_delete")):
            hook()
        self._store.delete(key)


Store.register(_Hooked)


def _orphan_blob(store_url: str, tmp_path: Path, key: Path) -> tuple[Path, str]:
    """A blob no release names any more, older than a 1 s grace period: published as
    part of old:1, which is then removed."""
    src = model(tmp_path, 5)
    st = open_store(store_url)
    release.publish(src, "old:1", st, signer=KeySigner(key))
    release.rm(st, "old:1")
    time.sleep(2.2)
    return src, file_blob_sha(src / "config.json")


def test_a_publish_that_reused_a_blob_a_prune_deleted_puts_it_back(store_url: str, tmp_path: Path, keypair) -> None:
    """The publish finds the orphan blobs in the store and skips them; a prune deletes
    them between that check and the manifest commit. The publish checks its blobs after
    the commit and uploads the missing ones again: the release it reports is whole."""
    key, pub = keypair
    src, config_blob = _orphan_blob(store_url, tmp_path, key)
    pruned: list[Any] = []
    st = open_store(store_url)

    def rival_prune() -> None:
        pruned.append(release.prune(open_store(store_url), grace=timedelta(seconds=1)))

    hooked = _Hooked(st, before_manifest=rival_prune)
    result = release.publish(src, "new:1", hooked, signer=KeySigner(key))  # type: ignore[arg-type]
    # The race happened: the prune deleted blobs this publish had found and skipped...
    deleted = {b["sha256"] for b in pruned[0].blobs}
    assert config_blob in deleted
    # ...and the publish uploaded them again before it reported success.
    assert result.blobs_uploaded == len(deleted) and all(st.has_blob(h) for h in deleted)
    out = tmp_path / "out"
    assert run_cli("pull", "new:1", out, "--key", pub, "--store", store_url).returncode == 0
    assert source_files(out) == source_files(src)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_prune_in_progress_makes_the_publish_wait_then_check(kind: str, request, tmp_path: Path, keypair) -> None:
    """The prune listed the releases before the publish's commit and its delete lands
    only just after the commit (a slow request). The publish sees the prune's marker,
    waits PRUNE_SETTLE, finds the blob gone and uploads it again."""
    store_url = f"file://{tmp_path / 'store'}" if kind == "file" else request.getfixturevalue("s3_store_url")
    key, pub = keypair
    src, config_blob = _orphan_blob(store_url, tmp_path, key)
    committed = threading.Event()
    listed = threading.Event()
    prune_result: list[Any] = []

    def slow_delete() -> None:
        listed.set()  # the prune decided: it is deleting
        assert committed.wait(30)
        time.sleep(1)  # a slow delete request: it lands 1 s after the commit

    def run_prune() -> None:
        store = _Hooked(open_store(store_url), before_blob_delete=slow_delete)
        prune_result.append(release.prune(store, grace=timedelta(seconds=1)))  # type: ignore[arg-type]

    pruner = threading.Thread(target=run_prune)
    hooked = _Hooked(
        open_store(store_url),
        before_manifest=lambda: (pruner.start(), listed.wait(30)),
        after_manifest=committed.set,
    )
    t0 = time.monotonic()
    result = release.publish(src, "new:1", hooked, signer=KeySigner(key))  # type: ignore[arg-type]
    took = time.monotonic() - t0
    pruner.join(30)
    deleted = {b["sha256"] for b in prune_result[0].blobs}
    print(f"\n[{kind}] publish with a prune deleting under it: {took:.1f}s, re-uploaded {result.blobs_uploaded} blobs")
    assert config_blob in deleted
    assert took >= release.PRUNE_SETTLE
    assert result.blobs_uploaded == len(deleted)
    st = open_store(store_url)
    assert all(st.has_blob(h) for h in deleted) and st.list("prune/") == []
    out = tmp_path / "out"
    assert run_cli("pull", "new:1", out, "--key", pub, "--store", store_url).returncode == 0
    assert source_files(out) == source_files(src)


def test_prune_removes_old_leftovers_of_interrupted_uploads_only(tmp_path: Path) -> None:
    """file:// keeps a partial upload to resume it; prune removes it once it is older than
    the grace period and no publisher holds its lock."""
    url = f"file://{tmp_path / 'store'}"
    blobs = tmp_path / "store" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    old = time.time() - 3 * 3600
    paths = {}
    for name in (".partial-" + "a" * 64, ".partial-" + "b" * 64, ".partial-" + "c" * 64, ".tmp-x-1234"):
        p = blobs / name
        p.write_bytes(b"x" * 100)
        paths[name[:10]] = p
        os.utime(p, (old, old))
    young = blobs / (".partial-" + "c" * 64)
    os.utime(young, None)
    held = blobs / (".partial-" + "b" * 64)
    fd = os.open(held, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a publisher writing it now
    try:
        doc = cli_doc(run_cli("prune", "--grace", "1h", "--json", "--store", url), "weightship.prune/v1")
    finally:
        os.close(fd)
    assert sorted(i["key"] for i in doc["leftovers"]) == [
        "blobs/sha256/.partial-" + "a" * 64,
        "blobs/sha256/.tmp-x-1234",
    ]
    assert doc["bytes_freed"] == 200
    assert sorted(p.name for p in blobs.iterdir()) == sorted([held.name, young.name])


def test_prune_deletes_the_marker_of_a_killed_prune_and_a_dry_run_says_it_would(tmp_path: Path) -> None:
    """A killed prune leaves its marker, which makes every publish wait: once it is older
    than PRUNE_MARKER_STALE, prune deletes it, and --dry-run reports it without deleting."""
    url = f"file://{tmp_path / 'store'}"
    st = open_store(url)
    st.write("prune/killed", b"{}")
    st.write("prune/running", b"{}")  # a prune in progress now: never touched
    old = time.time() - release.PRUNE_MARKER_STALE.total_seconds() - 3600
    os.utime(tmp_path / "store" / "prune" / "killed", (old, old))

    dry = release.prune(st, grace=timedelta(0), dry_run=True)
    assert [i["key"] for i in dry.leftovers] == ["prune/killed"] and dry.bytes_freed == 2
    assert st.list("prune/") == ["prune/killed", "prune/running"]
    done = release.prune(st, grace=timedelta(0))
    assert [i["key"] for i in done.leftovers] == ["prune/killed"]
    assert st.list("prune/") == ["prune/running"]
    st.close()


# -- 4. pull --force, --include, --exclude, and the word about the policy ---------------------


def test_pull_force_replaces_dest_only_once_the_new_release_is_verified(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    url = f"file://{tmp_path / 'store'}"
    a, b = model(tmp_path, 6), model(tmp_path, 7)
    assert run_cli("publish", a, "m:1", "--key", key, "--store", url).returncode == 0
    assert run_cli("publish", b, "m:2", "--key", key, "--store", url).returncode == 0
    dest = tmp_path / "serving"
    assert run_cli("pull", "m:1", dest, "--key", pub, "--store", url).returncode == 0
    old = tree(dest)

    refused = run_cli("pull", "m:2", dest, "--key", pub, "--store", url)
    assert refused.returncode == 2 and "--force" in error_line(refused)
    assert tree(dest) == old

    # A corrupt blob of m:2 that m:1 does not share: the pull fails, DEST is untouched.
    corrupt = next(h for h in source_files(b).values() if h not in source_files(a).values())
    blob = tmp_path / "store" / blob_key(hashlib.sha256(corrupt).hexdigest())
    good = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * len(good))
    failed = run_cli("pull", "m:2", dest, "--force", "--key", pub, "--store", url)
    assert failed.returncode == 1 and "sha256" in error_line(failed), failed.stderr
    assert tree(dest) == old
    blob.write_bytes(good)

    ok = run_cli("pull", "m:2", dest, "--force", "--key", pub, "--store", url, "--json")
    doc = cli_doc(ok, "weightship.pull/v1")
    assert doc["replaced"] is True and doc["partial"] is False
    assert source_files(dest) == source_files(b) and (dest / "model.sig").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".serving")) == []  # staging gone

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    proc = run_cli("pull", "m:2", a_file, "--force", "--store", url)
    assert proc.returncode == 2 and "not a directory" in error_line(proc)
    assert a_file.read_text() == "x"


def test_pull_include_exclude_take_part_of_a_release_still_verified(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    url = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 8)
    assert run_cli("publish", src, "m:1", "--key", key, "--store", url).returncode == 0
    files = source_files(src)
    json_files = {k for k in files if k.endswith(".json")}
    assert json_files and json_files != set(files)

    out = tmp_path / "configs"
    doc = cli_doc(
        run_cli("pull", "m:1", out, "--include", "*.json", "--key", pub, "--store", url, "--json"),
        "weightship.pull/v1",
    )
    assert doc["partial"] is True and doc["files"] == len(json_files)
    assert tree(out) == {k: files[k] for k in json_files}  # and no model.sig
    out2 = tmp_path / "no-weights"
    proc = run_cli("pull", "m:1", out2, "--exclude", "*.safetensors", "--key", pub, "--store", url)
    assert proc.returncode == 0, proc.stderr
    assert set(tree(out2)) == {k for k in files if not k.endswith(".safetensors")}

    for flag, pattern in (("--include", "*.bin"), ("--exclude", "weights/")):
        dest = tmp_path / f"none-{flag[2:]}"
        proc = run_cli("pull", "m:1", dest, flag, pattern, "--store", url)
        assert proc.returncode == 2
        line = error_line(proc)
        assert flag in line and repr(pattern) in line, line
        assert not dest.exists()
    # The signature is checked against the whole manifest, partial or not.
    other = tmp_path / "other.pem"
    wrong_pub = generate_key(other)
    proc = run_cli("pull", "m:1", tmp_path / "x", "--include", "*.json", "--key", wrong_pub, "--store", url)
    assert proc.returncode == 1 and not (tmp_path / "x").exists()


def test_pull_says_when_no_trusted_signer_was_checked(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    url = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 9)
    assert run_cli("publish", src, "m:1", "--key", key, "--store", url).returncode == 0
    assert run_cli("publish", src, "u:1", "--store", url).returncode == 0
    for ref, word in (("m:1", "signature not checked against any trusted signer"), ("u:1", "unsigned")):
        proc = run_cli("pull", ref, tmp_path / f"open-{ref[0]}", "--store", url)
        assert proc.returncode == 0, proc.stderr
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and word in warnings[0] and "--key" in warnings[0], proc.stderr
        assert "weightship.toml" in warnings[0]
    checked = run_cli("pull", "m:1", tmp_path / "checked", "--key", pub, "--store", url)
    assert checked.returncode == 0 and "warning" not in checked.stderr, checked.stderr


# -- 5. the library ---------------------------------------------------------------------


def test_the_package_root_exposes_tag_rm_untag_prune(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 10)
    weightship.publish(src, "api:1", store, tags=["prod"], signer=KeySigner(key))
    again = weightship.publish(src, "api:1", store, signer=KeySigner(key))
    assert again.already_published
    t = weightship.tag("api:1", "canary", store)
    assert isinstance(t, release.TagResult) and t.previous is None
    valid(t.to_dict(), "weightship.tag/v1")
    with pytest.raises(ConflictError, match="canary, prod"):
        weightship.rm("api:1", store)
    with pytest.raises(UsageError):
        weightship.untag("api:1", store)
    u = weightship.untag("api:canary", store)
    assert isinstance(u, release.UntagResult) and u.version == "1"
    valid(u.to_dict(), "weightship.untag/v1")
    r = weightship.rm("api:1", store, force=True)
    assert isinstance(r, release.RemoveResult) and r.tags_removed == ["prod"]
    valid(r.to_dict(), "weightship.rm/v1")
    with pytest.raises(NotFoundError):
        weightship.resolve("api:1", store)
    p = weightship.prune(store, grace=timedelta(0), dry_run=True)
    assert isinstance(p, release.PruneResult) and p.dry_run and len(p.blobs) == len(set(source_files(src).values()))
    valid(p.to_dict(), "weightship.prune/v1")
    out = tmp_path / "out"
    weightship.publish(src, "api:2", store, signer=KeySigner(key))
    pulled = weightship.pull("api:2", out, store, policy=TrustPolicy(keys=[pub]), include=["*.json"])
    assert pulled.partial and set(tree(out)) == {k for k in source_files(src) if k.endswith(".json")}
    pulled = weightship.pull("api:2", out, store, policy=TrustPolicy(keys=[pub]), force=True)
    assert pulled.replaced and source_files(out) == source_files(src)


def test_a_damaged_manifest_stops_prune_before_any_delete_and_rm_removes_it(tmp_path: Path, keypair) -> None:
    key, _pub = keypair
    url = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 11)
    assert run_cli("publish", src, "m:1", "--key", key, "--store", url).returncode == 0
    assert run_cli("publish", variant(src, tmp_path / "v2", '{"v": 2}'), "m:2", "--store", url).returncode == 0
    assert run_cli("rm", "m:1", "--store", url).returncode == 0  # its config.json blob is an orphan now
    manifest = tmp_path / "store" / "releases" / "m" / "2" / "manifest.json"
    manifest.write_text('{"schema": "something else"}')
    before = keys_of(url)
    proc = run_cli("prune", "--grace", "0", "--store", url)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "prune stopped" in line and "weightship rm m:2" in line, line
    assert keys_of(url) == before
    # The damaged release can still be removed, and then prune goes ahead.
    assert run_cli("rm", "m:2", "--store", url).returncode == 0
    doc = cli_doc(run_cli("prune", "--grace", "0", "--json", "--store", url), "weightship.prune/v1")
    assert len(doc["blobs"]) == len(set(source_files(src).values()) | {(tmp_path / "v2" / "config.json").read_bytes()})
    # Only rm's records of what the versions held are left (docs/format.md, "Deleting").
    assert keys_of(url) == ["releases/m/1/removed.json", "releases/m/2/removed.json"]
