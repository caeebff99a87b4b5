"""``weightship demo``: the whole pipeline on the embedded ``file://`` store, in seconds."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from weightship.progress import Reporter, human_bytes


def build_model(root: Path, shards: int = 2, seed: int = 0, hidden: int = 256) -> Path:
    """A small but real safetensors model: sharded weights, index, config, tokenizer."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.attn.weight": rng.standard_normal((hidden, hidden), dtype=np.float32),
            f"layers.{i}.mlp.weight": rng.standard_normal((hidden * 2, hidden), dtype=np.float32).astype(np.float16),
            f"layers.{i}.norm.bias": np.zeros(hidden, dtype=np.float32),
        }
        save_file(tensors, str(root / name), metadata={"format": "np"})
        weight_map.update({k: name for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "demo", "hidden_size": hidden, "layers": shards}))
    tok = root / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(1000)))
    return root


def run(directory: Path | None, reporter: Reporter, out: Callable[[str], None] = print) -> Path:
    from weightship import release
    from weightship.store import open_store
    from weightship.trust import signers as signing
    from weightship.trust.policy import TrustPolicy
    from weightship.trust.verify import verify_directory

    start = time.monotonic()
    ws = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="weightship-demo-"))
    ws.mkdir(parents=True, exist_ok=True)
    model = build_model(ws / "model")
    out(f"1. built a safetensors model in {model}")

    key = ws / "release.key"
    if not key.exists():
        signing.generate_key(key)
    pub = key.with_suffix(".pub")
    out(f"2. generated a signing key {key} (public: {pub})")

    store = open_store(f"file://{ws / 'store'}")
    existing = release.versions(store, "demo")
    version = f"1.{len(existing)}"
    result = release.publish(
        model, f"demo:{version}", store, tags_=["prod"], signer=signing.KeySigner(key), reporter=reporter
    )
    out(
        f"3. published demo:{version} (tag prod) to {store.url}: {result.files} files, "
        f"{human_bytes(result.total_bytes)}, digest {result.digest}"
    )

    # A second version changes one file: only that file's bytes move.
    (model / "config.json").write_text(json.dumps({"model_type": "demo", "revision": 2}))
    again = release.publish(model, f"demo:{version}-r2", store, signer=signing.KeySigner(key), reporter=reporter)
    out(
        f"4. published demo:{version}-r2 with config.json changed: uploaded "
        f"{human_bytes(again.bytes_uploaded)}, skipped {human_bytes(again.bytes_skipped)} already stored"
    )

    dest = ws / f"pulled-{version}"
    policy = TrustPolicy(keys=[pub])
    pulled = release.pull(store, "demo:prod", dest, policy=policy, reporter=reporter)
    out(f"5. pulled demo:prod into {dest}: every sha256 and the signature verified ({pulled.signer.get('method')})")

    verified = verify_directory(dest, policy)
    out(f"6. weightship verify {dest} --key {pub}: {len(verified.statement.resources)} files match the signature")

    config_path = warm_demo_region(ws, store, pub, out)

    out(f"done in {time.monotonic() - start:.1f}s. Next, try:")
    out(f"  weightship ls --store file://{ws / 'store'}")
    out(f"  weightship show demo:prod --store file://{ws / 'store'} --key {pub}")
    out(f"  weightship verify {dest} --key {pub}")
    out(f"  weightship --config {config_path} status demo:prod --region demo")
    return ws


DEMO_FLEET = """\
# Written by `weightship demo`: the demo store, its signer, and three local cache nodes.
[store]
url = "file://store"

[policy]
keys = ["release.pub"]

[regions.demo]
{nodes}"""


def warm_demo_region(ws: Path, store, pub: Path, out: Callable[[str], None]) -> Path:
    """Warm demo:prod onto a region of three ``local`` nodes (caches inside the workspace)
    through the same engine and orchestration as ``weightship warm``, then ask for status."""
    import asyncio

    from weightship import config, release
    from weightship.fleet import orchestrate
    from weightship.fleet.inventory import load_fleet
    from weightship.fleet.plan import build_request
    from weightship.fleet.transports import for_node

    nodes = "".join(
        f'\n[[regions.demo.nodes]]\nname = "gpu-{i}"\ntransport = "local"\ncache = "nodes/gpu-{i}"\n' for i in (1, 2, 3)
    )
    config_path = ws / "weightship.toml"
    config_path.write_text(DEMO_FLEET.format(nodes=nodes))
    cfg = config.load(config_path)
    region = load_fleet(cfg.data, cfg.path).region("demo")
    policy = cfg.policy()

    def transport_for(node):
        return for_node(node, policy=policy, config_path=str(config_path))

    rel = release.resolve(store, "demo:prod")
    req = build_request(store, rel, tags=["prod"])
    warmed = asyncio.run(orchestrate.warm_region(region, rel, req, transport_for, ref="demo:prod"))
    fetched = sum(r.bytes_fetched or 0 for r in warmed.nodes)
    out(
        f"7. weightship warm demo:prod --region demo: {warmed.count}/{len(warmed.nodes)} local nodes ready "
        f"({human_bytes(fetched)} fetched, every sha256 and the node's policy checked)"
    )
    queries = {region.name: orchestrate.Query("demo:prod", rel.version, rel.digest)}
    statuses = asyncio.run(orchestrate.status_regions([region], queries, transport_for, ref="demo:prod"))
    out("8. weightship status demo:prod --region demo:")
    for s in statuses.nodes:
        signer = "signature verified" if s.get("verified") else "not verified"
        out(f"   {s['node']}: {s['state']}, prod -> {s.get('tag_version')}, {signer}: {s['cache']}/models/demo/prod")
    return config_path
