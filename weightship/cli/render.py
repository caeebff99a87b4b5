"""Everything the command line prints besides ``--json``: tables, listings and progress.

Progress goes to standard error, results to standard output. On a terminal, rich bars
and live rows; elsewhere (CI logs, pipes) plain lines that read well with grep. The
library reports through :class:`weightship.progress.Reporter` and
:class:`weightship.fleet.orchestrate.WarmDisplay`; the implementations are here.

Imported by commands only (rich is imported by the functions that draw), so that
``weightship --help`` stays fast.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from weightship.progress import Advance, Reporter, human_bytes

if TYPE_CHECKING:
    from weightship.artifact.manifest import Manifest
    from weightship.fleet.inventory import Region
    from weightship.fleet.orchestrate import GcReport, Row, StatusReport, WarmReport
    from weightship.fleet.plan import PlanReport
    from weightship.release import Release

# A plain task shorter than this finishes before a line about it would help anyone reading a CI log.
PLAIN_MIN_BYTES = 64 * 1024 * 1024


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal, never wrap: CI logs are read with grep.
    return Console(file=stream, width=None if stream.isatty() else 240, highlight=False)


def _styled(state: str) -> str:
    style = {"ready": "green", "reachable": "green", "ok": "green", "failed": "red", "unreachable": "red"}.get(state)
    return f"[{style}]{state}[/]" if style else state


def _signer_text(signer: Mapping[str, Any] | None) -> str:
    if not signer:
        return ""
    if signer.get("method") == "key":
        return f"key {str(signer.get('fingerprint', '?'))[:16]}"
    if signer.get("method") == "certificate":
        return f"cert {signer.get('subject')}"
    return str(signer.get("identity") or signer.get("method"))


# -- progress ----------------------------------------------------------------------------


class _Lines:
    """Whole lines to a stream (standard error), never interleaved between threads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)


class PlainReporter(_Lines, Reporter):
    """One line per step and a line per 25% of a long task: readable in CI logs."""

    def info(self, message: str) -> None:
        self._print(message)

    def warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        if total < PLAIN_MIN_BYTES:
            yield _noop
            return
        done = 0
        marks = iter((25, 50, 75))
        mark = next(marks)
        start = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done, mark
            lines = []
            with self._lock:
                done += n
                while mark and done * 100 >= mark * total:
                    lines.append(f"{description}: {mark}%")
                    mark = next(marks, 0)
            for line in lines:
                self._print(line)

        yield advance
        secs = time.monotonic() - start
        self._print(f"{description}: done, {human_bytes(done)} in {secs:.1f}s")


def _noop(n: int) -> None:
    pass


class RichReporter(PlainReporter):
    """Progress bars on a terminal."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(stderr=True)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n: bar.advance(tid, n)


def make_reporter(*, quiet: bool = False, json_mode: bool = False) -> Reporter:
    """Silent with --quiet; bars on a terminal; else lines (with --json too: warnings
    still reach standard error, where they do not spoil the document)."""
    if quiet:
        return Reporter()
    if sys.stderr.isatty() and not json_mode:
        return RichReporter()
    return PlainReporter()


class PlainDisplay(_Lines):
    """A warm's progress as a line per node state change: readable in CI logs."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._last: dict[str, tuple[str, str | None]] = {}

    def start(self, rows: list[Row]) -> None:
        pass

    def update(self, row: Row) -> None:
        key = (row.state, row.message if row.state in ("pending", "failed", "unreachable") else None)
        if self._last.get(row.node.name) == key:
            return
        self._last[row.node.name] = key
        text = f"{row.node.name}: {row.state}"
        if row.state == "fetching" and row.bytes_total:
            text += f" ({human_bytes(row.bytes_done)} of {human_bytes(row.bytes_total)} present)"
        if row.state == "ready" and row.bytes_fetched is not None:
            text += f" (fetched {human_bytes(row.bytes_fetched)}, {row.seconds or 0:.1f}s)"
        note = row.error if row.state in ("failed", "unreachable") else row.message
        if note:
            text += f": {note}"
        self._print(text)

    def stop(self) -> None:
        pass


