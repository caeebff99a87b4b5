"""What the benchmarks share: the generated model they time, and the machine they ran on."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


# -- measuring a command ---------------------------------------------------------------------


@dataclass
class Measured:
    """One command run to its end: wall seconds, and from ``wait4`` its CPU seconds
    (user+sys) and peak resident set, both counting every descendant it waited for."""

    wall: float
    cpu: float  # user + sys
    sys: float  # of which in the kernel
    maxrss: int  # bytes: the largest peak RSS of the command or any descendant it reaped
    returncode: int
    stdout: bytes
    stderr: bytes


# Runs a command and writes its wall time, user and system CPU seconds and peak RSS (KiB)
# to a file.
# ru_maxrss survives exec: a child forked from this benchmark (numpy, boto3 and the
# server's client loaded) would start with the benchmark's resident set as its peak, so
# every command is started from this small interpreter instead. The floor it sets (about
# 9 MB, what ``true`` measures) is below any tool measured here.
_LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as e:
    sys.stderr.write(f"{argv[0]}: {e.strerror}\\n")
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as fh:
    fh.write(f"{wall} {ru.ru_utime} {ru.ru_stime} {ru.ru_maxrss}")
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_measured(
    argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None, *, check: bool = True
) -> Measured:
    """Run ``argv`` and measure it (see :class:`Measured` and ``_LAUNCHER``)."""
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        result = Path(tmp) / "rusage"
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result)]
        proc = subprocess.run([*launcher, *map(str, argv)], env=env, cwd=cwd, capture_output=True, check=False)
        text = result.read_text() if result.exists() else ""
    wall, user, sys_, maxrss_kib = (float(x) for x in text.split()) if text else (math.nan,) * 3 + (-1,)
    maxrss = int(maxrss_kib) * 1024 if maxrss_kib >= 0 else -1
    m = Measured(wall, user + sys_, sys_, maxrss, proc.returncode, proc.stdout, proc.stderr)
    if check and m.returncode != 0:
        tail = m.stderr.decode(errors="replace").strip()[-2000:]
        raise SystemExit(f"benchmark command failed ({m.returncode}): {' '.join(map(str, argv))}\n{tail}")
    return m


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy so far (all CPUs, /proc/stat): over a
    command, minus its own and the server's, what everything else on the machine used."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]  # guest time is inside user; steal is not ours
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


# -- an earlier implementation, side by side --------------------------------------------------


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check)


def last_revision_with(repo: Path, path: str) -> str:
    """The newest commit reachable from HEAD in which ``path`` exists: HEAD itself while
    its deletion is uncommitted, otherwise the parent of the commit that deleted it."""

    def has(rev: str) -> bool:
        return _git(repo, "cat-file", "-e", f"{rev}:{path}", check=False).returncode == 0

    if has("HEAD"):
        return _git(repo, "rev-parse", "HEAD").stdout.strip()
    deleted_by = _git(repo, "rev-list", "-1", "HEAD", "--", path).stdout.strip()
    if deleted_by and has(f"{deleted_by}^"):
        return _git(repo, "rev-parse", f"{deleted_by}^").stdout.strip()
    raise SystemExit(f"no commit reachable from HEAD in {repo} has {path}: name one with --prev-rev or --prev")


@contextmanager
def git_worktree(repo: Path, rev: str, parent: Path) -> Iterator[Path]:
    """A detached checkout of ``rev`` under ``parent`` (``git worktree add``; the work
    tree of ``repo`` is not touched), removed again on the way out."""
    path = parent / f"prev-{rev[:12]}"
    _git(repo, "worktree", "add", "--detach", str(path), rev)
    try:
        yield path
    finally:
        _git(repo, "worktree", "remove", "--force", str(path), check=False)
