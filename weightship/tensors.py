"""Reading safetensors headers: enough to refuse a broken shard and summarise a good one."""

from __future__ import annotations

import math
from pathlib import Path

from weightship.errors import ModelError
from weightship.manifest import TensorSummary


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


def summarise(path: Path, display: str) -> TensorSummary:
    """Validate a safetensors file with the reference library and summarise its header.

    ``safe_open`` checks what a loader would trip over later (header length, JSON,
    offsets, that the data region is exactly covered), so a truncated shard is refused
    at publish time instead of on a GPU node.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with path.open("rb") as fh:
            head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{display}: truncated safetensors file (shorter than its header)")
        header_bytes = int.from_bytes(head, "little")
        dtypes: dict[str, int] = {}
        parameters = 0
        count = 0
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = f.get_slice(key)
                dtype = sl.get_dtype()
                dtypes[dtype] = dtypes.get(dtype, 0) + 1
                parameters += math.prod(sl.get_shape())
                count += 1
    except SafetensorError as e:
        raise ModelError(
            f"{display}: malformed or truncated safetensors file ({e})",
            "re-export or re-download the shard",
        ) from None
    except OSError as e:
        raise ModelError(f"{display}: cannot read ({e.strerror})") from None
    return TensorSummary(tensors=count, parameters=parameters, dtypes=dtypes, header_bytes=header_bytes)
