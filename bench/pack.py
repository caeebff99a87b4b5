#!/usr/bin/env python3
"""Benchmark: hashing and signing a sharded model, weightship against the reference signer.

Not a test: it takes minutes and its numbers depend on the machine. It builds a model of
safetensors shards filled with random float16 data in a temporary directory, then times, side
by side and interleaved in every repetition:

* ``weightship pack DIR --json``            (hash + safetensors headers, no signature)
* ``weightship sign DIR --key KEY.pem``      (the number the target is about)
* ``python -m model_signing sign key DIR``   (the reference OMS signer, model-signing 1.1.1)
* ``sha256sum`` over the same files          (one process: what a shell script would do)
* ``openssl dgst -sha256``, a process a core (a floor: OpenSSL's SHA-NI code on every core, or
                                              the disk when the cache is cold; coreutils'
                                              sha256sum has no SHA-NI path and is no floor)

and the start-up time of ``weightship --help``. Each tool runs as a command-line process, so
interpreter start-up and imports count, as they do for a user.

The page cache is dropped before every timed run when this process may do so (root, writable
/proc/sys/vm/drop_caches); otherwise every run reads from a warm cache. Either way all tools get
the same condition, and the report says which.

    python bench/pack.py                          # 1 GiB, 8 shards, 3 repetitions
    python bench/pack.py --size-mib 64 --reps 1   # a quick look
    python bench/pack.py --prev-rev 2a0fe5f       # and an earlier commit's pack and sign, side by side

``--prev-rev REV`` checks out an earlier commit (``git worktree``, removed at the end) and
adds its ``pack`` and ``sign`` to every repetition, with the current ones run the same way
(``python -m weightship``, so start-up is alike), and reports current / earlier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, check_sizes, git_worktree, parser

REPO = Path(__file__).resolve().parents[1]

MIB = 1024 * 1024
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SIGN_RATIO_TARGET = 0.8
HELP_TARGET_S = 0.3


@dataclass
class Tool:
    key: str
    label: str
    argv: list[str]
    stdin: bytes | None = None
    env: dict[str, str] | None = None  # None: this process's environment
    # Where it runs: ``python -m`` imports from the working directory first, so the earlier
    # implementation runs in its own checkout.
    cwd: Path | None = None
    outputs: list[Path] = field(default_factory=list)  # removed before each run: no tool may find its old output
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


# -- the model -----------------------------------------------------------------------------


# -- running -------------------------------------------------------------------------------


def can_drop_caches() -> bool:
    try:
        drop_caches()
    except OSError:
        return False
    return True


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def run(
    argv: Sequence[str],
    stdin: bytes | None = None,
    capture: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[float, float, bytes]:
    """Wall and CPU seconds (user+sys of the child and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        input=stdin,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{err}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout or b""


def weightship_script() -> Path:
    """The console script next to this interpreter: a pyenv shim would add its own start-up."""
    script = Path(sys.executable).parent / "weightship"
    if not script.exists():
        raise SystemExit(f"{script} not found: install weightship into {sys.executable}'s environment")
    return script


def check_same_digests(ws: Path, model: Path, files: list[Path]) -> None:
    """Untimed: weightship and sha256sum must agree, or the comparison means nothing."""
    _, _, out = run([str(ws), "pack", str(model), "--json"], capture=True)
    ours = {f["path"]: f["sha256"] for f in json.loads(out)["files"]}
    _, _, out = run(["sha256sum", *map(str, files)], capture=True)
    theirs = {Path(line.split(maxsplit=1)[1]).name: line.split()[0] for line in out.decode().splitlines()}
    if ours != theirs:
        raise SystemExit(f"weightship and sha256sum disagree:\n{ours}\n{theirs}")


def check_imports(env: dict[str, str], tree: Path) -> None:
    """The earlier implementation must import its own code, not this checkout's."""
    probe = "import weightship, sys; sys.stdout.write(weightship.__file__)"
    _, _, out = run([sys.executable, "-c", probe], capture=True, env=env, cwd=tree)
    if not Path(out.decode()).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"PYTHONPATH={tree} imports weightship from {out.decode()}")


def time_help(argv: list[str], runs: int) -> list[float]:
    run(argv)  # bytecode compiled and files cached, as on any machine after the first call
    return [run(argv)[0] for _ in range(runs)]


