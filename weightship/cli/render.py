"""Everything the command line prints besides ``--json``: tables, listings and progress.

Progress goes to standard error, results to standard output. On a terminal, rich bars
and live rows; elsewhere (CI logs, pipes) plain lines that read well with grep. The
library reports through :class:`weightship.progress.Reporter` and
:class:`weightship.fleet.orchestrate.WarmDisplay`; the implementations are here.

Imported by commands only (rich is imported by the functions that draw), so that
``weightship --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from weightship.progress import Advance, Reporter, human_bytes, plural

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
    # On a terminal, its width. Piped (CI logs, files), COLUMNS when set, else 80: tables
    # are laid out to fit, and a log read in a narrow window stays a table.
    width = None
    if not stream.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) >= 40 else 80
    return Console(file=stream, width=width, highlight=False)


_STYLES = {
    "ready": "green",
    "reachable": "green",
    "ok": "green",
    "staged": "yellow",
    "failed": "red",
    "unreachable": "red",
}


def _styled(state: str) -> Any:
    """A node state as a table cell, coloured by what it means."""
    from rich.text import Text

    return Text(state, style=_STYLES.get(state) or "")


def _signer_text(signer: Mapping[str, Any] | None) -> str:
    if not signer:
        return ""
    if signer.get("method") == "key":
        # 12 hex digits (48 bits) tell keys apart and leave a status table room for the rest.
        return f"key {str(signer.get('fingerprint', '?'))[:12]}"
    if signer.get("method") == "certificate":
        return f"cert {signer.get('subject')}"
    return str(signer.get("identity") or signer.get("method"))


@dataclass
class _Col:
    """A table column. ``keep`` ranks what a narrow screen loses first (lowest first;
    ``None``: never dropped); ``no_wrap`` keeps a value whole (timestamps)."""

    name: str
    right: bool = False
    keep: int | None = None
    no_wrap: bool = False


def _print_lines(console: Any, renderable: Any) -> None:
    """Print without the padding rich leaves at the end of lines: piped output has no
    trailing spaces (they make diffs and grep patterns lie)."""
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()


def _print_table(console: Any, title: str, cols: Sequence[_Col], rows: Sequence[Sequence[Any]]) -> None:
    """A table that fits the console: columns are dropped, least useful first, until it
    does; what is left wraps inside its cells (never a timestamp) instead of being cut.
    Says which columns it dropped, so that nobody mistakes them for empty. Cells are
    text (a ``[`` in a certificate subject is not markup) or rich ``Text``."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = [[Text(c) if isinstance(c, str) else c for c in row] for row in rows]

    shown = list(range(len(cols)))
    # Measured as if the screen had no edge: rich caps a measurement at the width it is given.
    unbounded = console.options.update_width(100_000)
    while True:
        # Two spaces between columns (a cell's right padding and the rule's gap), none at the edges.
        table = Table(box=box.SIMPLE, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
        for i in shown:
            c = cols[i]
            table.add_column(c.name, justify="right" if c.right else "left", no_wrap=c.no_wrap, overflow="fold")
        for row in rows:
            table.add_row(*(row[i] for i in shown))
        droppable = [i for i in shown if cols[i].keep is not None]
        if not droppable or console.measure(table, options=unbounded).maximum <= console.width:
            break
        shown.remove(min(droppable, key=lambda i: cols[i].keep or 0))
    # The title on its own line: inside the table, rich would wrap it to the table's width.
    console.print(title, markup=False, soft_wrap=True)
    _print_lines(console, table)
    dropped = [c.name for i, c in enumerate(cols) if i not in shown]
    if dropped:
        console.print(
            f"({', '.join(dropped)}: left out to fit {console.width} columns; see --json)", markup=False, soft_wrap=True
        )


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
        from rich.progress import BarColumn, Progress, TimeRemainingColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            *_transfer_columns(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n: bar.advance(tid, n)


def _transfer_columns() -> list[Any]:
    """Bytes done of total, and the rate, in binary units (KiB, MiB, GiB) as every summary
    line prints them: rich's own columns count in decimal (kB, MB) by default."""
    from rich.progress import DownloadColumn, ProgressColumn
    from rich.text import Text

    class BinarySpeed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            text = "?" if speed is None else f"{human_bytes(speed)}/s"
            return Text(text, style="progress.data.speed")

    return [DownloadColumn(binary_units=True), BinarySpeed()]


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
        from rich.progress import BarColumn, Progress, TextColumn

        width = max((len(r.node.name) for r in rows), default=8)
        self.progress = Progress(
            TextColumn(f"{{task.fields[node]:<{width}}}"),
            TextColumn("{task.fields[state]}"),
            BarColumn(),
            *_transfer_columns(),
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
    """A line per file: digest prefix, size, path, and what a safetensors or GGUF file holds."""
    for f in manifest.files:
        extra = ""
        if f.safetensors:
            st = f.safetensors
            extra = f"  {plural(st.tensors, 'tensor')}, {st.parameters:,} params, {','.join(sorted(st.dtypes))}"
        elif f.gguf:
            g = f.gguf
            arch = f" ({g.architecture})" if g.architecture else ""
            # Most tensors first, with their counts: a quantised model's mix (Q4_K:193,F32:65,Q6_K:33)
            # is what tells two GGUF files of one model apart.
            types = ",".join(f"{t}:{n}" for t, n in sorted(g.types.items(), key=lambda tn: (-tn[1], tn[0])))
            extra = f"  GGUF v{g.version}{arch}, {plural(g.tensors, 'tensor')}, {g.parameters:,} params"
            extra += f", {types}" if types else ""
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
    # "signed    unsigned" reads as a contradiction: an unsigned release says no. A key or
    # certificate signer already names its kind ("key 0a1b…"), a Sigstore one does not.
    if m.signature == "unsigned":
        signed = "no"
    elif signer_text.startswith(m.signature):
        signed = signer_text
    else:
        signed = f"{m.signature}: {signer_text}"
    print(f"signed    {signed}")
    for k, v in sorted(m.source.items()):
        print(f"source    {k}: {v}")
    print(f"files     {len(m.files)}, {human_bytes(m.total_size)}")
    render_files(m, indent="  ")


# -- the fleet ---------------------------------------------------------------------------


def render_fleet(regions: list[Region]) -> None:
    """``fleet ls``: each region, and a line per node in aligned columns."""
    for r in regions:
        head = f"{r.name}" + (f"  (store {r.store})" if r.store else "")
        if r.kubernetes is not None:
            # Where the agents below were found; an inline token is a secret and not shown.
            k = r.kubernetes
            found = [f"namespace {k.namespace}", f"selector {k.selector}", f"port {k.port}"]
            given = {"token_file": k.token_file, "ca": k.ca, "context": k.context, "kubeconfig": k.kubeconfig}
            found += [f"{key} {v}" for key, v in given.items() if v]
            head += f"  (kubernetes: {', '.join(found)})"
        print(head)
        lines = []
        for n in r.nodes:
            extra = []
            if n.cache:
                extra.append(n.cache)
            if n.capacity:
                extra.append(f"capacity {human_bytes(n.capacity)}")
            if n.labels:
                extra.append(",".join(f"{k}={v}" if v else k for k, v in sorted(n.labels.items())))
            lines.append((n.name, n.transport, "  ".join(extra)))
        name_w = max((len(x[0]) for x in lines), default=0)
        transport_w = max((len(x[1]) for x in lines), default=0)
        for name, transport, extra in lines:
            print(f"  {name:<{name_w}}  {transport:<{transport_w}}  {extra}".rstrip())


def render_plan(report: PlanReport) -> None:
    plan = report.plan
    title = (
        f"plan for {report.name}:{report.version} in {report.region} "
        f"({plural(len(plan.nodes), 'node')}; nothing is fetched)"
    )
    cols = [_Col("node"), _Col("missing", right=True), _Col("from origin", right=True)]
    if plan.peers:
        cols += [_Col("from peers", keep=1), _Col("relays", right=True, keep=2)]
    rows = []
    for n in plan.nodes:
        if n.error:
            row = [n.node.name, "?", human_bytes(n.from_origin)]
        else:
            row = [n.node.name, human_bytes(n.missing or 0), human_bytes(n.from_origin)]
        if plan.peers:
            peers = ", ".join(f"{p} {human_bytes(b)}" for p, b in sorted(n.from_peers.items()))
            row += ["", ""] if n.error else [peers, human_bytes(n.serves) if n.serves else ""]
        rows.append(row)
    console = _console()
    _print_table(console, title, cols, rows)
    for n in plan.nodes:
        if n.error:
            console.print(f"{n.node.name}: unreachable: {n.error}", markup=False, soft_wrap=True)
    ratio = plan.origin_bytes / plan.release_bytes if plan.release_bytes else 0.0
    sends = f"the origin will send {human_bytes(plan.origin_bytes)} ({ratio:.2f} x the release)"
    if plan.peers:
        without = human_bytes(plan.origin_bytes_without_peers)
        how = f"{sends} with peers relaying; {without} if every node fetched from it"
    else:
        # No peers in play (--no-peers, or fewer than two agents): nothing to compare with.
        how = f"{sends}: every node fetches from it"
    console.print(how, markup=False, soft_wrap=True)


def _verified_text(verified: Any, signer: Mapping[str, Any] | None, answered: bool = True) -> str:
    if not answered:
        return ""
    return (_signer_text(signer) or "yes") if verified else "no"


def render_warm(report: WarmReport) -> None:
    rows = report.nodes
    title = (
        f"{report.name}:{report.version} in {report.region}: "
        f"{report.count}/{len(rows)} {report.counted} (required {report.required})"
    )
    cols = [
        _Col("node"),
        _Col("state"),
        _Col("version", keep=2),
        _Col("fetched", right=True, keep=4),
        _Col("reused", right=True, keep=1),
        _Col("verified", keep=5),
        _Col("time", right=True, keep=3),
    ]
    cells = []
    for r in rows:
        res = r.result or {}
        cells.append(
            [
                r.node.name,
                _styled(r.state),
                res.get("version") or "",
                human_bytes(r.bytes_fetched) if r.bytes_fetched is not None else "",
                human_bytes(res["bytes_reused"]) if res.get("bytes_reused") is not None else "",
                _verified_text(res.get("verified"), res.get("signer"), bool(res)),
                f"{r.seconds:.1f}s" if r.seconds is not None else "",
            ]
        )
    console = _console()
    _print_table(console, title, cols, cells)
    for r in rows:
        if r.error:
            console.print(f"{r.node.name}: {r.error}", markup=False, soft_wrap=True)
        for ev in (r.result or {}).get("evicted") or []:
            freed = human_bytes(ev.get("freed_bytes", 0))
            console.print(f"{r.node.name}: evicted {ev['name']}:{ev['version']} (freed {freed})", markup=False)
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


def _size_text(present: int | None, total: int | None) -> str:
    """``1.0 MiB`` when all of it is there, ``512.0 KiB / 1.0 MiB`` while it is not."""
    if total is None:
        return ""
    if (present or 0) == total:
        return human_bytes(total)
    return f"{human_bytes(present or 0)} / {human_bytes(total)}"


def render_status(report: StatusReport) -> None:
    with_ref = report.ref is not None
    rows = report.nodes
    title = f"{_status_title(report)}: {report.ready}/{len(rows)} {report.counted} (required {report.required})"
    if with_ref:
        tagged = any(r.get("tag") for r in rows)
        cols = [
            _Col("node"),
            _Col("state"),
            _Col("version", keep=3),
            # Where the tag points on the node: only when REF names a tag.
            *([_Col("tag ->", keep=6)] if tagged else []),
            _Col("bytes", right=True, keep=4),
            _Col("verified", keep=5),
            _Col("free", right=True, keep=1),
            _Col("last warm", keep=2, no_wrap=True),
        ]
    else:
        cols = [_Col("node"), _Col("state"), _Col("releases"), _Col("free", right=True, keep=1)]
    cells = []
    for r in rows:
        free = human_bytes(r["free_bytes"]) if r.get("free_bytes") is not None else ""
        if with_ref:
            answered = r["state"] != "unreachable"
            cells.append(
                [
                    r["node"],
                    _styled(r["state"]),
                    r.get("version") or "",
                    *([r.get("tag_version") or ("(not set)" if answered and r.get("tag") else "")] if tagged else []),
                    _size_text(r.get("bytes_present"), r.get("bytes_total")),
                    _verified_text(r.get("verified"), r.get("signer"), answered),
                    free,
                    r.get("last_warm") or "",
                ]
            )
        else:
            rels = ", ".join(
                f"{x['name']}:{x['version']} {x['state']}" + (f" ({','.join(x['tags'])})" if x.get("tags") else "")
                for x in r.get("releases") or []
            )
            cells.append([r["node"], _styled(r["state"]), rels, free])
    console = _console()
    _print_table(console, title, cols, cells)
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
        console.print(
            f"{r['node']}: {verb} {names}; {'would free' if dry_run else 'freed'} {freed}, {free} free",
            markup=False,
            soft_wrap=True,
        )


# -- the node side -----------------------------------------------------------------------


def render_node_event(ev: Mapping[str, Any]) -> None:
    """``node warm`` without --json: a line per engine event on standard error."""
    if ev.get("event") == "result":
        if ev["state"] != "ready":
            print(f"failed: {ev.get('error')}", file=sys.stderr)
        return
    line = f"{ev['state']}: {human_bytes(ev.get('bytes_done') or 0)} of {human_bytes(ev.get('bytes_total') or 0)}"
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
