"""The digest cache: publish re-reads only files that changed since they were hashed,
and nothing a cache entry says can put a wrong digest on a published release."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli
from weightship.artifact import hashing, pack
from weightship.artifact.digestcache import DigestCache


def make_model(root: Path, files: int = 4, size: int = 256 * 1024) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"part-{i}.bin").write_bytes(os.urandom(size))
    return root


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files pack actually reads to hash, in this process."""
    seen: list[str] = []
    real = hashing.digest_file

    def spy(path, progress=None, cancel=None, **kwargs):
        seen.append(Path(path).name)
        return real(path, progress, cancel, **kwargs)

    monkeypatch.setattr(hashing, "digest_file", spy)
    return seen


def digests(packed: pack.PackedModel) -> dict[str, str]:
    return {f.path: f.sha256 for f in packed.manifest.files}


def truth(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}


def test_unchanged_files_are_not_read_again(tmp_path: Path, hashed: list[str]):
    model = make_model(tmp_path / "m")
    cache_dir = tmp_path / "cache"
    first = pack.pack(model, cache=DigestCache(model, cache_dir, settle_ns=0))
    assert sorted(hashed) == sorted(truth(model)) and digests(first) == truth(model)

    hashed.clear()
    again = pack.pack(model, cache=DigestCache(model, cache_dir, settle_ns=0))
    assert hashed == [] and digests(again) == truth(model)

    # Rewritten in place, same size: read again, and the new digest is the one used.
    (model / "part-2.bin").write_bytes(os.urandom(256 * 1024))
    hashed.clear()
    third = pack.pack(model, cache=DigestCache(model, cache_dir, settle_ns=0))
    assert hashed == ["part-2.bin"] and digests(third) == truth(model)


def test_a_rewrite_that_restores_the_mtime_is_still_noticed(tmp_path: Path, hashed: list[str]):
    model = make_model(tmp_path / "m")
    cache_dir = tmp_path / "cache"
    pack.pack(model, cache=DigestCache(model, cache_dir, settle_ns=0))
    target = model / "part-1.bin"
    st = target.stat()
    time.sleep(0.01)
    target.write_bytes(os.urandom(st.st_size))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p or rsync -t would do
    assert target.stat().st_mtime_ns == st.st_mtime_ns and target.stat().st_size == st.st_size
    hashed.clear()
    packed = pack.pack(model, cache=DigestCache(model, cache_dir, settle_ns=0))
    assert hashed == ["part-1.bin"] and digests(packed) == truth(model)


def test_files_changed_just_before_hashing_are_not_remembered(tmp_path: Path, hashed: list[str]):
    model = make_model(tmp_path / "m")
    cache_dir = tmp_path / "cache"
    pack.pack(model, cache=DigestCache(model, cache_dir))  # default settle time: all too fresh
    hashed.clear()
    pack.pack(model, cache=DigestCache(model, cache_dir))
    assert sorted(hashed) == sorted(truth(model))


def test_a_wrong_entry_cannot_publish_wrong_bytes(tmp_path: Path, file_store: str, hashed: list[str]):
    """Forge the cache to claim another digest for a file: the upload hashes what it
    sends, refuses the mismatch and publishes nothing; --rehash ignores the cache."""
    model = make_model(tmp_path / "m")
    time.sleep(2.1)  # older than the settle time, so publish remembers every digest
    assert run_cli("publish", model, "m:1", "--store", file_store).returncode == 0
    [cache_file] = (Path(os.environ["XDG_CACHE_HOME"]) / "weightship" / "digests").iterdir()
    doc = json.loads(cache_file.read_text())
    assert sorted(doc["files"]) == sorted(truth(model))
    doc["files"]["part-0.bin"][5] = hashlib.sha256(b"something else").hexdigest()
    cache_file.write_text(json.dumps(doc))

    other = f"file://{tmp_path / 'other-store'}"
    forged = run_cli("publish", model, "m:1", "--store", other)
    assert forged.returncode != 0
    assert "part-0.bin changed while publishing" in error_line(forged)
    assert run_cli("ls", "m", "--store", other).returncode != 0  # nothing was published

    fresh = run_cli("publish", model, "m:1", "--store", other, "--rehash", "--json")
    assert fresh.returncode == 0, fresh.stderr
    shown = json.loads(run_cli("show", "m:1", "--store", other, "--json").stdout)
    assert {f["path"]: f["sha256"] for f in shown["files"]} == truth(model)


def test_republish_through_the_cli_reads_only_the_changed_file(tmp_path: Path, file_store: str):
    model = make_model(tmp_path / "m", files=3, size=4 * 1024 * 1024)
    time.sleep(2.1)
    assert run_cli("publish", model, "m:1", "--store", file_store).returncode == 0
    (model / "part-1.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    second = run_cli("publish", model, "m:2", "--store", file_store, "--json")
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert out["blobs_uploaded"] == 1 and out["bytes_uploaded"] == 4 * 1024 * 1024
    shown = json.loads(run_cli("show", "m:2", "--store", file_store, "--json").stdout)
    assert {f["path"]: f["sha256"] for f in shown["files"]} == truth(model)
