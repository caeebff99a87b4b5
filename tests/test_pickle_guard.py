"""The pickle guard: publishing a file whose loading runs code warns (one line per file,
naming it), ``[publish] pickle = "refuse"`` or ``--refuse-pickle`` makes it an error with
nothing uploaded, ``"allow"`` silences it. Files are recognised by their bytes, not their
names alone: a ``.bin`` of raw weights is not a pickle."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli
from weightship import release
from weightship.artifact import pickles
from weightship.artifact.pack import pack
from weightship.errors import ModelError
from weightship.store import open_store


def torch_zip(path: Path) -> Path:
    """What ``torch.save`` writes since PyTorch 1.6: a ZIP of ``ARCHIVE/data.pkl``, the
    tensor storages and a version record."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"weight": "storage 0"}, protocol=2))
        z.writestr("archive/data/0", bytes(64))
        z.writestr("archive/version", "3\n")
    return path


def model_with_pickles(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "pytorch_model.bin").write_bytes(pickle.dumps({"w": list(range(100))}, protocol=4))
    torch_zip(root / "adapter.pt")
    (root / "raw.bin").write_bytes(os.urandom(4096))  # raw bytes: not a pickle
    return root


@pytest.mark.parametrize("protocol", range(6))
def test_pickles_of_every_protocol_are_recognised(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"layer.weight": [1.0, 2.0], "step": 3}, protocol=protocol))
    assert pickles.kind(path) == "a pickle"


def test_what_is_not_a_pickle(tmp_path: Path) -> None:
    cases = {
        "random.bin": os.urandom(8192),
        "text.bin": b"(this starts like a MARK opcode, but is prose)\n" * 10,
        "ggml.bin": b"ggjt" + os.urandom(1000),
        "empty.pt": b"",
        "short.pkl": b"\x80",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert pickles.kind(tmp_path / name) is None, name
    plain_zip = tmp_path / "plain.pt"
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("notes.txt", "no pickles here")
    assert pickles.kind(plain_zip) is None
    broken_zip = tmp_path / "broken.pt"
    broken_zip.write_bytes(b"PK\x03\x04" + bytes(100))
    assert pickles.kind(broken_zip) is None
    assert pickles.kind(torch_zip(tmp_path / "model.pt")) == "a PyTorch zip of pickles"


def test_only_pickle_suffixes_are_looked_at(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(pickle.dumps([1, 2], protocol=4))
    (tmp_path / "w.ckpt").write_bytes(pickle.dumps([1, 2], protocol=4))
    files = {p.name: p for p in tmp_path.iterdir()}
    warnings = pickles.guard(files, "warn")
    assert len(warnings) == 1 and warnings[0].startswith("w.ckpt is a pickle: loading it runs code")


def test_pack_warns_once_per_pickle_file(tmp_path: Path) -> None:
    model = model_with_pickles(tmp_path / "model")
    packed = pack(model)
    assert [w.split(" ")[0] for w in packed.warnings] == ["adapter.pt", "pytorch_model.bin"]
    for w in packed.warnings:
        assert "loading it runs code" in w and "safetensors does not" in w
    assert pack(model, pickle="allow").warnings == []
    with pytest.raises(ModelError, match=r"^adapter\.pt \(and 1 more\): refused, it is a PyTorch zip of pickles"):
        pack(model, pickle="refuse")


def test_publish_warns_on_stderr_and_in_the_json_document(tmp_path: Path) -> None:
    model = model_with_pickles(tmp_path / "model")
    store = f"file://{tmp_path / 'store'}"
    proc = run_cli("publish", model, "m:1", "--store", store, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "runs code" in ln]
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: adapter.pt is a PyTorch zip of pickles: loading it runs code")
    assert lines[1].startswith("warning: pytorch_model.bin is a pickle: loading it runs code")
    doc = json.loads(proc.stdout)
    assert [w.split(" ")[0] for w in doc["warnings"]] == ["adapter.pt", "pytorch_model.bin"]
    # A model without pickles publishes without a word about them.
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "config.json").write_text("{}")
    proc = run_cli("publish", clean, "c:1", "--store", store, "--json")
    assert proc.returncode == 0 and "pickle" not in proc.stderr
    assert json.loads(proc.stdout)["warnings"] == []


@pytest.mark.parametrize("how", ["flag", "config"])
def test_refuse_fails_and_uploads_nothing(tmp_path: Path, how: str) -> None:
    model = model_with_pickles(tmp_path / "model")
    store_dir = tmp_path / "store"
    args = ["publish", model, "m:1", "--store", f"file://{store_dir}"]
    if how == "flag":
        args.append("--refuse-pickle")
    else:
        (tmp_path / "weightship.toml").write_text('[publish]\npickle = "refuse"\n')
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith("error: adapter.pt (and 1 more): refused, it is a PyTorch zip of pickles"), line
    assert "safetensors" in line
    blobs = list((store_dir / "blobs").rglob("*")) if (store_dir / "blobs").exists() else []
    assert [b for b in blobs if b.is_file()] == []
    assert not (store_dir / "releases").exists()
    proc = run_cli("pack", model, "--refuse-pickle")
    assert proc.returncode == 1 and "refused" in error_line(proc)


def test_allow_silences_and_the_library_returns_nothing(tmp_path: Path) -> None:
    model = model_with_pickles(tmp_path / "model")
    (tmp_path / "weightship.toml").write_text('[publish]\npickle = "allow"\n')
    proc = run_cli("publish", model, "m:1", "--store", f"file://{tmp_path / 'store'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "runs code" not in proc.stderr
    proc = run_cli("pack", model, cwd=tmp_path)
    assert proc.returncode == 0 and "runs code" not in proc.stderr
    # The library: warnings in the result, never printed.
    result = release.publish(model, "m:2", open_store(f"file://{tmp_path / 'store'}"))
    assert len(result.warnings) == 2
    assert result.to_dict()["warnings"] == result.warnings


def test_a_hub_style_packed_model_is_guarded_too(tmp_path: Path) -> None:
    """``publish(packed=…)`` (what a Hub snapshot hands over) applies the mode before any upload."""
    model = model_with_pickles(tmp_path / "model")
    packed = pack(model, pickle="allow")
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(ModelError, match="refused"):
        release.publish(model, "m:1", store, packed=packed, pickle="refuse")
    assert store.list("blobs/") == [] or all(".partial" in k for k in store.list("blobs/"))


@pytest.mark.parametrize(
    ("toml", "expect"),
    [
        ('[publish]\npickle = "deny"\n', 'publish.pickle: must be one of "warn", "refuse" or "allow", not "deny"'),
        ('[publish]\npickles = "refuse"\n', "did you mean publish.pickle?"),
        ('[publsh]\npickle = "refuse"\n', "did you mean publish?"),
    ],
)
def test_a_wrong_pickle_setting_is_a_usage_error(tmp_path: Path, toml: str, expect: str) -> None:
    model = model_with_pickles(tmp_path / "model")
    (tmp_path / "weightship.toml").write_text(toml)
    proc = run_cli("publish", model, "m:1", "--store", f"file://{tmp_path / 'store'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert expect in error_line(proc)
