"""Fixtures shared across the suite. Servers (S3, sshd, agents) are started by the tests
that need them and stopped by PID; see tests/servers.py and tests/sshd.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import minilm_source


@pytest.fixture
def minilm(tmp_path: Path) -> Path:
    """A writable copy of the real all-MiniLM-L6-v2 model (safetensors, tokenizer, 1_Pooling/)."""
    dest = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(minilm_source(), dest)
    return dest


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """A small real safetensors model: two shards, index, config, tokenizer folder."""
    from weightship.demo import build_model

    return build_model(tmp_path / "small-model")


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    from weightship.signing import generate_key

    key = tmp_path / "keys" / "release.pem"
    key.parent.mkdir()
    pub = generate_key(key)
    return key, pub


@pytest.fixture
def file_store(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"
