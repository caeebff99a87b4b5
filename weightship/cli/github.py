"""GitHub Actions step outputs and job summaries for ``publish``, ``warm`` and ``status``.

Inside a step, ``GITHUB_OUTPUT`` names a file of step outputs and ``GITHUB_STEP_SUMMARY`` a
Markdown file shown on the run's page. Both are built from the command's ``--json``
document, so outputs, summary and JSON never disagree; nothing a command prints changes.
docs/json.md lists the outputs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from weightship.errors import UsageError
from weightship.progress import human_bytes, plural

OUTPUT_ENV = "GITHUB_OUTPUT"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def enabled(flag: bool | None) -> bool:
    """``--output-github`` (which needs GITHUB_OUTPUT), ``--no-output-github``, or, with
    neither, whether this runs in a step that has GITHUB_OUTPUT."""
    present = bool(os.environ.get(OUTPUT_ENV))
    if flag and not present:
        raise UsageError("--output-github: GITHUB_OUTPUT is not set", "run it in a GitHub Actions step")
    return present if flag is None else flag


# -- writing -----------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def format_outputs(outputs: Mapping[str, Any]) -> str:
    """``name=value`` lines; a value with a line break goes in a ``name<<DELIM`` block whose
    delimiter is random, so that no value can end the block early and inject outputs."""
    out = []
    for name, value in outputs.items():
        text = _text(value)
        if "\n" in text or "\r" in text:
            delim = f"ghadelimiter_{uuid.uuid4()}"
            out.append(f"{name}<<{delim}\n{text}\n{delim}\n")
        else:
            out.append(f"{name}={text}\n")
    return "".join(out)


def _append(env: str, text: str) -> None:
    path = os.environ.get(env)
    if not path:
        return
    # One write in append mode: other steps' and commands' lines in the file stay intact.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


def write(outputs: Mapping[str, Any], summary: str) -> None:
    _append(OUTPUT_ENV, format_outputs(outputs))
    _append(SUMMARY_ENV, summary)


# -- Markdown ----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    # Node errors and paths are free text: keep them from breaking the table or turning into HTML.
    text = _text(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return " ".join(text.split())


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _signer(signer: Mapping[str, Any] | None) -> str:
    if not signer:
        return ""
    method = signer.get("method")
    if method == "key":
        return f"key {str(signer.get('fingerprint') or '?')[:16]}"
    if method == "certificate":
        return f"certificate {signer.get('subject')}"
    return f"{signer.get('identity')} ({signer.get('issuer')})"


def _size(n: Any) -> str:
    return human_bytes(n) if isinstance(n, int) else ""


# -- publish -----------------------------------------------------------------------------


def publish(doc: Mapping[str, Any]) -> None:
    """Outputs and summary of a ``publish --json`` document (weightship.publish/v1)."""
    keys = ("digest", "release", "name", "version", "tags", "signed", "files", "total_bytes")
    outputs = {k: doc[k] for k in keys}
    outputs.update(bytes_uploaded=doc["bytes_uploaded"], bytes_skipped=doc["bytes_skipped"], store=doc["store"])
    summary = f"### weightship publish `{doc['name']}:{doc['version']}`\n\n" + _table(
        ["release", "tags", "signed", "files", "uploaded", "already in the store"],
        [
            [
                doc["release"],
                ", ".join(doc["tags"]) or "-",
                doc["signed"],
                f"{doc['files']} ({_size(doc['total_bytes'])})",
                f"{_size(doc['bytes_uploaded'])} in {plural(doc['blobs_uploaded'], 'blob')}",
                f"{_size(doc['bytes_skipped'])} in {plural(doc['blobs_skipped'], 'blob')}",
            ]
        ],
    )
    write(outputs, summary + "\n")


# -- warm and status ---------------------------------------------------------------------


def _counted(command: str, doc: Mapping[str, Any]) -> tuple[str, str]:
    """The document's count field, and the node state it counts: what ``ok`` was decided on
    (``ready``; ``accepted`` for warm --detach; reachable nodes for status without REF)."""
    if command == "warm" and "ready" not in doc:
        return "accepted", "accepted"
    if command == "status" and doc.get("ref") is None:
        return "ready", "reachable"
    return "ready", "ready"


def fleet(command: str, doc: Mapping[str, Any]) -> None:
    """Outputs and summary of a ``warm --json`` or ``status --json`` document
    (weightship.warm/v1, weightship.status/v1)."""
    field, state = _counted(command, doc)
    nodes = list(doc["nodes"])
    by_region: dict[str, dict[str, int]] = {}
    for n in nodes:
        counts = by_region.setdefault(n["region"], {field: 0, "total": 0})
        counts[field] += n["state"] == state
        counts["total"] += 1
    outputs: dict[str, Any] = {"ok": doc["ok"], field: doc[field], "total": doc["total"], "required": doc["required"]}
    # `ready` is always an output, so that a workflow can test it whatever the mode.
    outputs.setdefault("ready", sum(n["state"] == "ready" for n in nodes))
    ref = doc.get("ref")
    release = None
    if ref is not None and doc.get("digest"):
        name = doc.get("name") or ref.split("@")[0].split(":")[0]
        release = f"{name}@{doc['digest']}"
        outputs.update(ref=ref, version=doc.get("version"), digest=doc["digest"], release=release)
    if command == "warm":
        outputs.update(region=doc["region"], tags=doc.get("tags") or [])
    else:
        outputs["regions"] = doc["regions"]
    outputs["by_region"] = by_region
    outputs["not_ready"] = json.dumps([n["node"] for n in nodes if n["state"] != state])
    outputs["summary"] = "\n".join(f"{r}: {c[field]}/{c['total']} {state}" for r, c in sorted(by_region.items()))

    mark = "✅" if doc["ok"] else "❌"
    where = doc["region"] if command == "warm" else ", ".join(doc["regions"])
    what = f"`{ref}`" if ref is not None else "fleet"
    title = (
        f"### {mark} weightship {command} {what} in {where}: "
        f"{doc[field]}/{doc['total']} {state} (required {doc['required']})\n\n"
    )
    if release:
        title += f"Release `{release}` (version {doc.get('version')}).\n\n"
    write(outputs, title + _node_table(command, ref is not None, nodes) + "\n")


def _node_table(command: str, with_ref: bool, nodes: list[Mapping[str, Any]]) -> str:
    if command == "warm":
        rows = [
            [
                n["node"],
                n["region"],
                n["state"],
                n.get("version") or "",
                _size(n.get("bytes_fetched")),
                ("yes " + _signer(n.get("signer"))).strip() if n.get("verified") else "no",
                n.get("error") or "",
            ]
            for n in nodes
        ]
        return _table(["node", "region", "state", "version", "fetched", "verified", "error"], rows)
    if with_ref:
        rows = [
            [
                n["node"],
                n["region"],
                n["state"],
                n.get("version") or "",
                f"{_size(n.get('bytes_present') or 0)} / {_size(n['bytes_total'])}" if n.get("bytes_total") else "",
                ("yes " + _signer(n.get("signer"))).strip() if n.get("verified") else "no",
                _size(n.get("free_bytes")),
                n.get("error") or "",
            ]
            for n in nodes
        ]
        return _table(["node", "region", "state", "version", "present", "verified", "free", "error"], rows)
    rows = [
        [
            n["node"],
            n["region"],
            n["state"],
            ", ".join(f"{r['name']}:{r['version']} {r['state']}" for r in n.get("releases") or []),
            _size(n.get("free_bytes")),
            n.get("error") or "",
        ]
        for n in nodes
    ]
    return _table(["node", "region", "state", "releases", "free", "error"], rows)
