#!/usr/bin/env python3
"""Benchmark: a release of many small files, warmed onto two agents against one pull.

Not a test: it takes minutes and its numbers depend on the machine. It starts SeaweedFS
(``weed mini``) on loopback with a counting TCP proxy in front of it, publishes a signed
release of ``--files`` random files of 2-4 KB each, starts two real ``weightship agent
serve`` processes, and times, side by side in every repetition:

* ``weightship pull REF DEST``                 one client, verifying every sha256
* ``weightship warm REF --region pair``        both agents, presigned URLs, peers on (the
                                               defaults): resolving, planning, presigning,
                                               both nodes fetching and verifying

Each is a command-line process (interpreter start-up counts), each repetition starts from
an empty DEST and empty node caches, and the proxy counts the TCP connections the store
accepted for each command: a node that opened one connection per blob shows here. It
prints the medians and the ratio warm / pull against the target (<= 1.5), and the CPU
seconds each command cost the machine (its own, the agents' and the store's): on a
machine that other work keeps busy the wall times stretch, the CPU seconds much less.

``--prev-rev REV`` runs an earlier commit side by side (checked out with ``git worktree
add`` into the workspace, removed at the end; its CLI and its agents run with PYTHONPATH
pointing at it), so that a change is measured against what it replaces in one run.

The node caches and DEST live in tmpfs (/dev/shm) unless ``--cache-root`` says
otherwise: a node fsyncs every blob it commits, and on a virtual disk 4,000 fsyncs would
measure the disk, not the transfer (pass ``--cache-root /var/tmp`` to see that cost).

    python bench/smallfiles.py                       # 2,000 files, 3 repetitions
    python bench/smallfiles.py --prev-rev HEAD       # and the committed code, side by side
    python bench/smallfiles.py --files 500 --reps 1  # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import git_worktree, loadavg, machine, run_measured  # noqa: E402

from tests.fleetkit import Agent, fleet_toml, node_toml, start_agents  # noqa: E402
from tests.servers import start_seaweed  # noqa: E402

TARGET = 1.5  # warm onto 2 agents / one pull
REF = "small:prod"


def build_release(root: Path, files: int, seed: int = 0) -> int:
    """``files`` files of 2-4 KB of random bytes, 100 to a directory; returns their bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        p = root / f"part-{i // 100:03d}" / f"file-{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(2048, 4096))
        p.write_bytes(data)
        total += len(data)
    return total


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (its own threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Run:
    wall: float  # the command's, start to end
    cpu: float  # the command's (with its children), the agents' and the store's, over the run
    conns: int  # TCP connections the store accepted


@dataclass
class Impl:
    """One implementation of weightship: how its CLI and agents run, and its region."""

    label: str
    env: dict[str, str]
    agents: list[Agent] = field(default_factory=list)
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"pull": [], "warm": []})

    def median(self, what: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs[what])


