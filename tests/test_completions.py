"""Shell completions: the committed scripts match the CLI, parse, and complete what they should.

The scripts are static, so the CLI and completions/ can drift apart; the freshness test is the
guard. The behaviour tests run each shell's own completion machinery on a small synthetic CLI
with nested groups, choices and path parameters, so they do not depend on which commands
weightship has today.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer

from tests.helpers import require
from weightship.cli import completions

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "completions"
STALE = "completions are stale: run python -m weightship.cli.completions completions/"

SYNTAX_CHECK = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}


def _committed(shell: str) -> Path:
    return COMMITTED / completions.FILENAMES[shell]


def _check_syntax(shell: str, script: Path) -> None:
    argv = SYNTAX_CHECK[shell]
    # bash is required; zsh and fish are skipped where a developer lacks them, never in CI.
    if shell != "bash":
        require(shutil.which(argv[0]) is not None, argv[0], f"apt-get install {argv[0]}")
    proc = subprocess.run([*argv, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shell} rejects {script.name}:\n{proc.stderr}"


# -- the committed scripts ---------------------------------------------------------------


@pytest.mark.parametrize("shell", completions.SHELLS)
def test_committed_scripts_are_fresh(shell: str) -> None:
    path = _committed(shell)
    assert path.is_file(), STALE
    # Bytes, not text: a CRLF checkout or a stray trailing newline is staleness too.
    assert path.read_bytes() == completions.render(shell).encode("utf-8"), STALE


@pytest.mark.parametrize("shell", completions.SHELLS)
def test_committed_scripts_parse(shell: str) -> None:
    _check_syntax(shell, _committed(shell))


@pytest.mark.parametrize("shell", completions.SHELLS)
def test_every_top_level_command_is_in_every_script(shell: str) -> None:
    text = _committed(shell).read_text(encoding="utf-8")
    names = [c.name for c in completions.command_tree().subcommands]
    assert {"pack", "sign", "verify", "publish", "pull"} <= set(names)
    missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
    assert not missing, f"{completions.FILENAMES[shell]} lacks {missing}; {STALE}"


def test_render_is_deterministic_and_portable() -> None:
    for shell in completions.SHELLS:
        first = completions.render(shell)
        assert first == completions.render(shell)
        assert str(ROOT) not in first and str(Path.home()) not in first
        assert "\r" not in first and first.endswith("\n")


@pytest.mark.parametrize("seed", ["1", "2"])
def test_module_entry_point_writes_the_three_files(tmp_path: Path, seed: str) -> None:
    # Different hash seeds: set iteration order must not leak into the output.
    env = {**os.environ, "PYTHONHASHSEED": seed}
    argv = [sys.executable, "-m", "weightship.cli.completions", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(completions.FILENAMES.values())
    for shell in completions.SHELLS:
        assert (tmp_path / completions.FILENAMES[shell]).read_bytes() == completions.render(shell).encode("utf-8")


def test_unknown_shell_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown shell"):
        completions.render("tcsh")


# -- behaviour on a synthetic CLI with nested groups ---------------------------------------


class Mode(str, enum.Enum):
    fast = "fast"
    safe = "safe"


def _synthetic_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    node = typer.Typer(help="Manage nodes.")
    agent = typer.Typer(help="The node agent.")
    app.add_typer(node, name="node")
    node.add_typer(agent, name="agent")

    @app.callback()
    def _root(config: Annotated[Path | None, typer.Option("--config", help="Config file.")] = None) -> None:
        """Root."""

    @app.command()
    def warm(
        ref: str,
        mode: Annotated[Mode, typer.Option("--mode", "-m", help="How to warm.")] = Mode.safe,
        cache: Annotated[Path, typer.Option("--cache", file_okay=False, help="Cache [dir]: 'local'.")] = Path("."),
        key: Annotated[list[Path] | None, typer.Option("--key", help="Key; repeatable.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run/--no-dry-run")] = False,
    ) -> None:
        """Warm a node."""

    @node.command("add")
    def node_add(
        host: str,
        role: Annotated[Literal["gpu", "cpu"], typer.Argument()] = "gpu",
        files: Annotated[list[Path] | None, typer.Argument()] = None,
    ) -> None:
        """Add a node."""

    @agent.command("run")
    def agent_run(level: Annotated[Mode, typer.Argument()] = Mode.fast, port: int = 1) -> None:
        """Run the agent."""

    @app.command(hidden=True)
    def secret() -> None:
        """Not for completion."""

    return app


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("completions")
    completions.write_all(out, _synthetic_app())
    (out / "work" / "models").mkdir(parents=True)
    (out / "work" / "key.pem").write_text("k")
    return out


def test_tree_reads_nested_groups_choices_and_paths() -> None:
    tree = completions.command_tree(_synthetic_app())
    by_key = {c.key: c for c in tree.walk()}
    assert sorted(by_key) == [
        "weightship",
        "weightship node",
        "weightship node add",
        "weightship node agent",
        "weightship node agent run",
        "weightship warm",
    ]
    warm = {o.long: o for o in by_key["weightship warm"].options}
    assert warm["--mode"].names == ("-m", "--mode") and warm["--mode"].choices == ("fast", "safe")
    assert warm["--cache"].kind == completions.DIR
    assert warm["--key"].kind == completions.FILE and warm["--key"].multiple
    assert warm["--dry-run"].nargs == 0 and "--no-dry-run" in warm["--dry-run"].excludes
    assert "--help" in warm and "-h" in warm["--help"].names
    add = by_key["weightship node add"].args
    expected = [("host", "plain", 1), ("role", "choice", 1), ("files", "file", -1)]
    assert [(a.name, a.kind, a.nargs) for a in add] == expected
    assert add[1].choices == ("gpu", "cpu")


@pytest.mark.parametrize("shell", completions.SHELLS)
def test_synthetic_scripts_parse(shell: str, synthetic: Path) -> None:
    _check_syntax(shell, synthetic / completions.FILENAMES[shell])


BASH_DRIVER = r"""
source "$1"
line=$2
# Split as readline does: COMP_WORDBREAKS makes '=' a word of its own.
line=${line//=/ = }
read -ra COMP_WORDS <<<"$line"
[[ $2 == *" " || -z $2 ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_weightship
printf '%s\n' "${COMPREPLY[@]}"
"""

CASES = [
    # (command line up to the cursor, what must be offered, what must not)
    ("weightship ", {"node", "warm"}, {"secret"}),
    ("weightship --config x.toml ", {"node", "warm"}, set()),
    ("weightship node ", {"add", "agent"}, {"warm"}),
    ("weightship node agent run ", {"fast", "safe"}, set()),
    ("weightship node agent run --port 8 f", {"fast"}, {"safe"}),
    ("weightship warm --mode ", {"fast", "safe"}, set()),
    ("weightship warm -m s", {"safe"}, {"fast"}),
    ("weightship warm --m", {"--mode"}, {"--key"}),
    ("weightship warm --key key.pem --k", {"--key"}, set()),
    ("weightship warm --cache m", {"models"}, {"key.pem"}),
    ("weightship warm --key k", {"key.pem"}, set()),
    ("weightship node add host ", {"gpu", "cpu"}, {"key.pem"}),
    ("weightship node add host gpu k", {"key.pem"}, set()),
    ("weightship node add host gpu key.pem m", {"models"}, set()),
]


def _bash_complete(script: Path, line: str, cwd: Path) -> set[str]:
    proc = subprocess.run(
        ["bash", "-c", BASH_DRIVER, "driver", str(script), line], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return {w.rstrip("/") for w in proc.stdout.split()}


def _fish_complete(script: Path, line: str, cwd: Path) -> set[str]:
    cmd = f"source {script}; complete -C {_fish_quote(line)}"
    proc = subprocess.run(["fish", "--no-config", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {ln.split("\t")[0].rstrip("/") for ln in proc.stdout.splitlines() if ln}


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.mark.parametrize(("line", "offered", "not_offered"), CASES)
def test_bash_completes(synthetic: Path, line: str, offered: set[str], not_offered: set[str]) -> None:
    got = _bash_complete(synthetic / completions.FILENAMES["bash"], line, synthetic / "work")
    assert offered <= got and not (not_offered & got), got


@pytest.mark.parametrize(("line", "offered", "not_offered"), CASES)
def test_fish_completes(synthetic: Path, line: str, offered: set[str], not_offered: set[str]) -> None:
    require(shutil.which("fish") is not None, "fish", "apt-get install fish")
    got = _fish_complete(synthetic / completions.FILENAMES["fish"], line, synthetic / "work")
    assert offered <= got and not (not_offered & got), got


def test_bash_completes_the_real_cli(tmp_path: Path) -> None:
    script = _committed("bash")
    assert {"sign", "show"} <= _bash_complete(script, "weightship s", tmp_path)
    assert {"--key", "--key-password"} <= _bash_complete(script, "weightship --quiet sign --k", tmp_path)
    assert {"--offline", "--online"} <= _bash_complete(script, "weightship pull --o", tmp_path)


def test_plain_click_commands_are_read_too() -> None:
    # Typer up to 0.2x hands back real click objects; the walker must not depend on which.
    click = pytest.importorskip("click")

    @click.group()
    def root() -> None:
        pass

    @root.command()
    @click.option("--level", type=click.Choice(["low", "high"]))
    @click.option("--out", type=click.Path(file_okay=False))
    @click.argument("src", type=click.File())
    def go(level: str, out: str, src: object) -> None:
        pass

    tree = completions.command_tree(root)
    go_cmd = tree.subcommands[0]
    opts = {o.long: o for o in go_cmd.options}
    assert opts["--level"].choices == ("low", "high")
    assert opts["--out"].kind == completions.DIR
    assert go_cmd.args[0].kind == completions.FILE
    assert "low high" in completions.RENDERERS["bash"](tree)
