"""weightship's GGUF header check: valid files of every version are summarised, and every
way a header can be cut short or corrupted is refused with one line naming the file.

The files are written here byte by byte from the GGUF specification (little-endian: magic,
u32 version, tensor and metadata counts, key/value pairs, tensor infos, aligned data), so
the reader is held to the format, not to a library's interpretation of it.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from tests.helpers import error_line, run_cli
from weightship.artifact import gguf
from weightship.artifact.manifest import Manifest
from weightship.artifact.pack import pack
from weightship.errors import ModelError

# Value type ids of the GGUF specification.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
F32, F16, Q4_0, Q8_0, Q4_K = 0, 1, 2, 8, 12


def _len(n: int, version: int) -> bytes:
    # Version 1 wrote counts and string lengths as u32, later versions as u64.
    return struct.pack("<I" if version == 1 else "<Q", n)


def _str(s: str | bytes, version: int) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return _len(len(raw), version) + raw


def _value(vtype: int, value: object, version: int) -> bytes:
    fixed = {
        UINT8: "<B",
        INT8: "<b",
        UINT16: "<H",
        INT16: "<h",
        UINT32: "<I",
        INT32: "<i",
        FLOAT32: "<f",
        BOOL: "<?",
        UINT64: "<Q",
        INT64: "<q",
        FLOAT64: "<d",
    }
    if vtype in fixed:
        return struct.pack(fixed[vtype], value)
    if vtype == STRING:
        return _str(value, version)  # type: ignore[arg-type]
    if vtype != ARRAY:  # a type the specification does not define: its raw bytes
        return value  # type: ignore[return-value]
    etype, items = value  # type: ignore[misc]
    return struct.pack("<I", etype) + _len(len(items), version) + b"".join(_value(etype, i, version) for i in items)


def gguf_bytes(
    *,
    version: int = 3,
    kvs: list[tuple[str, int, object]] | None = None,
    tensors: list[tuple[str, list[int], int, int]] | None = None,
    alignment: int = 32,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    magic: bytes = b"GGUF",
) -> bytes:
    """A whole GGUF file. ``tensors`` are (name, dims, ggml type, data bytes); offsets are
    laid out as writers do (each aligned), and the data section is zeros."""
    kvs = (
        kvs
        if kvs is not None
        else [
            ("general.architecture", STRING, "llama"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "hello"])),
        ]
    )
    tensors = tensors if tensors is not None else [("tok_embd.weight", [64, 4], F32, 64 * 4 * 4)]
    head = magic + struct.pack("<I", version)
    head += _len(len(tensors) if tensor_count is None else tensor_count, version)
    head += _len(len(kvs) if kv_count is None else kv_count, version)
    for key, vtype, value in kvs:
        head += _str(key, version) + struct.pack("<I", vtype) + _value(vtype, value, version)
    offset = 0
    for name, dims, gtype, nbytes in tensors:
        head += _str(name, version) + struct.pack("<I", len(dims))
        head += b"".join(_len(d, version) for d in dims)
        head += struct.pack("<IQ", gtype, offset)
        offset += -(-nbytes // alignment) * alignment
    data_start = -(-len(head) // alignment) * alignment
    end = max([0] + [o for o in _offsets(tensors, alignment)])
    return head + bytes(data_start - len(head)) + bytes(end)


def _offsets(tensors: list[tuple[str, list[int], int, int]], alignment: int) -> list[int]:
    out, offset = [], 0
    for _name, _dims, _gtype, nbytes in tensors:
        out.append(offset + nbytes)
        offset += -(-nbytes // alignment) * alignment
    return out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ModelError) as e:
        gguf.summarise(path, path.name)
    text = str(e.value)
    assert text.startswith(f"{path.name}: malformed or truncated GGUF file ("), text
    assert "\n" not in text
    return text


# -- valid files -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_version_is_read_and_summarised(tmp_path: Path, version: int) -> None:
    tensors = [
        ("tok_embd.weight", [256, 8], Q4_K, 144 * 8),
        ("output_norm.weight", [256], F32, 256 * 4),
        ("blk.0.attn_q.weight", [64, 64], Q8_0, 34 * 2 * 64),
        ("rope_freqs", [32], F16, 64),
    ]
    path = write(tmp_path / "m.gguf", gguf_bytes(version=version, tensors=tensors))
    s = gguf.summarise(path, "m.gguf")
    assert (s.version, s.tensors, s.metadata_kvs, s.architecture) == (version, 4, 2, "llama")
    assert s.types == {"Q4_K": 1, "F32": 1, "Q8_0": 1, "F16": 1}
    assert s.parameters == 256 * 8 + 256 + 64 * 64 + 32
    assert 0 < s.header_bytes < path.stat().st_size


def test_custom_alignment_and_every_value_type(tmp_path: Path) -> None:
    kvs = [
        ("general.alignment", UINT32, 64),
        ("a.u8", UINT8, 1),
        ("a.i8", INT8, -1),
        ("a.u16", UINT16, 2),
        ("a.i16", INT16, -2),
        ("a.i32", INT32, -3),
        ("a.f32", FLOAT32, 1.5),
        ("a.bool", BOOL, True),
        ("a.u64", UINT64, 2**40),
        ("a.i64", INT64, -(2**40)),
        ("a.f64", FLOAT64, 2.5),
        ("a.nested", ARRAY, (ARRAY, [(INT32, [1, 2]), (STRING, ["x"])])),
        ("a.empty", ARRAY, (FLOAT32, [])),
    ]
    tensors = [("a", [3], F32, 12), ("b", [5], F32, 20)]
    path = write(tmp_path / "m.gguf", gguf_bytes(kvs=kvs, tensors=tensors, alignment=64))
    s = gguf.summarise(path, "m.gguf")
    assert (s.tensors, s.metadata_kvs, s.architecture, s.parameters) == (2, 13, None, 8)


def test_a_tensor_type_newer_than_weightship_is_named_by_its_number(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes(tensors=[("x", [32], 99, 0)]))
    assert gguf.summarise(path, "m.gguf").types == {"type-99": 1}


def test_no_tensors_no_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", gguf_bytes(kvs=[], tensors=[]))
    s = gguf.summarise(path, "m.gguf")
    assert (s.tensors, s.metadata_kvs, s.parameters, s.header_bytes) == (0, 0, 0, 24)


def test_a_big_vocabulary_is_skipped_quickly(tmp_path: Path) -> None:
    """150 000 token strings (a modern tokenizer) are skipped by their lengths, not decoded."""
    tokens = [f"tok{i}" for i in range(150_000)]
    kvs = [("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), ("general.architecture", STRING, "qwen2")]
    path = write(tmp_path / "m.gguf", gguf_bytes(kvs=kvs))
    start = time.monotonic()
    s = gguf.summarise(path, "m.gguf")
    assert s.architecture == "qwen2"
    assert time.monotonic() - start < 2.0


def test_pack_records_the_summary_in_the_manifest(tmp_path: Path) -> None:
    """The summary goes into files[].gguf, beside the size and sha256, and survives a
    round trip through the manifest's canonical JSON."""
    model = tmp_path / "model"
    model.mkdir()
    write(model / "q4.gguf", gguf_bytes(tensors=[("w", [256, 2], Q4_K, 288)]))
    (model / "README.md").write_text("hi")
    m = pack(model).manifest
    entry = {f.path: f for f in m.files}["q4.gguf"]
    assert entry.gguf is not None and entry.gguf.types == {"Q4_K": 1}
    doc = json.loads(m.to_bytes())
    assert doc["files"][1]["gguf"] == {
        "version": 3,
        "tensors": 1,
        "parameters": 512,
        "types": {"Q4_K": 1},
        "metadata_kvs": 2,
        "architecture": "llama",
        "header_bytes": entry.gguf.header_bytes,
    }
    assert Manifest.from_bytes(m.to_bytes()).files[1].gguf == entry.gguf
    assert "gguf" not in doc["files"][0]


