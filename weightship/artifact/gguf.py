"""Reading GGUF headers: enough to refuse a truncated or corrupt file and summarise a good one.

GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is
little-endian: the magic ``GGUF``, a u32 version, the tensor and metadata counts (u32 in
version 1, u64 since 2), the metadata key/value pairs, one info record per tensor (name,
dimensions, ggml type, offset into the data section), then the data section, aligned to
``general.alignment`` (32 by default). The checks are those llama.cpp's loader makes
before it hands out a tensor (gguf.c): a known version, counts that fit in the file,
well-formed keys and values, at most 4 dimensions, no tensor named twice, a power-of-two
alignment, aligned offsets, and every tensor's bytes inside the file. So a download cut
short is refused at publish time instead of on a GPU node.

The file is read through ``mmap`` (nothing is copied; a tokenizer's 150 000 strings are
skipped by their lengths), and only the header: tensor data is never touched.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

from weightship.artifact.manifest import GGUFSummary
from weightship.errors import ModelError

MAGIC = b"GGUF"
VERSIONS = (1, 2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml tensor types: id -> (name, elements per block, bytes per block), as gguf-py 0.19
# (GGML_QUANT_SIZES) and ggml.c define them. Ids missing here were removed from ggml.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# Metadata value types; the byte sizes of the fixed-size ones.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_FIXED = {
    _UINT8: 1,
    _INT8: 1,
    _UINT16: 2,
    _INT16: 2,
    _UINT32: 4,
    _INT32: 4,
    _FLOAT32: 4,
    _BOOL: 1,
    _UINT64: 8,
    _INT64: 8,
    _FLOAT64: 8,
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
MAX_NESTING = 8  # arrays of arrays: llama.cpp allows none deeper than that in practice


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


class _Bad(Exception):
    """A reason the header is malformed; turned into a ModelError naming the file."""


class _Reader:
    """A bounds-checked cursor over the mapped file: every read past the end is a _Bad."""

    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        # Counts, string lengths and dimensions are u64 since version 2, u32 in version 1;
        # set once the version is read.
        self.wide = True

    def take(self, n: int, what: str) -> int:
        """Advance by ``n`` bytes; return where they start."""
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"truncated in {what} at byte {self.pos}")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def count(self, what: str) -> int:
        """A count, string length or dimension, as wide as the version makes it."""
        return self.u64(what) if self.wide else self.u32(what)


def _string(r: _Reader, what: str) -> str:
    n = r.count(what)
    start = r.take(n, what)
    try:
        return bytes(r.buf[start : start + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _skip_value(r: _Reader, vtype: int, what: str, depth: int = 0) -> None:
    if vtype in _FIXED:
        r.take(_FIXED[vtype], what)
    elif vtype == _STRING:
        r.take(r.count(what), what)
    elif vtype == _ARRAY:
        if depth >= MAX_NESTING:
            raise _Bad(f"{what}: arrays nested more than {MAX_NESTING} deep")
        etype = r.u32(what)
        count = r.count(what)
        if etype in _FIXED:
            r.take(count * _FIXED[etype], what)  # one bounds check for the whole array
            return
        if etype not in (_STRING, _ARRAY):
            raise _Bad(f"{what}: unknown array element type {etype}")
        # Every element takes at least its length field: a count the file cannot hold is
        # refused before looping over it.
        if count * (8 if r.wide else 4) > r.size - r.pos:
            raise _Bad(f"{what}: array of {count} elements in a file of {r.size} bytes")
        if etype == _STRING:
            _skip_strings(r, count, what)
            return
        for _ in range(count):
            _skip_value(r, etype, what, depth + 1)
    else:
        raise _Bad(f"{what}: unknown value type {vtype}")


def _skip_strings(r: _Reader, count: int, what: str) -> None:
    """Skip ``count`` strings by their lengths: a vocabulary's 150 000 tokens and as many
    merges are most of a header, so this loop is kept tight (about 0.1 s for 300 000)."""
    unpack = (_U64 if r.wide else _U32).unpack_from
    step = 8 if r.wide else 4
    buf, pos, size = r.buf, r.pos, r.size
    for _ in range(count):
        if pos + step > size:
            raise _Bad(f"truncated in {what} at byte {pos}")
        pos += step + unpack(buf, pos)[0]
    if pos > size:
        raise _Bad(f"truncated in {what} at byte {size}")
    r.pos = pos


def summarise(path: Path, display: str) -> GGUFSummary:
    """Validate a GGUF file's header and summarise it; raise ModelError naming ``display``."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                # A valid header is at least magic, version and two counts.
                head = fh.read(4)
                if head != MAGIC:
                    raise _bad(display, f"no GGUF magic (starts with {head!r})")
                raise _bad(display, f"shorter than its header ({size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    return _parse(_Reader(buf, size))
                except _Bad as e:
                    raise _bad(display, str(e)) from None
    except OSError as e:
        raise ModelError(f"{display}: cannot read ({e.strerror})") from None


def _parse(r: _Reader) -> GGUFSummary:
    magic = bytes(r.buf[r.take(4, "magic") : 4])
    if magic != MAGIC:
        raise _Bad(f"no GGUF magic (starts with {magic!r})")
    version = r.u32("version")
    if version not in VERSIONS:
        raise _Bad(f"version {version}, weightship reads versions 1 to 3")
    r.wide = version >= 2  # version 1 had 32-bit counts and string lengths
    n_tensors = r.count("tensor count")
    n_kv = r.count("metadata count")
    # The smallest key/value is a 1-byte key, its length, a type and a 1-byte value; the
    # smallest tensor info a 1-byte name, its length, n_dims, type and offset.
    rest = r.size - r.pos
    length = 8 if r.wide else 4
    if n_kv * (length + 1 + 4 + 1) > rest:
        raise _Bad(f"{n_kv} metadata entries cannot fit in a file of {r.size} bytes")
    if n_tensors * (length + 1 + 4 + 4 + 8) > rest:
        raise _Bad(f"{n_tensors} tensors cannot fit in a file of {r.size} bytes")

    alignment = DEFAULT_ALIGNMENT
    architecture: str | None = None
    keys: set[str] = set()
    for i in range(n_kv):
        key = _string(r, f"metadata key {i}")
        if key in keys:
            raise _Bad(f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = r.u32(f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise _Bad(f"general.alignment has value type {vtype}, not uint32")
            alignment = r.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment {alignment} is not a power of two")
        elif key == "general.architecture" and vtype == _STRING:
            architecture = _string(r, "general.architecture")
        else:
            _skip_value(r, vtype, f"metadata {key!r}")

    types: dict[str, int] = {}
    parameters = 0
    names: set[str] = set()
    spans: list[tuple[int, int | None, str]] = []
    for i in range(n_tensors):
        name = _string(r, f"tensor info {i}")
        if name in names:
            raise _Bad(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS} are allowed")
        dims = [r.count(f"tensor {name!r}") for _ in range(n_dims)]
        gtype = r.u32(f"tensor {name!r}")
        offset = r.u64(f"tensor {name!r}")
        elements = math.prod(dims)
        known = GGML_TYPES.get(gtype)
        nbytes = None
        if known is not None:
            tname, block, block_bytes = known
            if dims and dims[0] % block:
                raise _Bad(f"tensor {name!r}: {tname} packs {block} values per block, its rows hold {dims[0]}")
            nbytes = elements // block * block_bytes
        else:
            # A type newer than this table: its size is unknown, its offset still checked.
            tname = f"type-{gtype}"
        if offset % alignment:
            raise _Bad(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        types[tname] = types.get(tname, 0) + 1
        parameters += elements
        spans.append((offset, nbytes, name))

    header_bytes = r.pos
    data_start = -(-header_bytes // alignment) * alignment  # the data section is aligned too
    data_size = r.size - data_start
    if spans and data_size < 0:
        raise _Bad(f"truncated before its tensor data (header of {header_bytes} bytes, file of {r.size})")
    for offset, nbytes, name in spans:
        end = offset + (nbytes or 0)  # a type of unknown size: its start, at least, must be in the file
        if end > data_size:
            raise _Bad(
                f"tensor {name!r} ends at byte {data_start + end}, past the end of the file ({r.size} bytes): "
                "the file is truncated"
            )
    return GGUFSummary(
        version=version,
        tensors=n_tensors,
        parameters=parameters,
        types=types,
        metadata_kvs=n_kv,
        architecture=architecture,
        header_bytes=header_bytes,
    )


def _bad(display: str, detail: str) -> ModelError:
    return ModelError(
        f"{display}: malformed or truncated GGUF file ({detail})",
        "re-export or re-download it",
    )
