"""The ``weightship`` command line: a thin Typer layer over the library.

This module is the application: the root options, the list of commands (in the order
``--help`` shows them), and how a run ends: errors are
:class:`~weightship.errors.WeightshipError` and are printed as one line; exit codes are
0 (success), 1 (failure), 2 (usage), 130 (interrupted). The commands live in one module
per group (artifact, release, fleet, node) and share :mod:`weightship.cli.options`.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from weightship.cli import artifact, fleet, node, release
from weightship.cli.options import JSON_HELP, QUIET_HELP, Globals, anywhere, json_defaults
from weightship.errors import WeightshipError
from weightship.version import __version__

# A command loads botocore and its service models, cryptography and more: hundreds of
# thousands of objects that live as long as the process, which the default thresholds
# (a collection every 700 allocations) made the cycle collector walk again and again.
# Measured: 0.03-0.05 s of a 0.5 s `pull`. Cycles are still collected, less often.
gc.set_threshold(50_000, 20, 20)


class _Root(typer.core.TyperGroup):
    """The ``weightship`` group: once Typer has built the tree, ``-q`` and ``--json`` are
    made to work after the command too (see :func:`weightship.cli.options.anywhere`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        anywhere(self)


app = typer.Typer(
    cls=_Root,
    name="weightship",
    help="Model weights as signed, versioned build artifacts: publish, warm onto GPU nodes, gate on status.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich help rendering alone costs more than the 0.3 s start-up budget.
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"weightship {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="weightship.toml to use (default: ./weightship.toml).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    json_: Annotated[bool, typer.Option("--json", help=f"{JSON_HELP} For the commands that have --json.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = Globals(config=config, quiet=quiet, json=json_)
    if json_:
        # Read by each command's own --json as its default (click's default_map).
        ctx.default_map = json_defaults(ctx.command)


# The commands, in the order --help lists them: a model directory, the store, then the fleet.
app.command()(artifact.pack)
app.command()(artifact.sign)
app.command()(artifact.verify)
app.command()(release.publish)
app.command("ls")(release.ls)
app.command()(release.show)
app.command()(release.tag)
app.command()(release.rm)
app.command()(release.untag)
app.command()(release.pull)
app.command()(release.prune)
app.command()(artifact.keygen)
app.command()(release.demo)
app.command()(fleet.warm)
app.command()(fleet.status)
app.command()(fleet.gc)
app.add_typer(fleet.fleet_app, name="fleet")
app.add_typer(node.node_app, name="node")
app.add_typer(node.agent_app, name="agent")


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    """The ``weightship`` command."""
    import contextlib
    import signal

    def interrupted(signum: int, frame: object) -> None:
        # Straight to the file descriptor: the main thread may have been stopped halfway
        # through a write to sys.stderr, which a second write would find locked.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        restore = "\x1b[?25h\n" if sys.stderr.isatty() else ""  # rich hides the cursor under its bars
        with contextlib.suppress(OSError):
            os.write(2, f"{restore}error: interrupted; re-run the same command to resume\n".encode())
        os._exit(130)

    # Ctrl-C stops the process at once. Left to Python, the KeyboardInterrupt reaches the
    # main thread only, Typer turns it into a silent exit 130, and the interpreter waits
    # for the worker threads still uploading or fetching (seconds). Nothing is lost by not
    # waiting: every write is resumable or atomic (S3 multipart parts, partial files
    # renamed into place). A SIGINT the shell ignored (a background job) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted)
    try:
        _run()
    except SystemExit as e:
        _leave(e)
    _leave(SystemExit(0))


def _leave(done: SystemExit) -> NoReturn:
    """Exit without tearing the interpreter down once nothing is left running.

    Finalizing a process that loaded botocore, cryptography and their kin frees hundreds
    of thousands of objects one by one: measured, 0.1-0.18 s after a pull or publish had
    finished, on every command. Once the exit handlers have run, the output is flushed
    and no other thread is alive, nothing of that teardown is needed; otherwise (another
    thread still working, an interpreter without the hook) the normal exit it is."""
    import atexit
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or threading.active_count() > 1 or not isinstance(done.code, int | None):
        raise done
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout:
                raise done from None  # a closed pipe: let the normal exit report it
    os._exit(done.code or 0)


def _run() -> None:
    try:
        app()
    except WeightshipError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; re-run the same command to resume", 130)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
    except Exception as e:  # a bug: still one line unless asked for the traceback
        if os.environ.get("WEIGHTSHIP_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e} (set WEIGHTSHIP_DEBUG=1 for a traceback and report it)")