def check_imports(impl: Impl, where: Path, cwd: Path) -> None:
    """The implementation's interpreter, started in ``cwd``, imports weightship from
    ``where`` (PYTHONPATH must win over the editable install of the current one)."""
    import subprocess

    probe = "import weightship, sys; sys.stdout.write(weightship.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=impl.env, cwd=cwd, capture_output=True, text=True, check=True
    )
    if not Path(out.stdout).resolve().is_relative_to(where.resolve()):
        raise SystemExit(f"{impl.label}: weightship is imported from {out.stdout}, not from {where}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000, help="files in the release (default 2000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3); medians are printed")
    ap.add_argument("--prev-rev", default=None, help="also run this commit, side by side")
    ap.add_argument(
        "--cache-root",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where node caches and the pulled DEST live (default /dev/shm)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary workspace goes")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = ap.parse_args(argv)
    if args.files < 1 or args.reps < 1:
        ap.error("--files and --reps must be positive")

    base = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    print(f"machine: {machine()}")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ws-smallfiles-", dir=args.workdir)))
        caches = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ws-smallfiles-", dir=args.cache_root)))
        # PYTHONPATH names this checkout even where it is the editable install: the bench
        # may run from another checkout (one of the current code without other work in progress).
        impls = [Impl("current", {**base, "PYTHONPATH": str(REPO)})]
        check_imports(impls[0], REPO, work)
        if args.prev_rev:
            prev = stack.enter_context(git_worktree(REPO, args.prev_rev, work))
            impls.append(Impl(f"prev {args.prev_rev}", {**base, "PYTHONPATH": str(prev)}))
            check_imports(impls[1], prev, work)

        s3 = start_seaweed(work)
        stack.callback(s3.stop)
        proxy = s3.proxy()
        bucket = s3.create_bucket("bench")
        store = f"s3://{bucket}/small"
        from weightship import release
        from weightship.store import open_store
        from weightship.trust import signers

        key = work / "release.pem"
        pub = signers.generate_key(key)
        model = work / "model"
        total = build_release(model, args.files)
        os.environ.update(s3.env())
        st = open_store(store)
        release.publish(model, "small:1.0", st, tags_=["prod"], signer=signers.KeySigner(key))
        st.close()
        print(f"release: {args.files} files, {total / 1024:.0f} KiB; caches and DEST in {caches}")

        policy = node_toml(work / "node.toml", pub)
        regions = {}
        for i, impl in enumerate(impls):
            dirs = [caches / f"agent-{i}-{j}" for j in range(2)]
            impl.agents = start_agents(dirs, policy, {k: v for k, v in impl.env.items() if k == "PYTHONPATH"})
            for a in impl.agents:
                stack.callback(a.stop)
            regions[f"pair{i}"] = [a.node(f"{impl.label.split()[0]}-{j}") for j, a in enumerate(impl.agents)]
        cwd = work / "work"
        cwd.mkdir()
        (cwd / "weightship.toml").write_text(fleet_toml(regions, store, pub))
        # The CLI, and so the presigned URLs the nodes fetch, go through the counting proxy.
        for impl in impls:
            impl.env.update(s3.env(proxy.endpoint))

        print(f"load average {loadavg()}", flush=True)
        servers = [s3.pid]

        def measure(impl: Impl, what: str, argv: list[str]) -> Run:
            pids = servers + [a.proc.pid for a in impl.agents]
            proxy.reset()
            before = sum(cpu_seconds(p) for p in pids)
            m = run_measured(argv, impl.env, cwd)
            run = Run(m.wall, m.cpu + sum(cpu_seconds(p) for p in pids) - before, proxy.connections)
            if what == "warm":
                doc = json.loads(m.stdout)
                if doc["ready"] != 2:
                    raise SystemExit(f"{impl.label}: only {doc['ready']} of 2 nodes ready: {doc}")
            impl.runs[what].append(run)
            return run

        for rep in range(args.reps):
            for i, impl in enumerate(impls):
                dest = caches / "pulled"
                shutil.rmtree(dest, ignore_errors=True)
                pull = measure(impl, "pull", [sys.executable, "-m", "weightship", "pull", REF, str(dest)])
                shutil.rmtree(dest, ignore_errors=True)
                for a in impl.agents:
                    shutil.rmtree(a.cache, ignore_errors=True)
                cmd = [sys.executable, "-m", "weightship", "warm", REF, "--region", f"pair{i}", "--json"]
                warm = measure(impl, "warm", cmd)
                print(
                    f"  rep {rep + 1} {impl.label:<16} pull {pull.wall:6.2f}s cpu {pull.cpu:5.2f}s "
                    f"({pull.conns:4d} conns)   warm {warm.wall:6.2f}s cpu {warm.cpu:5.2f}s ({warm.conns:4d} conns)"
                    f"   ratio {warm.wall / pull.wall:.2f}",
                    flush=True,
                )
        print(f"load average {loadavg()}", flush=True)

    print()
    print(f"medians of {args.reps}; {args.files} files of 2-4 KB; warm onto 2 agents, presigned URLs, peers on")
    print("CPU: the command's, the agents' and the store's; conns: TCP connections the store accepted")
    print(
        f"{'implementation':<18} {'pull s':>7} {'CPU s':>6} {'conns':>6}   {'warm s':>7} {'CPU s':>6} {'conns':>6}"
        f"   {'warm/pull':>9} {'CPU':>5}"
    )
    ok = True
    for impl in impls:
        pull, warm = impl.median("pull", "wall"), impl.median("warm", "wall")
        pull_cpu, warm_cpu = impl.median("pull", "cpu"), impl.median("warm", "cpu")
        print(
            f"{impl.label:<18} {pull:7.2f} {pull_cpu:6.2f} {impl.median('pull', 'conns'):6.0f}   "
            f"{warm:7.2f} {warm_cpu:6.2f} {impl.median('warm', 'conns'):6.0f}   "
            f"{warm / pull:9.2f} {warm_cpu / pull_cpu:5.2f}"
        )
        if impl is impls[0]:
            ok = warm / pull <= TARGET
    print(f"warm / pull <= {TARGET}: {'PASS' if ok else 'FAIL'} (current)")
    if args.json:
        doc = {i.label: {k: [vars(r) for r in rs] for k, rs in i.runs.items()} for i in impls}
        args.json.write_text(json.dumps({"files": args.files, "bytes": total, "runs": doc}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
