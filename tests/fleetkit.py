"""Helpers for the fleet tests: publishing, config files, reading a node cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from weightship.demo import build_model


def publish(model: Path, ref: str, store_url: str, key: Path | None = None, tags: Iterable[str] = ()) -> Any:
    from weightship import release, signing
    from weightship.store import open_store

    st = open_store(store_url)
    try:
        return release.publish(model, ref, st, tags_=list(tags), signer=signing.KeySigner(key) if key else None)
    finally:
        st.close()


def model(root: Path, seed: int, hidden: int = 256) -> Path:
    """A distinct small safetensors model per seed (about 1 MiB at hidden=256)."""
    return build_model(root / f"model-{seed}-{hidden}", seed=seed, hidden=hidden)


def node_toml(path: Path, pub: Path | None) -> Path:
    """A node's own weightship.toml: the policy it enforces, whatever a caller says."""
    path.write_text(f'[policy]\nkeys = ["{pub}"]\n' if pub else "")
    return path


def fleet_toml(regions: dict[str, list[dict[str, Any]]], store: str | None = None, pub: Path | None = None) -> str:
    out = []
    if store:
        out.append(f'[store]\nurl = "{store}"\n')
    if pub:
        out.append(f'[policy]\nkeys = ["{pub}"]\n')
    for name, nodes in regions.items():
        out.append(f"[regions.{name}]")
        for n in nodes:
            out.append(f"[[regions.{name}.nodes]]")
            out += [f"{k} = {json.dumps(v)}" for k, v in n.items()]
        out.append("")
    return "\n".join(out) + "\n"


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file below root (symlinks followed) with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def source_files(model_dir: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(model_dir).items() if k != "model.sig"}


def on_disk(cache: Path) -> int:
    """Bytes a node holds for any release: verified blobs plus partial downloads."""
    total = 0
    for d in (cache / "blobs" / "sha256", cache / "state" / "partial"):
        if d.is_dir():
            total += sum(p.stat().st_size for p in d.iterdir())
    return total


def record(cache: Path, name: str, version: str) -> dict[str, Any] | None:
    p = cache / "state" / "releases" / name / version / "record.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None


def cli_json(proc) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def spawn_cli(*args, cwd: Path | None = None, env: dict | None = None):
    """Start ``weightship ARGS`` without waiting (for concurrent runs); text pipes."""
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "weightship", *map(str, args)],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def release_bytes_on_disk(cache: Path, manifest: dict[str, Any]) -> int:
    """Bytes of this release already on a node: whole blobs plus partial downloads."""
    total = 0
    for f in {f["sha256"]: f for f in manifest["files"]}.values():
        blob = cache / "blobs" / "sha256" / f["sha256"]
        part = cache / "state" / "partial" / f["sha256"]
        if blob.exists():
            total += f["size"]
        elif part.exists():
            total += min(part.stat().st_size, f["size"])
    return total
