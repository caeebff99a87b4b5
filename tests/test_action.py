"""The GitHub Action and the example workflows: actionlint, and the composite action's shell
steps run locally, as a runner would run them, against a ``file://`` store."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # huggingface-hub depends on PyYAML, so weightship's own dependencies bring it

from tests.helpers import REPO, run_cli

ACTION = REPO / "action.yml"
WORKFLOWS = REPO / ".github" / "workflows"
EXAMPLES = [WORKFLOWS / "publish-example.yml", WORKFLOWS / "deploy-gate-example.yml"]
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def load(path: Path) -> dict:
    # YAML 1.1 reads the key `on:` as True; workflows are only ever read for their strings here.
    return yaml.safe_load(path.read_text())


def find_actionlint() -> str:
    """The actionlint binary the test extras install, beside this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    found = str(beside) if beside.exists() else shutil.which("actionlint")
    if not found:
        pytest.fail("actionlint is not installed: install the test extras (python3 -m pip install -e '.[test]')")
    return found


def test_actionlint_passes_on_the_workflows():
    proc = subprocess.run(
        # From the repository root, so that `uses: ./` is checked against action.yml's inputs.
        [find_actionlint(), "-oneline", *(str(p.relative_to(REPO)) for p in EXAMPLES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_examples_publish_keyless_and_gate_on_status():
    publish = load(EXAMPLES[0])
    assert publish[True] == {"workflow_dispatch": publish[True]["workflow_dispatch"]}
    assert publish["permissions"] == {"id-token": "write", "contents": "read"}
    steps = publish["jobs"]["publish"]["steps"]
    action_step = next(s for s in steps if s.get("uses") == "./")
    assert action_step["with"]["signing"] == "sigstore"

    gate = load(EXAMPLES[1])
    jobs = gate["jobs"]
    runs = {name: " ".join(s.get("run", "") for s in job["steps"]) for name, job in jobs.items()}
    assert 'weightship warm "$RELEASE" --region "$REGION" --wait' in runs["warm"]
    assert 'weightship status "$RELEASE" --region "$REGION" --require all' in runs["gate"]
    assert jobs["gate"]["needs"] == "warm" and jobs["deploy"]["needs"] == "gate"


# -- the composite action, run locally -------------------------------------------------------


class ActionRun:
    """Runs action.yml's ``run:`` steps the way a runner does: ``${{ }}`` expressions
    substituted, ``bash --noprofile --norc -eo pipefail``, a GITHUB_OUTPUT file per step.

    ``uses:`` steps (actions/setup-python) are not run: the interpreter running the tests
    stands in for the Python they set up. ``pip`` is recorded, not run, so nothing is
    installed over the development install; everything else runs for real.
    """

    def __init__(self, tmp: Path, inputs: dict[str, str]) -> None:
        self.tmp = tmp
        self.action = load(ACTION)
        declared = self.action["inputs"]
        unknown = set(inputs) - set(declared)
        assert not unknown, f"not inputs of action.yml: {unknown}"
        self.inputs = {k: str(v.get("default", "")) for k, v in declared.items()}
        self.inputs.update(inputs)
        missing = [k for k, v in declared.items() if v.get("required") and not self.inputs.get(k)]
        assert not missing, f"required inputs missing: {missing}"
        self.pip_log = tmp / "pip-args.txt"
        self.bin = tmp / "bin"
        self.bin.mkdir(parents=True)
        self._shim("python", f'if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = pip ]; then\n'
                             f'  printf "%s\\n" "$@" > "{self.pip_log}"; exit 0\nfi\n'
                             f'exec "{sys.executable}" "$@"')  # fmt: skip
        self._shim("weightship", f'exec "{sys.executable}" -m weightship "$@"')
        self.steps: dict[str, dict[str, str]] = {}

    def _shim(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def expand(self, text: str) -> str:
        def value(m: re.Match) -> str:
            expr = m.group(1)
            if expr.startswith("inputs."):
                return self.inputs[expr[len("inputs.") :]]
            if expr == "github.action_path":
                return str(REPO)
            found = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", expr)
            if found:
                return self.steps.get(found.group(1), {}).get(found.group(2), "")
            raise AssertionError(f"action.yml uses an expression this test does not know: {expr}")

        return _EXPR.sub(value, text)

    def run(self) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSHIP_", "GITHUB_"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["RUNNER_TEMP"] = str(self.tmp)
        proc = None
        for i, step in enumerate(self.action["runs"]["steps"]):
            if "uses" in step:
                assert step["uses"].startswith("actions/setup-python@"), step["uses"]
                continue
            assert step.get("shell") == "bash", "composite run steps must name their shell"
            script = self.tmp / f"step-{i}.sh"
            script.write_text(self.expand(step["run"]))
            out = self.tmp / f"output-{i}"
            out.touch()
            step_env = {**env, **{k: self.expand(str(v)) for k, v in step.get("env", {}).items()}}
            step_env["GITHUB_OUTPUT"] = str(out)
            proc = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                env=step_env,
                cwd=self.tmp,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if proc.returncode != 0:
                return proc
            if "id" in step:
                self.steps[step["id"]] = parse_github_output(out.read_text())
        assert proc is not None
        return proc

    def outputs(self) -> dict[str, str]:
        return {k: self.expand(v["value"]) for k, v in self.action["outputs"].items()}


def parse_github_output(text: str) -> dict[str, str]:
    """``key=value`` lines and ``key<<DELIM`` blocks, as the runner reads GITHUB_OUTPUT."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delim = line.split("<<", 1)
            body = []
            for nxt in lines:
                if nxt == delim:
                    break
                body.append(nxt)
            out[key] = "\n".join(body)
        elif "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_action_publishes_signed_with_tags_and_outputs_the_digest(small_model: Path, keypair, tmp_path: Path):
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    run = ActionRun(
        tmp_path / "runner",
        {
            "path": str(small_model),
            "ref": "demo:1.0",
            "store": store,
            "tags": "prod\ncanary  latest\n*",
            "signing": "key",
            "key": str(key),
        },
    )
    # "*" above is a tag name to be refused, not a glob to expand against the working directory.
    (tmp_path / "runner" / "decoy").touch()
    proc = run.run()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: invalid tag '*'" in proc.stderr

    run = ActionRun(
        tmp_path / "runner2",
        {
            "path": str(small_model),
            "ref": "demo:1.0",
            "store": store,
            "tags": "prod\ncanary  latest\n",
            "signing": "key",
            "key": str(key),
        },
    )
    proc = run.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # By default the action installs its own checkout.
    assert run.pip_log.read_text().split("\n")[:3] == ["-m", "pip", "install"]
    assert run.pip_log.read_text().splitlines()[-1] == str(REPO)

    outputs = run.outputs()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", outputs["digest"])
    assert outputs["release"] == f"demo@{outputs['digest']}"
    shown = run_cli("show", outputs["release"], "--store", store, "--key", pub, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["digest"] == outputs["digest"] and doc["signature"] == "key"
    listed = json.loads(run_cli("ls", "demo", "--store", store, "--json").stdout)
    assert listed["demo"]["tags"] == {"prod": "1.0", "canary": "1.0", "latest": "1.0"}


def test_action_unsigned_and_pinned_install(small_model: Path, tmp_path: Path):
    store = f"file://{tmp_path / 'store'}"
    run = ActionRun(
        tmp_path / "runner",
        {"path": str(small_model), "ref": "demo:2", "store": store, "signing": "none", "weightship": "weightship==9.9"},
    )
    proc = run.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run.pip_log.read_text().splitlines()[-1] == "weightship==9.9"
    digest = run.outputs()["digest"]
    assert json.loads(run_cli("show", "demo:2", "--store", store, "--json").stdout)["digest"] == digest


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"signing": "key"}, "signing: key needs the key input"),
        ({"signing": "gpg"}, "signing must be none, key or sigstore, not 'gpg'"),
    ],
)
def test_action_refuses_bad_signing_inputs(small_model: Path, tmp_path: Path, inputs: dict, message: str):
    run = ActionRun(
        tmp_path / "runner", {"path": str(small_model), "ref": "demo:1", "store": "file:///nowhere", **inputs}
    )
    proc = run.run()
    assert proc.returncode == 2
    assert f"::error title=weightship::{message}" in proc.stdout
