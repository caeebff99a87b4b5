"""Reading safetensors headers: enough to refuse a broken shard and summarise a good one."""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path

from weightship.artifact.manifest import TensorSummary
from weightship.errors import ModelError


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX = 64 * 1024 * 1024  # a 1000-shard model's index is a few hundred KiB


def is_index(path: str) -> bool:
    return path.endswith(INDEX_SUFFIX)


# Element sizes in bits of every dtype the safetensors format defines (0.8).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def summarise(path: Path, display: str) -> TensorSummary:
    """Validate a safetensors file's header and summarise it (see :func:`inspect`)."""
    return inspect(path, display)[0]


def inspect(path: Path, display: str) -> tuple[TensorSummary, frozenset[str]]:
    """Validate a safetensors file's header; return its summary and its tensor names.

    The checks are the ones the format's reference loader makes before it hands out a
    tensor (header length, JSON, dtypes, shapes, offsets, the data region exactly
    covered), so a truncated or malformed shard is refused at publish time instead of on
    a GPU node. They are made here rather than by ``safetensors.safe_open``, which
    imports numpy to open a file: 0.07-0.09 s of every publish. tests/test_tensors.py
    holds these verdicts to the reference loader's on valid and broken files.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _bad(display, "shorter than its header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                raise _bad(display, f"header of {n} bytes, more than the format allows")
            if 8 + n > size:
                raise _bad(display, f"header of {n} bytes in a file of {size}")
            raw = fh.read(n)
    except OSError as e:
        raise ModelError(f"{display}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header is not a JSON object")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(display, f"header is not valid JSON: {e}") from None
    except RecursionError:
        # A valid header nests three levels deep; the reference loader refuses past 128.
        raise _bad(display, "header JSON is nested too deeply") from None
    dtypes: dict[str, int] = {}
    parameters = 0
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _bad(display, "__metadata__ must map names to strings")
            continue
        if not isinstance(info, dict):
            raise _bad(display, f"tensor {name!r} is not described by an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _bad(display, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise _bad(display, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
            raise _bad(display, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        elements = math.prod(shape)
        bits = elements * DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise _bad(display, f"tensor {name!r}: {dtype}{shape} does not fill data_offsets {offsets}")
        spans.append((offsets[0], offsets[1], name))
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        parameters += elements
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise _bad(display, f"tensor {name!r} starts at byte {start} of the data, not {end}")
        end = stop
    if 8 + n + end != size:
        raise _bad(display, f"its tensors cover {end} bytes of data, the file holds {size - 8 - n}")
    summary = TensorSummary(tensors=len(spans), parameters=parameters, dtypes=dtypes, header_bytes=n)
    return summary, frozenset(name for _, _, name in spans)


def _count(value: object) -> bool:
    """A JSON whole number that is not negative (a bool is not one)."""
    return type(value) is int and value >= 0


def _bad(display: str, detail: str) -> ModelError:
    return ModelError(
        f"{display}: malformed or truncated safetensors file ({detail})",
        "re-export or re-download the shard",
    )


def check_index(
    index_rel: str, index_path: Path, files: Mapping[str, Path], names: Mapping[str, frozenset[str]]
) -> None:
    """Refuse a sharded checkpoint's index whose ``weight_map`` a loader could not follow.

    ``files`` are the model's files (relative path -> local path) and ``names`` the
    tensor names of each safetensors shard among them (from :func:`inspect`). Every entry
    of ``weight_map`` must name a shard of the model (relative to the index's directory)
    whose header holds that tensor: transformers fails on the first one that does not,
    on the GPU node, after the whole release was warmed.
    """
    try:
        with index_path.open("rb") as fh:
            raw = fh.read(MAX_INDEX + 1)
    except OSError as e:
        raise ModelError(f"{index_rel}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_INDEX:
        raise _bad_index(index_rel, f"larger than {MAX_INDEX // (1024 * 1024)} MiB")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _bad_index(index_rel, f"not valid JSON: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _bad_index(index_rel, "no weight_map object mapping tensor names to shard files")
    base = posixpath.dirname(index_rel)
    for tensor, shard in weight_map.items():
        rel = posixpath.normpath(posixpath.join(base, shard)) if shard else ""
        if rel not in files:
            raise ModelError(
                f"tensor {tensor!r} is mapped to shard {shard!r}, which is not in the model ({index_rel})",
                "add the missing shard, or fix weight_map in the index",
            )
        if rel not in names:
            raise ModelError(
                f"tensor {tensor!r} is mapped to {shard!r}, which is not a safetensors shard ({index_rel})",
                "fix weight_map in the index",
            )
        if tensor not in names[rel]:
            raise ModelError(
                f"tensor {tensor!r} is mapped to shard {shard!r}, whose header lacks it ({index_rel})",
                "re-export the checkpoint: the index and its shards do not belong together",
            )


def _bad_index(index_rel: str, detail: str) -> ModelError:
    return ModelError(f"{index_rel}: malformed safetensors index ({detail})", "re-export or re-download it")
