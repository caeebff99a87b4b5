#!/usr/bin/env python3
"""Benchmark: a cold start, in miniature. How long until a fresh process has loaded every
tensor of a release, when the store is behind a 200 Mbit/s link?

Not a test: it needs root (a network namespace and ``tc``), takes minutes, and its
numbers depend on the machine. It creates a network namespace joined to this one by a
veth pair with addresses in 10.200.0.0/16 (its own, nothing else uses them), throttles
both directions with ``tc qdisc … tbf`` (netem is not needed), starts SeaweedFS inside
the namespace, publishes a signed release of safetensors shards, and times, side by side
in every repetition:

(a) from the store: ``weightship pull`` (every sha256 and the signature verified), then a
    new process loads every tensor with safetensors, as a pod without a node cache does;
(b) from a warmed node cache (``weightship warm`` ran before, untimed: it happens before
    traffic), page cache dropped: a new process loads every tensor from
    ``<cache>/models/NAME/prod``;
(c) the same after ``weightship warm --hot`` (page cache dropped first; the hot warm is
    untimed too, and reported on its own).

Every timed step is a new process, so interpreter start-up and imports count. The page
cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``) before (a) and (b) and before the
hot warm of (c). The node cache lives on this machine's disk, not in tmpfs, so that (b)
reads the disk. Target: (b) at least 10 x faster than (a). The namespace is removed at
the end, whatever happens.

    sudo python bench/coldstart.py                       # 512 MiB, 8 shards, 3 repetitions
    sudo python bench/coldstart.py --size-mib 1024 --reps 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import build_model, machine  # noqa: E402
from netlink import Region  # noqa: E402

from tests.fleetkit import fleet_toml  # noqa: E402
from tests.servers import start_seaweed  # noqa: E402

MIB = 1024 * 1024
TARGET = 10.0  # (a) / (b)

# A new process that loads every tensor of every shard below a directory, and says how many.
LOADER = """
import sys
from pathlib import Path
from safetensors.numpy import load_file
tensors = nbytes = 0
for path in sorted(Path(sys.argv[1]).rglob("*.safetensors")):
    for array in load_file(path).values():
        tensors += 1
        nbytes += array.nbytes
print(tensors, nbytes)
"""


def run(*cmd: str | os.PathLike, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn) -> tuple[float, str]:
    started = time.monotonic()
    out = fn()
    return time.monotonic() - started, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate-mbit", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="working directory on disk (default: a temporary one)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("coldstart needs root: a network namespace, tc, and dropping the page cache", file=sys.stderr)
        return 2

    work = Path(args.work or tempfile.mkdtemp(prefix="ws-coldstart-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"release: {args.size_mib} MiB in {args.shards} shards; store behind {args.rate_mbit} Mbit/s (tbf)")
    region = Region(["store"], "wsbench", "10.200")
    with region:
        try:
            return measure(args, work, region)
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path, region: Region) -> int:
    link = region["store"]
    s3 = start_seaweed(work, ip=link.ns_ip, netns=link.ns)
    try:
        bucket = s3.create_bucket("cold")
        store = f"s3://{bucket}/cold"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSHIP_", "AWS_"))}
        env.update(s3.env())
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        ws = [sys.executable, "-m", "weightship"]
        from weightship.trust.signers import generate_key

        key = work / "release.pem"
        pub = generate_key(key)
        model = work / "model"
        build_model(model, args.size_mib, args.shards)
        # Published before the link is throttled: the upload is not what is measured.
        run(*ws, "publish", model, "bench:1.0", "--tag", "prod", "--key", key, "--store", store, env=env)
        total = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        shutil.rmtree(model)
        region.throttle(args.rate_mbit)

        cache = work / "node-cache"
        (work / "weightship.toml").write_text(
            fleet_toml({"local": [{"name": "gpu-1", "transport": "local", "cache": str(cache)}]}, store, pub)
        )
        warm_s, _ = timed(lambda: run(*ws, "warm", "bench:prod", "--region", "local", env=env, cwd=work))
        print(f"warm through the link (untimed in (b) and (c)): {warm_s:.1f}s ({total / MIB / warm_s:.1f} MiB/s)")
        prod = cache / "models" / "bench" / "prod"

        times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "hot": []}
        loaded = ""
        for rep in range(args.reps):
            dest = work / "pulled"
            shutil.rmtree(dest, ignore_errors=True)
            drop_caches()
            started = time.monotonic()
            run(*ws, "pull", "bench:prod", dest, "--key", pub, "--store", store, env=env)
            loaded = run(sys.executable, "-c", LOADER, dest, env=env)
            times["a"].append(time.monotonic() - started)
            shutil.rmtree(dest)

            drop_caches()
            b, out = timed(lambda: run(sys.executable, "-c", LOADER, prod, env=env))
            assert out == loaded, (out, loaded)
            times["b"].append(b)

            drop_caches()
            hot, _ = timed(lambda: run(*ws, "warm", "bench:prod", "--region", "local", "--hot", env=env, cwd=work))
            times["hot"].append(hot)
            c, out = timed(lambda: run(sys.executable, "-c", LOADER, prod, env=env))
            assert out == loaded, (out, loaded)
            times["c"].append(c)
            print(
                f"  rep {rep + 1}: (a) {times['a'][-1]:6.2f}s  (b) {b:5.2f}s  (c) {c:5.2f}s  (hot warm {hot:.2f}s)",
                flush=True,
            )

        tensors, nbytes = loaded.split()
        a, b, c, hot = (statistics.median(times[k]) for k in ("a", "b", "c", "hot"))
        print()
        print(f"medians of {args.reps}; every run loaded {tensors} tensors, {int(nbytes) / MIB:.0f} MiB")
        print(f"(a) pull from the store, then load      {a:7.2f}s")
        print(f"(b) load from a warmed node cache       {b:7.2f}s   (a)/(b) = {a / b:5.1f} x")
        print(f"(c) load from a --hot warmed cache      {c:7.2f}s   (a)/(c) = {a / c:5.1f} x, (b)/(c) = {b / c:4.1f} x")
        print(f"    the --hot warm itself (before traffic) {hot:.2f}s")
        ok = a / b >= TARGET
        print(f"target (b) >= {TARGET:g} x faster than (a): {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        s3.stop()


if __name__ == "__main__":
    sys.exit(main())