def test_pack_and_show_print_the_summary(tmp_path: Path, file_store: str) -> None:
    """The text output says what a GGUF file holds, as it does for safetensors: version,
    architecture, tensor and parameter counts, and the type mix, most tensors first."""
    tensors = [("w", [256, 4], Q4_K, 576), ("n", [256], F32, 1024), ("m", [256], F32, 1024)]
    path = write(tmp_path / "q4.gguf", gguf_bytes(tensors=tensors))
    packed = run_cli("pack", path)
    assert packed.returncode == 0, packed.stderr
    expected = "q4.gguf  GGUF v3 (llama), 3 tensors, 1,536 params, F32:2,Q4_K:1"
    assert expected in packed.stdout.splitlines()[0]

    assert run_cli("publish", path, "q4:1", "--store", file_store, cwd=tmp_path).returncode == 0
    shown = run_cli("show", "q4:1", "--store", file_store, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert any(line.startswith("  ") and line.endswith(expected) for line in shown.stdout.splitlines()), shown.stdout


# -- broken files ----------------------------------------------------------------------


def test_wrong_magic(tmp_path: Path) -> None:
    assert "no GGUF magic" in refused(write(tmp_path / "m.gguf", gguf_bytes(magic=b"GGML")))
    assert "no GGUF magic" in refused(write(tmp_path / "t.gguf", b"<html>not found</html>"))


@pytest.mark.parametrize("version", [0, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    data = bytearray(gguf_bytes())
    data[4:8] = struct.pack("<I", version)
    assert f"version {version}" in refused(write(tmp_path / "m.gguf", bytes(data)))


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    assert "no GGUF magic" in refused(write(tmp_path / "e.gguf", b""))
    assert "shorter than its header" in refused(write(tmp_path / "s.gguf", b"GGUF\x03\x00\x00\x00"))


def test_every_truncation_of_a_header_is_refused(tmp_path: Path) -> None:
    """Cut the file at every byte inside the header, and at every 16 bytes of the data:
    no prefix is accepted, and each is refused with one line naming the file."""
    data = gguf_bytes(tensors=[("a", [32, 2], F32, 256), ("b", [64], F16, 128)])
    path = tmp_path / "cut.gguf"
    for n in [*range(0, 120), *range(120, len(data), 16)]:
        write(path, data[:n])
        refused(path)
    write(path, data)
    gguf.summarise(path, "cut.gguf")


def test_counts_the_file_cannot_hold(tmp_path: Path) -> None:
    huge = 2**62
    assert "tensors cannot fit" in refused(write(tmp_path / "t.gguf", gguf_bytes(tensor_count=huge)))
    assert "metadata entries cannot fit" in refused(write(tmp_path / "k.gguf", gguf_bytes(kv_count=huge)))
    # A count within bounds but larger than what follows: truncated where the next one should be.
    assert "truncated" in refused(write(tmp_path / "n.gguf", gguf_bytes(kvs=[("a", UINT8, 1)], kv_count=3)))


def test_an_array_longer_than_the_file(tmp_path: Path) -> None:
    data = bytearray(gguf_bytes(kvs=[("a", ARRAY, (STRING, ["x", "y"]))], tensors=[]))
    # The array's element count follows the key, its type and the element type.
    at = 24 + 8 + 1 + 4 + 4
    assert struct.unpack_from("<Q", data, at)[0] == 2
    data[at : at + 8] = struct.pack("<Q", 2**60)
    assert "array of" in refused(write(tmp_path / "m.gguf", bytes(data)))
    data[at : at + 8] = struct.pack("<Q", 2**40)
    data[at - 4 : at] = struct.pack("<I", UINT64)  # fixed-size elements: one bounds check
    assert "truncated" in refused(write(tmp_path / "f.gguf", bytes(data)))


@pytest.mark.parametrize(
    ("kvs", "tensors", "why"),
    [
        ([("a", 13, b"\x00")], [], "unknown value type 13"),
        ([("a", ARRAY, (14, []))], [], "unknown array element type 14"),
        ([("general.alignment", UINT32, 48)], [], "not a power of two"),
        ([("general.alignment", UINT32, 0)], [], "not a power of two"),
        ([("general.alignment", UINT64, 32)], [], "not uint32"),
        ([("a", UINT8, 1), ("a", UINT8, 2)], [], "appears twice"),
        ([], [("w", [32], F32, 128), ("w", [32], F32, 128)], "tensor 'w' appears twice"),
        ([], [("w", [2, 2, 2, 2, 2], F32, 128)], "5 dimensions"),
        ([], [("w", [33], Q8_0, 34)], "packs 32 values per block"),
        ([(b"\xff\xfe", UINT8, 1)], [], "metadata key 0 is not valid UTF-8"),
        ([], [(b"\xff", [32], F32, 128)], "tensor info 0 is not valid UTF-8"),
    ],
)
def test_malformed_headers(tmp_path: Path, kvs, tensors, why: str) -> None:
    assert why in refused(write(tmp_path / "m.gguf", gguf_bytes(kvs=kvs, tensors=tensors)))


def test_a_misaligned_tensor_offset(tmp_path: Path) -> None:
    data = bytearray(gguf_bytes(kvs=[], tensors=[("w", [8], F32, 32)]))
    # The tensor's offset is the last 8 bytes of its info: name, n_dims, dims, type, offset.
    at = 24 + 8 + 1 + 4 + 8 + 4
    data[at : at + 8] = struct.pack("<Q", 4)
    assert "not a multiple of the alignment 32" in refused(write(tmp_path / "m.gguf", bytes(data)))


def test_a_tensor_past_the_end_of_the_file(tmp_path: Path) -> None:
    data = gguf_bytes(kvs=[], tensors=[("w", [256], F32, 1024)])
    text = refused(write(tmp_path / "m.gguf", data[:-1]))
    assert "tensor 'w' ends at byte" in text and "the file is truncated" in text


def test_pack_and_publish_refuse_a_truncated_gguf_with_one_line(tmp_path: Path) -> None:
    """What a user sees: exit 1, one error line naming the file and what to do; nothing in
    the store."""
    data = gguf_bytes(tensors=[("w", [256, 4], Q4_K, 576)])
    path = write(tmp_path / "model.gguf", data[: len(data) - 100])
    proc = run_cli("pack", path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith("error: model.gguf: malformed or truncated GGUF file (tensor 'w' ends at byte"), line
    assert "re-download" in line
    store = tmp_path / "store"
    proc = run_cli("publish", path, "m:1", "--store", f"file://{store}")
    assert proc.returncode == 1
    assert "model.gguf: malformed or truncated GGUF file" in error_line(proc)
    assert not (store / "blobs").exists() or not any((store / "blobs").rglob("*"))
