"""JSON Schemas (draft 2020-12) of the ``--json`` documents, shipped as package data.

A document names its schema in its ``schema`` field, ``weightship.COMMAND/vN``, and the
schema lives beside this file as ``COMMAND.vN.json``; docs/json.md describes them and
the rule for when N changes.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

_ID = re.compile(r"^weightship\.([a-z][a-z-]*)/v([1-9][0-9]*)$")


def filename(schema_id: str) -> str:
    """``weightship.publish/v1`` -> ``publish.v1.json``."""
    m = _ID.match(schema_id)
    if not m:
        raise ValueError(f"not a weightship schema id: {schema_id!r}")
    return f"{m.group(1)}.v{m.group(2)}.json"


def load(schema_id: str) -> dict[str, Any]:
    """The JSON Schema a document with ``"schema": schema_id`` follows."""
    return json.loads(resources.files(__name__).joinpath(filename(schema_id)).read_text(encoding="utf-8"))


def available() -> list[str]:
    """Every schema id shipped with this installation."""
    out = []
    for entry in resources.files(__name__).iterdir():
        m = re.fullmatch(r"([a-z][a-z-]*)\.v([1-9][0-9]*)\.json", entry.name)
        if m:
            out.append(f"weightship.{m.group(1)}/v{m.group(2)}")
    return sorted(out)