class RichDisplay:
    """A warm's progress as one live row per node on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def start(self, rows: list[Row]) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        width = max((len(r.node.name) for r in rows), default=8)
        self.progress = Progress(
            TextColumn(f"{{task.fields[node]:<{width}}}"),
            TextColumn("{task.fields[state]}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[note]}", style="dim"),
            console=self.console,
        )
        self.progress.start()
        for r in rows:
            self.tasks[r.node.name] = self.progress.add_task("", total=None, node=r.node.name, state=r.state, note="")

    def update(self, row: Row) -> None:
        if self.progress is None:
            return
        if row.state in ("failed", "unreachable"):
            note = row.error
        elif row.state == "ready":
            note = f"fetched {human_bytes(row.bytes_fetched or 0)}"
        else:
            note = row.message or row.file or ""
        style = {"ready": "green", "failed": "red", "unreachable": "red"}.get(row.state)
        # Padded before styling, so that markup does not count towards the width.
        state = f"{row.state:<11}"
        state = f"[{style}]{state}[/]" if style else state
        self.progress.update(
            self.tasks[row.node.name],
            total=row.bytes_total or None,
            completed=row.bytes_done,
            state=state,
            note=(note or "")[:80],
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def make_display(quiet: bool, json_mode: bool) -> PlainDisplay | RichDisplay | None:
    """The live display of a warm; None (nothing shown) with --quiet or --json."""
    if quiet or json_mode:
        return None
    if sys.stderr.isatty():
        return RichDisplay()
    return PlainDisplay()


# -- releases ----------------------------------------------------------------------------


def render_files(manifest: Manifest, indent: str = "") -> None:
    """A line per file: digest prefix, size, path, and what a safetensors file holds."""
    for f in manifest.files:
        extra = ""
        if f.safetensors:
            st = f.safetensors
            extra = f"  {st.tensors} tensors, {st.parameters:,} params, {','.join(sorted(st.dtypes))}"
        print(f"{indent}{f.sha256[:16]}  {human_bytes(f.size):>10}  {f.path}{extra}")


def render_models(doc: Mapping[str, Mapping[str, Any]]) -> None:
    """``ls``: a line per version of each model, with the tags that point at it."""
    for m, d in doc.items():
        by_version: dict[str, list[str]] = {}
        for t, v in d["tags"].items():
            by_version.setdefault(v, []).append(t)
        for v in d["versions"]:
            t = by_version.get(v)
            print(f"{m}:{v}" + (f"  <- {', '.join(sorted(t))}" if t else ""))


def render_release(rel: Release, signer_text: str) -> None:
    """``show``: a release's digest, signer, source and files."""
    m = rel.manifest
    print(f"release   {rel.name}:{rel.version}")
    print(f"digest    {rel.digest}")
    print(f"created   {m.created}")
    print(f"signed    {m.signature}: {signer_text}")
    for k, v in sorted(m.source.items()):
        print(f"source    {k}: {v}")
    print(f"files     {len(m.files)}, {human_bytes(m.total_size)}")
    render_files(m, indent="  ")


# -- the fleet ---------------------------------------------------------------------------


def render_fleet(regions: list[Region]) -> None:
    """``fleet ls``: each region, and a line per node."""
    for r in regions:
        print(f"{r.name}" + (f"  (store {r.store})" if r.store else ""))
        for n in r.nodes:
            extra = []
            if n.cache:
                extra.append(n.cache)
            if n.capacity:
                extra.append(f"capacity {human_bytes(n.capacity)}")
            if n.labels:
                extra.append(",".join(f"{k}={v}" if v else k for k, v in sorted(n.labels.items())))
            print(f"  {n.name:<16} {n.transport:<32} {'  '.join(extra)}")


