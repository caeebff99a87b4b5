"""The typed public API at the package root: the library calls behind the commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import weightship
from tests.fleetkit import fleet_toml, model, source_files, tree
from weightship.trust.policy import TrustPolicy
from weightship.trust.signers import KeySigner


def test_publish_pull_warm_status_through_the_package_root(tmp_path: Path, keypair) -> None:
    key, pub = keypair
    store = f"file://{tmp_path / 'store'}"
    src = model(tmp_path, 40)
    published = weightship.publish(src, "api:1.0", store, tags=["prod"], signer=KeySigner(key))
    assert published.signed == "key" and published.tags == ["prod"]
    assert weightship.resolve("api:prod", store).digest == published.digest

    out = tmp_path / "out"
    pulled = weightship.pull("api:prod", out, weightship.open_store(store), policy=TrustPolicy(keys=[pub]))
    assert pulled.signer and {k: v for k, v in tree(out).items() if k != "model.sig"} == source_files(src)

    config = tmp_path / "weightship.toml"
    nodes = [{"name": f"n{i}", "transport": "local", "cache": str(tmp_path / f"cache-{i}")} for i in (1, 2)]
    config.write_text(fleet_toml({"lab": nodes}, store=store, pub=pub))
    report = weightship.warm("api:prod", "lab", config=config)
    doc = report.to_dict()
    assert doc["schema"] == "weightship.warm/v1" and doc["ok"] and doc["ready"] == 2
    status = weightship.status("api:prod", "lab", config=config)
    assert status.ok and status.to_dict()["ready"] == 2

    # A node's side: wait for the release in a node cache (what `node wait` does).
    waited = weightship.wait_ready(tmp_path / "cache-1", "api:prod", timeout=10)
    assert isinstance(waited, weightship.WaitResult)
    assert waited.ok and waited.version == "1.0" and waited.to_dict()["schema"] == "weightship.node-wait/v1"
    absent = weightship.wait_ready(tmp_path / "cache-1", "api:9.9", timeout=0)
    assert not absent.ok and absent.timed_out and absent.state == "absent"


def test_the_package_root_lists_its_api_and_loads_the_engine_lazily() -> None:
    expected = {"open_store", "resolve", "publish", "pull", "tag", "rm", "untag", "prune", "warm", "status"}
    expected |= {"wait_ready", "WaitResult", "__version__"}
    assert set(weightship.__all__) == expected
    assert all(hasattr(weightship, name) for name in weightship.__all__)
    # Importing the package loads no engine: the node's wait loads on first use.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, weightship; print('weightship.node.wait' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "False", proc.stderr
    from weightship.node.wait import WaitResult

    assert weightship.WaitResult is WaitResult