# -- report --------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    tools: list[Tool],
    total_bytes: int,
    helps: dict[str, list[float]],
    condition: str,
    loads: tuple[float, float],
    args: argparse.Namespace,
) -> bool:
    by_key = {t.key: t for t in tools}
    ref = by_key["ws_sign"].median
    cpus = os.cpu_count() or 1
    print()
    print(f"model: {args.size_mib} MiB in {args.shards} safetensors shards (+ index, config), float16 random normal")
    print(f"machine: {cpus} CPUs, python {sys.version.split()[0]}; {args.reps} repetitions; {condition}")
    print(f"load average (1 min) at start {loads[0]:.1f}, at end {loads[1]:.1f}")
    if max(loads) > cpus / 2:
        # Other work on the machine steals cores from whichever tool is running: wall times then
        # say more about the neighbours than about the tools. CPU seconds and paired ratios less so.
        print("  warning: the machine was busy; trust the cpu s column and the paired ratio over wall medians")
    print()
    print(f"{'tool':<44} {'median s':>9} {'min s':>8} {'cpu s':>7} {'MiB/s':>7} {'x ws sign':>10}")
    for t in tools:
        print(
            f"{t.label:<44} {t.median:>9.3f} {min(t.wall):>8.3f} {statistics.median(t.cpu):>7.2f} "
            f"{total_bytes / MIB / t.median:>7.0f} {t.median / ref:>10.2f}"
        )
    print()
    print(f"{f'start-up ({args.help_runs} runs, warm)':<44} {'median s':>9} {'min s':>8}")
    for label, times in helps.items():
        print(f"{label:<44} {statistics.median(times):>9.3f} {min(times):>8.3f}")
    if "prev_sign" in by_key:
        print()
        print(f"current / previous ({args.prev_rev}), both as python -m weightship, paired per repetition:")
        for what in ("pack", "sign"):
            cur, prev = by_key[f"cur_{what}"], by_key[f"prev_{what}"]
            paired = statistics.median(c / p for c, p in zip(cur.wall, prev.wall, strict=True))
            cpu = statistics.median(cur.cpu) / statistics.median(prev.cpu)
            print(f"  {what:<5} wall {paired:5.2f} x   cpu s {cpu:5.2f} x   ({cur.median:.3f} s / {prev.median:.3f} s)")
    ms = by_key["ms_sign"]
    ratio = ref / ms.median
    # Same repetition, back to back: drifting background load cancels out better than across medians.
    paired = statistics.median(w / m for w, m in zip(by_key["ws_sign"].wall, ms.wall, strict=True))
    cpu_ratio = statistics.median(by_key["ws_sign"].cpu) / statistics.median(ms.cpu)
    print()
    print(f"weightship sign / model_signing: medians {ratio:.2f}, paired {paired:.2f}, cpu s {cpu_ratio:.2f}")
    print()
    print("targets")
    sign_ok = ratio <= SIGN_RATIO_TARGET
    print(f"  weightship sign <= {SIGN_RATIO_TARGET} x model_signing : {ratio:.2f} x          {verdict(sign_ok)}")
    help_ok = True
    for label, times in helps.items():
        if "shim" in label:
            continue  # pyenv's own start-up, not ours
        med = statistics.median(times)
        help_ok &= med < HELP_TARGET_S
        print(f"  {label + f' < {HELP_TARGET_S} s':<42}: {med:.3f} s        {verdict(med < HELP_TARGET_S)}")
    return sign_ok and help_ok


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--help-runs", type=int, default=10, help="timed runs of weightship --help (default 10)")
    ap.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto", help="auto: cold when permitted")
    ap.add_argument("--prev-rev", default=None, help="also run this earlier commit's pack and sign, side by side")
    args = ap.parse_args(argv)
    check_sizes(ap, args)

    ws = weightship_script()
    py = sys.executable
    load_start = os.getloadavg()[0]
    cold = args.cache == "cold" or (args.cache == "auto" and can_drop_caches())
    if cold and not can_drop_caches():
        ap.error(f"--cache cold: cannot write {DROP_CACHES} (needs root outside a read-only /proc)")
    condition = (
        "cold page cache (dropped before every timed run)"
        if cold
        else "warm page cache (every file in memory; disk speed not measured)"
    )

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weightship-bench-", dir=args.workdir)))
        model = work / "model"
        t0 = time.perf_counter()
        print(f"building {args.size_mib} MiB model in {model} ...", flush=True)
        files = build_model(model, args.size_mib, args.shards)
        total = sum(p.stat().st_size for p in files)
        print(f"  {len(files)} files, {total / MIB:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
        key = work / "keys" / "bench.pem"
        key.parent.mkdir()
        run([str(ws), "keygen", str(key)])
        check_same_digests(ws, model, files)

        ws_sig, ms_sig = work / "ws.sig", work / "ms.sig"
        nul_list = b"\0".join(str(p).encode() for p in files)
        cores = str(os.cpu_count() or 1)
        tools = [
            Tool("ws_pack", "weightship pack DIR --json", [str(ws), "pack", str(model), "--json"]),
            Tool(
                "ws_sign",
                "weightship sign DIR --key KEY.pem",
                [str(ws), "sign", str(model), "--key", str(key), "--signature", str(ws_sig)],
                outputs=[ws_sig],
            ),
            Tool(
                "ms_sign",
                "model_signing sign key DIR (1.1.1)",
                [
                    py,
                    "-m",
                    "model_signing",
                    "sign",
                    "key",
                    str(model),
                    "--private_key",
                    str(key),
                    "--signature",
                    str(ms_sig),
                ],
                outputs=[ms_sig],
            ),
            Tool("sha256sum", "sha256sum FILES", ["sha256sum", *map(str, files)]),
        ]
        if args.prev_rev:
            prev = stack.enter_context(git_worktree(REPO, args.prev_rev, work))
            prev_env = {**os.environ, "PYTHONPATH": str(prev)}
            check_imports(prev_env, prev)
            impls = (("current", None, "cur", None), (f"prev {args.prev_rev}", prev_env, "prev", prev))
            for label, env, tag, cwd in impls:
                m = [py, "-m", "weightship"]
                sig = work / f"{tag}.sig"
                pack = [*m, "pack", str(model), "--json"]
                tools.append(Tool(f"{tag}_pack", f"{label}: pack DIR --json", pack, env=env, cwd=cwd))
                sign = [*m, "sign", str(model), "--key", str(key), "--signature", str(sig)]
                tools.append(Tool(f"{tag}_sign", f"{label}: sign DIR", sign, env=env, cwd=cwd, outputs=[sig]))
        if shutil.which("openssl"):
            tools.append(
                Tool(
                    "openssl_par",
                    f"openssl dgst -sha256, {cores} processes",
                    ["xargs", "-0", "-n", "1", "-P", cores, "openssl", "dgst", "-sha256"],
                    stdin=nul_list,
                )
            )

        # One untimed run each: fails early with the tool's own message, compiles bytecode.
        for tool in tools:
            run(tool.argv, tool.stdin, env=tool.env, cwd=tool.cwd)

        for rep in range(args.reps):
            # Rotate the order so that no tool always runs right after the same neighbour.
            order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
            for tool in order:
                for out in tool.outputs:
                    out.unlink(missing_ok=True)
                if cold:
                    drop_caches()
                wall, cpu, _ = run(tool.argv, tool.stdin, env=tool.env, cwd=tool.cwd)
                tool.wall.append(wall)
                tool.cpu.append(cpu)
                print(f"  rep {rep + 1}/{args.reps}  {tool.label:<44} {wall:7.3f} s  cpu {cpu:6.2f} s", flush=True)

    # Start-up is measured warm: a cold import is the disk's time, and --help is typed twice.
    print(f"interpreter {py}; console script {ws}", flush=True)
    helps = {"python -m weightship --help": time_help([py, "-m", "weightship", "--help"], args.help_runs)}
    helps["weightship --help (console script)"] = time_help([str(ws), "--help"], args.help_runs)
    shim = shutil.which("weightship")
    if shim and Path(shim).resolve() != ws.resolve():
        print(f"PATH finds {shim}: timed too, for information (a shim's own start-up is not weightship's)")
        helps["weightship --help (PATH: shim)"] = time_help([shim, "--help"], args.help_runs)

    ok = report(tools, total, helps, condition, (load_start, os.getloadavg()[0]), args)
    if args.json:
        doc = {
            "size_mib": args.size_mib,
            "shards": args.shards,
            "reps": args.reps,
            "cold_cache": cold,
            "bytes": total,
            "tools": {t.key: {"label": t.label, "wall_s": t.wall, "cpu_s": t.cpu} for t in tools},
            "help_s": helps,
            "load_average": [load_start, os.getloadavg()[0]],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    raise SystemExit(main())
