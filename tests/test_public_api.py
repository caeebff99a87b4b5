"""The typed public API at the package root: the library calls behind the commands."""

from __future__ import annotations

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
