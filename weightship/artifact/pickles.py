"""The pickle guard: find files whose loading runs code, and warn about or refuse them.

``torch.load``, ``pickle.load`` and ``joblib.load`` execute whatever a pickle tells them
to; a safetensors file is only read. A release is meant to be pulled onto many machines,
so publishing a pickle is worth a word. Which files: those whose name ends like a
pickle-based checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``, ``.pickle``) *and*
whose bytes really are one: a pickle stream (protocol 2 or later starts with opcode
0x80 and the protocol number; older protocols are recognised by parsing their first
opcodes), or a ZIP archive holding a ``data.pkl`` (``torch.save`` since PyTorch 1.6).
A ``.bin`` of raw bytes is left alone.

Modes: ``warn`` (the default; one warning per file), ``refuse`` (an error naming the
file, before anything is uploaded), ``allow`` (silent).
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

from weightship.errors import ModelError, UsageError

MODES = ("warn", "refuse", "allow")
DEFAULT_MODE = "warn"
SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Opcodes a protocol 0/1 pickle of a checkpoint starts with: MARK, EMPTY_DICT, EMPTY_LIST,
# EMPTY_TUPLE, GLOBAL, NONE. Any other first byte is taken for something else.
_OLD_STARTS = b"(}])cN"
_PROBE = 4096


def is_candidate(relpath: str) -> bool:
    return relpath.lower().endswith(SUFFIXES)


def kind(path: Path) -> str | None:
    """ "a pickle" or "a PyTorch zip of pickles" when the file is one, else None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_PROBE)
    except OSError:
        return None  # pack reports unreadable files itself, with the reason
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a PyTorch zip of pickles"
        return None
    if head[:1] and head[:1] in _OLD_STARTS and _parses_as_pickle(head):
        return "a pickle"
    return None


def _parses_as_pickle(head: bytes) -> bool:
    """True when the bytes read as a protocol 0/1 pickle: a STOP, or several opcodes in a
    row before the probe ran out (random or text bytes rarely get that far)."""
    # Here, not at the top: every pack imports this module, few models hold an old pickle.
    import pickletools

    count = 0
    try:
        # Decoding a STRING argument of arbitrary bytes warns about its escapes: the bytes
        # are only being probed, and the warning would reach the user's terminal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for op, _arg, _pos in pickletools.genops(head):
                count += 1
                if op.name == "STOP":
                    return True
    except (ValueError, KeyError, UnicodeDecodeError, struct.error):
        pass  # cut off at the end of the probe, or not a pickle at all
    return count >= 8


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"pickle mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


def guard(files: Mapping[str, Path], mode: str = DEFAULT_MODE) -> list[str]:
    """Apply the pickle ``mode`` to a model's files (relative path -> local path).

    Returns one warning per pickle file (none with ``allow``); with ``refuse`` raises a
    ModelError naming the first one instead."""
    check_mode(mode)
    if mode == "allow":
        return []
    found = [(rel, k) for rel, path in sorted(files.items()) if is_candidate(rel) and (k := kind(path))]
    if found and mode == "refuse":
        rel, k = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ModelError(
            f"{rel}{more}: refused, it is {k}: loading it runs code it carries, loading safetensors does not",
            'convert it to safetensors, or allow it with [publish] pickle = "allow" in weightship.toml',
        )
    return [
        f"{rel} is {k}: loading it runs code it carries, loading safetensors does not "
        '(convert it to safetensors; [publish] pickle = "refuse" or "allow" in weightship.toml)'
        for rel, k in found
    ]
