"""keygen never destroys a key: not by naming the public key, not over an existing file,
and never leaving a half-written key behind."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.helpers import error_line, run_cli
from weightship.trust.signers import key_fingerprint, load_private_key, load_public_key


def _pair_matches(pem: Path, pub: Path) -> bool:
    return key_fingerprint(load_private_key(pem).public_key()) == key_fingerprint(load_public_key(pub))


def test_keygen_writes_a_matching_pair_and_nothing_else(tmp_path: Path) -> None:
    proc = run_cli("keygen", "release.pem", "--curve", "P-384", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.pem", "release.pub"]  # no temporary files
    assert stat.S_IMODE((tmp_path / "release.pem").stat().st_mode) == 0o600
    assert _pair_matches(tmp_path / "release.pem", tmp_path / "release.pub")
    assert load_public_key(tmp_path / "release.pub").curve.name == "secp384r1"


def test_keygen_refuses_a_public_key_path(tmp_path: Path) -> None:
    # Today's bug: the private key went to x.pub, then the public key over it.
    proc = run_cli("keygen", "x.pub", cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "x.pub" in line and "private key" in line and "release.pem" in line, line
    assert list(tmp_path.iterdir()) == []


def test_keygen_never_overwrites_a_private_key(tmp_path: Path) -> None:
    assert run_cli("keygen", "release.pem", cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_cli("keygen", "release.pem", cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "release.pem exists" in line and "--force" in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_keygen_never_overwrites_a_public_key(tmp_path: Path) -> None:
    # release.pub alone (shipped to nodes, its private key kept elsewhere) is not replaced either.
    (tmp_path / "release.pub").write_text("the public key every node trusts\n")
    proc = run_cli("keygen", "release.pem", cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "release.pub exists" in line and "--force" in line, line
    assert (tmp_path / "release.pub").read_text() == "the public key every node trusts\n"
    assert not (tmp_path / "release.pem").exists()


def test_keygen_does_not_write_through_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "release.pem").symlink_to(tmp_path / "elsewhere.pem")
    proc = run_cli("keygen", "release.pem", cwd=tmp_path)
    assert proc.returncode == 2 and "release.pem exists" in error_line(proc)
    assert not (tmp_path / "elsewhere.pem").exists() and not (tmp_path / "release.pub").exists()


def test_keygen_force_replaces_the_pair(tmp_path: Path) -> None:
    assert run_cli("keygen", "release.pem", cwd=tmp_path).returncode == 0
    old = (tmp_path / "release.pem").read_bytes()
    proc = run_cli("keygen", "release.pem", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "release.pem").read_bytes() != old
    assert _pair_matches(tmp_path / "release.pem", tmp_path / "release.pub")
    assert stat.S_IMODE((tmp_path / "release.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.pem", "release.pub"]


def test_keygen_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("keygen", tmp_path / "keys" / "release.pem")
    assert proc.returncode == 2
    assert f"directory {tmp_path / 'keys'} does not exist" in error_line(proc)