def render_plan(report: PlanReport) -> None:
    from rich import box
    from rich.table import Table

    plan = report.plan
    title = f"plan for {report.name}:{report.version} in {report.region} ({len(plan.nodes)} nodes; nothing is fetched)"
    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for col in ("node", "missing", "from origin", "from peers", "relays"):
        table.add_column(col, justify="left" if col in ("node", "from peers") else "right")
    for n in plan.nodes:
        if n.error:
            table.add_row(n.node.name, "?", human_bytes(n.from_origin), "", "", style="red")
            continue
        peers = ", ".join(f"{p} {human_bytes(b)}" for p, b in sorted(n.from_peers.items()))
        table.add_row(
            n.node.name,
            human_bytes(n.missing or 0),
            human_bytes(n.from_origin),
            peers,
            human_bytes(n.serves) if n.serves else "",
        )
    console = _console()
    console.print(table)
    for n in plan.nodes:
        if n.error:
            console.print(f"{n.node.name}: unreachable: {n.error}", markup=False, soft_wrap=True)
    ratio = plan.origin_bytes / plan.release_bytes if plan.release_bytes else 0.0
    without = human_bytes(plan.origin_bytes_without_peers)
    how = "with peers" if plan.peers else "without peers (--no-peers)"
    console.print(
        f"the origin will send {human_bytes(plan.origin_bytes)} ({ratio:.2f} x the release) {how}; "
        f"{without} if every node fetched from it",
        markup=False,
        soft_wrap=True,
    )


def render_warm(report: WarmReport) -> None:
    from rich import box
    from rich.table import Table

    rows = report.nodes
    title = (
        f"{report.name}:{report.version} in {report.region}: "
        f"{report.count}/{len(rows)} {report.counted} (required {report.required})"
    )
    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for col in ("node", "state", "version", "fetched", "reused", "verified", "time"):
        table.add_column(col, justify="right" if col in ("fetched", "reused", "time") else "left")
    for r in rows:
        res = r.result or {}
        verified = "yes " + _signer_text(res.get("signer")) if res.get("verified") else ("no" if res else "")
        table.add_row(
            r.node.name,
            _styled(r.state),
            res.get("version") or "",
            human_bytes(r.bytes_fetched) if r.bytes_fetched is not None else "",
            human_bytes(res["bytes_reused"]) if res.get("bytes_reused") is not None else "",
            verified.strip(),
            f"{r.seconds:.1f}s" if r.seconds is not None else "",
        )
    console = _console()
    console.print(table)
    for r in rows:
        if r.error:
            console.print(f"{r.node.name}: {r.error}", markup=False, soft_wrap=True)
        for ev in (r.result or {}).get("evicted") or []:
            freed = human_bytes(ev.get("freed_bytes", 0))
            console.print(f"{r.node.name}: evicted {ev['name']}:{ev['version']} (freed {freed})")
        for bad in (r.result or {}).get("bad_peers") or []:
            console.print(
                f"{r.node.name}: peer {bad.get('peer')} {bad.get('error')} ({bad.get('file')}); "
                "fetched from another source",
                markup=False,
                soft_wrap=True,
            )
        if (r.result or {}).get("hot_note"):
            console.print(f"{r.node.name}: {r.result['hot_note']}", markup=False, soft_wrap=True)
    results = [r.result for r in rows if r.result]
    if any(res.get("bytes_from_peers") for res in results):
        origin = sum(res.get("bytes_from_origin") or 0 for res in results)
        peers = sum(sum((res.get("bytes_from_peers") or {}).values()) for res in results)
        console.print(f"from the origin {human_bytes(origin)}, from peers {human_bytes(peers)}")


def _status_title(report: StatusReport) -> str:
    return report.ref if report.ref is not None else "fleet"


