#!/usr/bin/env python3
"""Benchmark: warming a region of N agent nodes, each node from the store vs peer-assisted.

Not a test: it takes minutes, needs root for its links, and its numbers depend on the
machine. It starts SeaweedFS (``weed mini``) with a counting TCP proxy in front of it
(every byte the store sends to a node crosses the proxy), publishes a signed release of
``--shards`` safetensors shards totalling ``--size-mib``, starts 8 real ``weightship
agent serve`` processes, and for N = 1, 2, 4, 8 times, side by side and interleaved in
every repetition:

* ``weightship warm REF --region nN --no-peers``   every node fetches from the store
* ``weightship warm REF --region nN``              peer-assisted (the default)

Each run starts from empty caches. It prints the median wall time of the whole command
(interpreter start-up, resolving, planning, warming, every sha256 and the signature
checked on every node) and the median bytes the store served, against the targets:
with peers, store egress <= 1.1 x the release for every N, and wall time at N = 8 <=
1.5 x wall time at N = 1. It also prints the CPUs the run used: the region's own
processes (agents, store, proxy, CLI) and the whole machine.

The region is modelled as one: every node, and the store, sit behind a link of their own
(``--link-mbit``, each way). Each agent runs in a network namespace joined to this one by
a veth pair, and so does the store (its link is the region's link to the origin); ``tc
… tbf`` throttles both ends of every pair (bench/netlink.py, addresses in 10.201.0.0/16).
This namespace routes between them, forwarding only what arrives on those pairs, so
node-to-node bytes cross the sender's link up and the receiver's link down, as between
the hosts of a data centre. The counting proxy listens here, on the store link's address:
what the store serves crosses the store's link into the proxy, then the node's link. The
CLI runs here too. Namespaces and links go when the run ends, whatever ends it.

Why links: all the nodes share this machine's 2 CPUs, while on a real region each has
its own CPUs and NIC and the links are the limit. On loopback (``--link-mbit 0``, as
this benchmark ran before) nothing limits the bytes but the CPUs, so N = 8 measures 8
nodes hashing, writing and relaying the release on 2 cores, not the fan-out.

Why 200 Mbit/s by default: the rate must be low enough that 8 nodes at the limit of their
links still leave the CPUs room, or the CPUs set the wall time again; and no lower than
that, as every run takes release / rate at best. Measured at 1 GiB with peers (CPUs:
the region's processes, on average over the run), with another session's work also on
the machine:

    link        wall N=1   wall N=8   N=8/N=1   CPUs N=1   CPUs N=8
    800 Mbit/s    13.1 s     30.6 s     2.33       0.92       1.82
    400 Mbit/s    24.0 s     36.3 s     1.51       0.38       1.55
    300 Mbit/s    31.4 s     45.1 s     1.44       0.31       1.53
    200 Mbit/s    46.3 s     52.8 s     1.14       0.28       1.33
    100 Mbit/s    91.1 s    107.5 s     1.18       0.19       0.80

At 800 even one node is CPU-bound (13.1 s against 10.7 s for 1 GiB on the link); at 300
and above N = 8 keeps the CPUs near full. At 200 and at 100, which needs 40 % less CPU,
the ratio is about the same (1.14 and 1.18; 1.23 in a full run of 2 repetitions at 200):
the links set it. A repetition takes about 15 minutes at 200 Mbit/s, 6 of them for N = 8
without peers, which pulls 8 GiB through the store's link.

Unless ``--cache-root`` says otherwise, the nodes keep their caches in tmpfs (/dev/shm):
on a real region each node writes to its own NVMe, while here N nodes writing to one
virtual disk would measure that disk, not the fan-out.

    python bench/fanout.py                          # 1 GiB, 8 shards, N = 1, 2, 4, 8, 3 repetitions: 45 min
    python bench/fanout.py --reps 1                 # about 15 minutes
    python bench/fanout.py --link-mbit 0 --reps 1   # loopback: no namespaces, no throttling
    python bench/fanout.py --size-mib 256 --reps 1  # a quick look
    python bench/fanout.py --cache-root /var/tmp    # caches on disk
    python bench/fanout.py --link-mbit 0 --prev-rev 2a0fe5f   # and an earlier commit, side by side

``--prev-rev REV`` checks out an earlier commit (``git worktree``, removed at the end) and
runs it side by side: its own 8 agents and its own CLI, each warm of the current code
followed by the same warm of the earlier one (the order swapped every repetition), so
that both see the same machine. The report then adds, per N and mode, the earlier
implementation's wall time and store egress and its ratio to the current one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import build_model, git_worktree, machine  # noqa: E402
from netlink import Region, exit_on_signal  # noqa: E402

from tests.fleetkit import fleet_toml, node_toml, start_agents  # noqa: E402
from tests.servers import CountingProxy, start_seaweed  # noqa: E402

MIB = 1024 * 1024
EGRESS_TARGET = 1.1  # x the release, with peers, for every N
WALL_TARGET = 1.5  # wall(N=8) / wall(N=1), with peers
LINK_MBIT = 200  # see the module docstring


TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Impl:
    """One implementation under test: its agents, its fleet file's directory, its CLI's env."""

    label: str
    agents: list
    work: Path
    env: dict[str, str]


def check_imports(impl: Impl, tree: Path) -> None:
    """Each implementation must import its own code (an editable install elsewhere could
    win over this checkout): otherwise the comparison compares one code with itself."""
    probe = "import weightship, sys; sys.stdout.write(weightship.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=impl.env, cwd=impl.work, capture_output=True, text=True, check=True
    )
    if not Path(out.stdout).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{impl.label} imports weightship from {out.stdout}, not from {tree}")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU, steal included as busy: it is not ours either."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class CpuMeter:
    """CPUs used while a run lasts, on average: by the region's own processes (agents,
    store, this process with the counting proxy, the CLI), and by the whole machine (the
    kernel's network stack and tbf included, but so is anything else running here). Also
    the busiest half second of the agents, store and proxy together."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _region(self) -> float:
        t = os.times()
        return sum(_cpu_seconds(p) for p in self.pids) + t.user + t.system + t.children_user + t.children_system

    def _sample(self) -> None:
        last, then = self._region(), time.monotonic()
        while not self._stop.wait(0.5):
            now, at = self._region(), time.monotonic()
            self.peak = max(self.peak, (now - last) / (at - then))
            last, then = now, at

    def __enter__(self) -> CpuMeter:
        self._start = (self._region(), _machine(), time.monotonic())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        region, machine, started = self._start
        wall = time.monotonic() - started
        self.region = (self._region() - region) / wall
        busy, total = _machine()
        self.machine = (busy - machine[0]) / max(1, total - machine[1]) * (os.cpu_count() or 1)


def warm(work: Path, env: dict[str, str], region: str, peers: bool, pids: list[int]) -> dict:
    """One ``weightship warm`` of ``region``, run by whichever implementation ``env`` imports."""
    cmd = [sys.executable, "-m", "weightship", "warm", "bench:prod", "--region", region, "--json"]
    if not peers:
        cmd.append("--no-peers")
    with CpuMeter(pids) as cpu:
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"warm {region} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout)
    return {"wall": wall, "doc": doc, "cpu": cpu.region, "cpu_peak": cpu.peak, "machine": cpu.machine}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--nodes", default="1,2,4,8", help="comma-separated region sizes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--link-mbit",
        type=int,
        default=LINK_MBIT,
        help=f"each node's and the store's link, each way (default {LINK_MBIT}); 0: loopback, no links",
    )
    ap.add_argument(
        "--cache-root",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the node caches live (default /dev/shm)",
    )
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--prev-rev", default=None, help="also run this earlier commit, side by side")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.nodes.split(",")]
    rate = args.link_mbit
    if rate < 0:
        ap.error("--link-mbit must be 0 (no links) or a rate")
    if rate and os.geteuid() != 0:
        print("links need root (network namespaces and tc); --link-mbit 0 runs on loopback", file=sys.stderr)
        return 2
    # The links, the agents and the store must go whatever stops the run.
    signal.signal(signal.SIGTERM, exit_on_signal)

    work_root = Path(args.work or tempfile.mkdtemp(prefix="ws-fanout-"))
    cache_root = Path(tempfile.mkdtemp(prefix="ws-fanout-nodes-", dir=args.cache_root))
    names = [f"node-{i}" for i in range(max(sizes))]
    print(f"machine: {machine()}")
    print(f"release: {args.size_mib} MiB in {args.shards} shards; node caches in {cache_root}")
    if rate:
        floor = args.size_mib * MIB * 8 / (rate * 1e6)
        print(
            f"links: the store and every node behind {rate} Mbit/s each way (tbf), routed through this "
            f"namespace; one release crosses a link in {floor:.1f}s at best"
        )
    else:
        print("links: none (--link-mbit 0): every node and the store on loopback, sharing this machine's CPUs")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, cache_root, ignore_errors=True)
        if args.work is None:
            stack.callback(shutil.rmtree, work_root, ignore_errors=True)
        region = stack.enter_context(Region(["store", *names], "wsf", "10.201")) if rate else None
        if region:
            origin = region["store"]
            s3 = start_seaweed(work_root, ip=origin.ns_ip, netns=origin.ns)
            stack.callback(s3.stop)
            proxy = CountingProxy(origin.ns_ip, s3.port, listen=origin.host_ip)
            stack.callback(proxy.close)
            # The nodes' links from the start; the store's once the release is in.
            region.throttle(rate, names)
        else:
            s3 = start_seaweed(work_root)
            stack.callback(s3.stop)
            proxy = s3.proxy()
        bucket = s3.create_bucket("bench")
        store = f"s3://{bucket}/fanout"
        from weightship import release
        from weightship.store import open_store
        from weightship.trust import signers as signing

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
        if region:
            region.throttle(rate, ["store"])

        places = [(region[n].ns_ip, region[n].ns) for n in names] if region else None
        # The CLI, and so the presigned URLs every node fetches, go through the counting proxy.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
        env.update(s3.env(proxy.endpoint))
        impls: list[Impl] = []
        trees = [("current", None)]
        if args.prev_rev:
            trees.append((f"prev {args.prev_rev}", stack.enter_context(git_worktree(REPO, args.prev_rev, work_root))))
        for label, tree in trees:
            extra = {"PYTHONPATH": str(tree)} if tree else {}
            tag = "prev-" if tree else ""
            agents = start_agents(
                [cache_root / f"{tag}{n}" for n in names],
                node_toml(work_root / f"{tag}node.toml", pub),
                extra,
                places=places,
            )
            for a in agents:
                stack.callback(a.stop)
            work = work_root / f"{tag}work"
            work.mkdir()
            # A node's address in the fleet file is the one its peers reach it at: with links,
            # its namespace's, so that peer traffic crosses the links too.
            regions = {f"n{n}": [a.node(names[i]) for i, a in enumerate(agents[:n])] for n in sizes}
            (work / "weightship.toml").write_text(fleet_toml(regions, store, pub))
            impls.append(Impl(label, agents, work, {**env, **extra}))
        for impl, (_, tree) in zip(impls, trees, strict=True):
            check_imports(impl, tree or REPO)

        results: dict[tuple[str, int, bool], list[dict]] = {}
        for rep in range(args.reps):
            for n in sizes:
                for peers in (False, True):
                    # Back to back, the order swapped every repetition: drifting load on the
                    # machine falls on both implementations alike.
                    for impl in impls if rep % 2 == 0 else impls[::-1]:
                        for a in impl.agents[:n]:
                            shutil.rmtree(a.cache, ignore_errors=True)
                        proxy.reset()
                        pids = [a.proc.pid for a in impl.agents] + [s3.pid]
                        r = warm(impl.work, impl.env, f"n{n}", peers, pids)
                        ready = r["doc"]["ready"]
                        if ready != n:
                            raise SystemExit(f"{impl.label}: only {ready}/{n} nodes ready: {r['doc']}")
                        r["egress"] = proxy.down
                        results.setdefault((impl.label, n, peers), []).append(r)
                        mode = "peers" if peers else "no-peers"
                        print(
                            f"  rep {rep + 1} {impl.label:<14} N={n} {mode:<8} {r['wall']:6.2f}s  store sent "
                            f"{r['egress'] / MIB:8.1f} MiB ({r['egress'] / total:.2f} x)  "
                            f"CPUs {r['cpu']:.2f} (peak {r['cpu_peak']:.2f}, machine {r['machine']:.2f})",
                            flush=True,
                        )

        print()
        links = f"links {rate} Mbit/s each way" if rate else "no links (loopback)"
        print(f"medians of {args.reps} runs; release {total / MIB:.0f} MiB ({args.shards} shards); {links}")
        print(
            f"{'implementation':<14} {'N':>3}  {'mode':<9} {'wall s':>7}  {'store egress MiB':>16}  "
            f"{'x release':>9}  {'CPUs':>5}  {'peak':>5}  {'machine':>7}"
        )
        meds: dict[tuple[str, int, bool], tuple[float, float]] = {}
        for impl in impls:
            for n in sizes:
                for peers in (False, True):
                    rs = results[(impl.label, n, peers)]
                    wall = statistics.median(r["wall"] for r in rs)
                    egress = statistics.median(r["egress"] for r in rs)
                    cpu = statistics.median(r["cpu"] for r in rs)
                    peak = statistics.median(r["cpu_peak"] for r in rs)
                    busy = statistics.median(r["machine"] for r in rs)
                    meds[(impl.label, n, peers)] = (wall, egress)
                    mode = "peers" if peers else "no-peers"
                    print(
                        f"{impl.label:<14} {n:>3}  {mode:<9} {wall:7.2f}  {egress / MIB:16.1f}  "
                        f"{egress / total:9.2f}  {cpu:5.2f}  {peak:5.2f}  {busy:7.2f}"
                    )
        if len(impls) > 1:
            cur, prev = impls[0].label, impls[1].label
            print()
            print(f"current / {prev}, wall time (paired per repetition, median) and store egress:")
            for n in sizes:
                for peers in (False, True):
                    pairs = zip(results[(cur, n, peers)], results[(prev, n, peers)], strict=True)
                    paired = statistics.median(c["wall"] / p["wall"] for c, p in pairs)
                    egress = meds[(cur, n, peers)][1] / max(1, meds[(prev, n, peers)][1])
                    mode = "peers" if peers else "no-peers"
                    print(f"  N={n} {mode:<8} wall {paired:5.2f} x   egress {egress:5.2f} x")
        med = {(n, peers): meds[(impls[0].label, n, peers)] for n in sizes for peers in (False, True)}
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Everything it started is gone by now: the ExitStack unwound on the way out.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
