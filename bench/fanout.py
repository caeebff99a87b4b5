#!/usr/bin/env python3
"""Benchmark: warming a region of N agent nodes, each node from the store vs peer-assisted.

Not a test: it takes minutes and its numbers depend on the machine. It starts SeaweedFS
(``weed mini``) on loopback with a counting TCP proxy in front of it (every byte the
store sends to a node crosses the proxy), publishes a signed release of ``--shards``
safetensors shards totalling ``--size-mib``, starts 8 real ``weightship agent serve``
processes, and for N = 1, 2, 4, 8 times, side by side and interleaved in every
repetition:

* ``weightship warm REF --region nN --no-peers``   every node fetches from the store
* ``weightship warm REF --region nN``              peer-assisted (the default)

Each run starts from empty caches. It prints the median wall time of the whole command
(interpreter start-up, resolving, planning, warming, every sha256 and the signature
checked on every node) and the median bytes the store served, against the targets:
with peers, store egress <= 1.1 x the release for every N, and wall time at N = 8 <=
1.5 x wall time at N = 1.

All the nodes share this machine's CPUs and, unless ``--cache-root`` says otherwise, keep
their caches in tmpfs (/dev/shm): on a real region each node writes to its own NVMe,
while here N nodes writing to one virtual disk would measure that disk, not the fan-out.

    python bench/fanout.py                          # 1 GiB, 8 shards, N = 1, 2, 4, 8, 3 repetitions
    python bench/fanout.py --size-mib 256 --reps 1  # a quick look
    python bench/fanout.py --cache-root /var/tmp   # caches on disk
"""

from __future__ import annotations

import argparse
import json
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

from tests.fleetkit import fleet_toml, node_toml, start_agents  # noqa: E402
from tests.servers import start_seaweed  # noqa: E402

MIB = 1024 * 1024
EGRESS_TARGET = 1.1  # x the release, with peers, for every N
WALL_TARGET = 1.5  # wall(N=8) / wall(N=1), with peers


def warm(work: Path, env: dict[str, str], region: str, peers: bool) -> dict:
    cmd = [sys.executable, "-m", "weightship", "warm", "bench:prod", "--region", region, "--json"]
    if not peers:
        cmd.append("--no-peers")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"warm {region} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout)
    return {"wall": wall, "doc": doc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--nodes", default="1,2,4,8", help="comma-separated region sizes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--cache-root",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the node caches live (default /dev/shm)",
    )
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.nodes.split(",")]

    work_root = Path(args.work or tempfile.mkdtemp(prefix="ws-fanout-"))
    cache_root = Path(tempfile.mkdtemp(prefix="ws-fanout-nodes-", dir=args.cache_root))
    print(f"machine: {machine()}")
    print(f"release: {args.size_mib} MiB in {args.shards} shards; node caches in {cache_root}")
    s3 = start_seaweed(work_root)
    agents = []
    try:
        proxy = s3.proxy()
        bucket = s3.create_bucket("bench")
        store = f"s3://{bucket}/fanout"
        from weightship import release, signing
        from weightship.store import open_store

        key = work_root / "release.pem"
        pub = signing.generate_key(key)
        model = work_root / "model"
        build_model(model, args.size_mib, args.shards)
        direct = s3.env()
        os.environ.update(direct)
        st = open_store(store)
        published = release.publish(model, "bench:1.0", st, tags_=["prod"], signer=signing.KeySigner(key))
        st.close()
        total = published.total_bytes
        shutil.rmtree(model)

        agents = start_agents(
            [cache_root / f"node-{i}" for i in range(max(sizes))], node_toml(work_root / "node.toml", pub), {}
        )
        work = work_root / "work"
        work.mkdir()
        regions = {f"n{n}": [a.node(f"node-{i}") for i, a in enumerate(agents[:n])] for n in sizes}
        (work / "weightship.toml").write_text(fleet_toml(regions, store, pub))
        # The CLI, and so the presigned URLs every node fetches, go through the counting proxy.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
        env.update(s3.env(proxy.endpoint))

        results: dict[tuple[int, bool], list[dict]] = {}
        for rep in range(args.reps):
            for n in sizes:
                for peers in (False, True):
                    for a in agents[:n]:
                        shutil.rmtree(a.cache, ignore_errors=True)
                    proxy.reset()
                    r = warm(work, env, f"n{n}", peers)
                    ready = r["doc"]["ready"]
                    if ready != n:
                        raise SystemExit(f"only {ready}/{n} nodes ready: {r['doc']}")
                    r["egress"] = proxy.down
                    results.setdefault((n, peers), []).append(r)
                    mode = "peers" if peers else "no-peers"
                    print(
                        f"  rep {rep + 1} N={n} {mode:<8} {r['wall']:6.2f}s  store sent "
                        f"{r['egress'] / MIB:8.1f} MiB ({r['egress'] / total:.2f} x)",
                        flush=True,
                    )

        print()
        print(f"medians of {args.reps} runs; release {total / MIB:.0f} MiB ({args.shards} shards)")
        print(f"{'N':>3}  {'mode':<9} {'wall s':>7}  {'store egress MiB':>16}  {'x release':>9}")
        med: dict[tuple[int, bool], tuple[float, float]] = {}
        for n in sizes:
            for peers in (False, True):
                rs = results[(n, peers)]
                wall = statistics.median(r["wall"] for r in rs)
                egress = statistics.median(r["egress"] for r in rs)
                med[(n, peers)] = (wall, egress)
                mode = "peers" if peers else "no-peers"
                print(f"{n:>3}  {mode:<9} {wall:7.2f}  {egress / MIB:16.1f}  {egress / total:9.2f}")
        print()
        worst = max(med[(n, True)][1] / total for n in sizes)
        ok_egress = worst <= EGRESS_TARGET
        print(
            f"with peers, store egress <= {EGRESS_TARGET} x release for every N: "
            f"{'PASS' if ok_egress else 'FAIL'} (worst {worst:.3f} x)"
        )
        ok_wall = True
        if 1 in sizes and 8 in sizes:
            ratio = med[(8, True)][0] / med[(1, True)][0]
            ok_wall = ratio <= WALL_TARGET
            print(
                f"with peers, wall(N=8) <= {WALL_TARGET} x wall(N=1): {'PASS' if ok_wall else 'FAIL'} "
                f"({med[(8, True)][0]:.2f}s / {med[(1, True)][0]:.2f}s = {ratio:.2f} x; "
                f"without peers {med[(8, False)][0] / med[(1, False)][0]:.2f} x)"
            )
        return 0 if ok_egress and ok_wall else 1
    finally:
        for a in agents:
            a.stop()
        s3.stop()
        shutil.rmtree(cache_root, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
