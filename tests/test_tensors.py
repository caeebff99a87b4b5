"""weightship's safetensors header check, held to the reference loader's verdicts
(``safetensors.safe_open``) on valid files and on every way a header can be broken."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from weightship.artifact.tensors import summarise
from weightship.errors import ModelError


def reference(path: Path) -> tuple[int, int, dict[str, int]] | None:
    """(tensors, parameters, dtypes) as the reference loader reads them, or None if it
    refuses the file."""
    try:
        dtypes: dict[str, int] = {}
        parameters = count = 0
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - not a mapping
                sl = f.get_slice(key)
                dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + 1
                parameters += math.prod(sl.get_shape())
                count += 1
        return count, parameters, dtypes
    except (SafetensorError, ValueError, OSError):
        return None


def ours(path: Path) -> tuple[int, int, dict[str, int]] | None:
    try:
        s = summarise(path, path.name)
    except ModelError as e:
        assert str(e).startswith(f"{path.name}: "), e  # names the file
        return None
    return s.tensors, s.parameters, s.dtypes


def raw_file(path: Path, header: object, data: bytes = b"", *, pad: bytes = b"", length: int | None = None) -> Path:
    text = (header if isinstance(header, bytes) else json.dumps(header).encode()) + pad
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def t(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


GOOD = {
    "numpy": None,  # written by safetensors itself, below
    "empty": ({}, b""),
    "metadata": ({"__metadata__": {"format": "pt"}, "a": t("F32", [2], 0, 8)}, bytes(8)),
    "null metadata": ({"__metadata__": None, "a": t("U8", [3], 0, 3)}, bytes(3)),
    "scalar and zero-size": ({"s": t("F64", [], 0, 8), "z": t("F32", [0, 4], 8, 8), "y": t("I8", [1], 8, 9)}, bytes(9)),
    "out of order": ({"b": t("BF16", [2, 2], 8, 16), "a": t("I64", [1], 0, 8)}, bytes(16)),
    "sub-byte dtype": ({"f4": t("F4", [4], 0, 2), "f6": t("F6_E2M3", [4], 2, 5)}, bytes(5)),
    "padded header": ({"a": t("F16", [2], 0, 4)}, bytes(4)),
}
BAD = {
    "gap between tensors": ({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, bytes(12)),
    "overlap": ({"a": t("F32", [2], 0, 8), "b": t("F32", [1], 4, 8)}, bytes(8)),
    "size mismatch": ({"a": t("F32", [3], 0, 8)}, bytes(8)),
    "data beyond tensors": ({"a": t("F32", [1], 0, 4)}, bytes(8)),
    "truncated data": ({"a": t("F32", [4], 0, 16)}, bytes(10)),
    "unknown dtype": ({"a": t("F128", [1], 0, 16)}, bytes(16)),
    "negative dim": ({"a": t("F32", [-1], 0, 4)}, bytes(4)),
    "float dim": ({"a": t("F32", [1.0], 0, 4)}, bytes(4)),
    "bool dim": ({"a": t("U8", [True], 0, 1)}, bytes(1)),
    "three offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, bytes(1)),
    "missing offsets": ({"a": {"dtype": "U8", "shape": [1]}}, bytes(1)),
    "tensor not an object": ({"a": [1, 2]}, b""),
    "metadata not strings": ({"__metadata__": {"n": 1}}, b""),
    "not an object": ([1, 2], b""),
    "sub-byte misaligned": ({"f4": t("F4", [3], 0, 2)}, bytes(2)),
    "not json": (b"{not json", b""),
    "not utf-8": (b'{"\xff": 1}', b""),
    "starts with a space": (b' {"a": 1}', b""),
    "trailing garbage": (b'{"__metadata__": {}} x', b""),
}


@pytest.fixture
def cases(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(5, dtype=np.int64)}
    save_file(arrays, str(tmp_path / "numpy.safetensors"), metadata={"k": "v"})
    out["numpy"] = tmp_path / "numpy.safetensors"
    for name, spec in {**GOOD, **BAD}.items():
        if spec is None:
            continue
        header, data = spec
        pad = b"        " if name == "padded header" else b""
        out[name] = raw_file(tmp_path / f"{name.replace(' ', '-')}.safetensors", header, data, pad=pad)
    # Lengths that lie.
    out["header longer than file"] = raw_file(tmp_path / "long.safetensors", {}, length=1000)
    out["header too large"] = raw_file(tmp_path / "huge.safetensors", {}, length=100_000_001)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x02\x00")
    out["shorter than 8 bytes"] = tmp_path / "tiny.safetensors"
    return out


def test_verdicts_match_the_reference_loader(cases: dict[str, Path]):
    for name, path in cases.items():
        expected = reference(path)
        assert ours(path) == expected, name
        assert (expected is not None) == (name in GOOD), f"{name}: the case itself is mislabelled"


def test_the_summary_of_a_real_shard(cases: dict[str, Path]):
    s = summarise(cases["numpy"], "numpy.safetensors")
    assert (s.tensors, s.parameters, s.dtypes) == (2, 17, {"F32": 1, "I64": 1})
    assert s.header_bytes == int.from_bytes(cases["numpy"].read_bytes()[:8], "little")