def render_waiting(report: StatusReport, interval: float) -> None:
    """``status --watch``, between two rounds: how far from the requirement it is."""
    print(
        f"{_status_title(report)}: {report.ready}/{len(report.nodes)} ready (need {report.required}); "
        f"checking again in {interval:g}s",
        file=sys.stderr,
    )


def render_status(report: StatusReport) -> None:
    from rich import box
    from rich.table import Table

    with_ref = report.ref is not None
    rows = report.nodes
    title = f"{_status_title(report)}: {report.ready}/{len(rows)} {report.counted} (required {report.required})"
    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    if with_ref:
        cols = ("node", "state", "version", "tag ->", "bytes", "verified", "free", "last warm")
    else:
        cols = ("node", "state", "releases", "free")
    for col in cols:
        table.add_column(col)
    for r in rows:
        free = human_bytes(r["free_bytes"]) if r.get("free_bytes") is not None else ""
        if with_ref:
            total = r.get("bytes_total")
            present = r.get("bytes_present")
            size = f"{human_bytes(present or 0)} / {human_bytes(total)}" if total is not None else ""
            verified = ("yes " + _signer_text(r.get("signer"))).strip() if r.get("verified") else "no"
            table.add_row(
                r["node"],
                _styled(r["state"]),
                r.get("version") or "",
                r.get("tag_version") or "" if r.get("tag") else "",
                size,
                verified if r["state"] not in ("unreachable",) else "",
                free,
                r.get("last_warm") or "",
            )
        else:
            rels = ", ".join(
                f"{x['name']}:{x['version']} {x['state']}" + (f" ({','.join(x['tags'])})" if x.get("tags") else "")
                for x in r.get("releases") or []
            )
            table.add_row(r["node"], _styled(r["state"]), rels, free)
    console = _console()
    console.print(table)
    for r in rows:
        if r.get("error"):
            console.print(f"{r['node']}: {r['error']}", markup=False, soft_wrap=True)


def render_gc(report: GcReport) -> None:
    console = _console()
    dry_run = report.dry_run
    verb = "would evict" if dry_run else "evicted"
    for r in report.nodes:
        if r.get("error"):
            console.print(f"{r['node']}: {r['state']}: {r['error']}", markup=False, soft_wrap=True)
            continue
        names = ", ".join(f"{e['name']}:{e['version']}" for e in r.get("evicted") or []) or "nothing"
        freed = human_bytes(r.get("freed_bytes") or 0)
        free = human_bytes(r.get("free_bytes") or 0)
        console.print(f"{r['node']}: {verb} {names}; {'would free' if dry_run else 'freed'} {freed}, {free} free")


# -- the node side -----------------------------------------------------------------------


def render_node_event(ev: Mapping[str, Any]) -> None:
    """``node warm`` without --json: a line per engine event on standard error."""
    if ev.get("event") == "result":
        if ev["state"] != "ready":
            print(f"failed: {ev.get('error')}", file=sys.stderr)
        return
    line = f"{ev['state']}: {ev.get('bytes_done', 0)}/{ev.get('bytes_total', 0)} bytes"
    if ev.get("message"):
        line += f" - {ev['message']}"
    print(line, file=sys.stderr)


def render_node_status(doc: Mapping[str, Any], ref: str | None) -> None:
    """``node status``: one release's readiness, or every release in the cache."""
    free = human_bytes(doc["free_bytes"]) if doc.get("free_bytes") is not None else "?"
    if ref is None:
        for r in doc["releases"]:
            tags = f" ({', '.join(r['tags'])})" if r["tags"] else ""
            print(f"{r['name']}:{r['version']}{tags}  {r['state']}  {human_bytes(r['bytes_present'])}")
        print(f"{free} free in {doc['cache']}")
        return
    print(f"{ref}: {doc['state']} (version {doc['version']}, {human_bytes(doc['bytes_present'])} present, {free} free)")
    if doc.get("error"):
        print(doc["error"])
