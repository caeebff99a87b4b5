"""What the benchmarks share: the generated model they time, and the machine they ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

MIB = 1024 * 1024


def build_model(root: Path, size_mib: int, shards: int, seed: int = 0) -> list[Path]:
    """``shards`` safetensors files of float16 noise totalling ``size_mib`` MiB, plus index
    and config, as a sharded Hugging Face checkpoint looks."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    per_shard = size_mib * MIB // shards
    cols, per = 1024, 4
    rows = max(1, per_shard // (2 * cols * per))
    weight_map: dict[str, str] = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for t in range(per):
            tname = f"layers.{s * per + t}.weight"
            tensors[tname] = rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16)
            weight_map[tname] = name
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": shards * per * rows * cols * 2}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / "config.json").write_text(json.dumps({"model_type": "bench", "torch_dtype": "float16"}) + "\n")
    return sorted(p for p in root.iterdir() if p.is_file())


def machine() -> str:
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpus, kernel, py = os.cpu_count(), platform.release(), platform.python_version()
    return f"{cpus} CPUs, {mem / 2**30:.0f} GiB memory, Linux {kernel}, Python {py}"


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every size-based benchmark takes; each adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="total model size (default 1024)")
    ap.add_argument("--shards", type=int, default=8, help="safetensors shards (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each tool (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary workspace goes")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return ap


def check_sizes(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.size_mib < 1 or args.shards < 1 or args.reps < 1:
        ap.error("--size-mib, --shards and --reps must be positive")
