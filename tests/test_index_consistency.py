"""A sharded safetensors checkpoint's index (``*.safetensors.index.json``) is held to its
shards at pack time: every ``weight_map`` entry must name a shard of the model whose header
holds that tensor. The checkpoints are real: written by the safetensors library, split the
way transformers splits them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import error_line, run_cli
from weightship.artifact.pack import pack
from weightship.errors import ModelError


def sharded(root: Path, sub: str = "") -> Path:
    """A two-shard checkpoint with its index, in ``root/sub``."""
    d = root / sub if sub else root
    d.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": {
            "embed.weight": np.ones((16, 8), dtype=np.float32),
            "layers.0.weight": np.ones((8, 8), dtype=np.float16),
        },
        "model-00002-of-00002.safetensors": {
            "layers.1.weight": np.ones((8, 8), dtype=np.float16),
            "lm_head.weight": np.ones((16, 8), dtype=np.float32),
        },
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    write_index(d, weight_map)
    (d / "config.json").write_text('{"model_type": "test"}')
    return root


def write_index(d: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> Path:
    path = d / name
    path.write_text(json.dumps({"metadata": {"total_size": 1024}, "weight_map": weight_map}, indent=2))
    return path


def index_of(d: Path) -> dict[str, str]:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def test_a_consistent_checkpoint_packs(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    m = pack(model).manifest
    summaries = {f.path: f.safetensors for f in m.files if f.safetensors}
    assert sorted(summaries) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sum(s.tensors for s in summaries.values()) == len(index_of(model))


def test_an_index_in_a_subfolder_names_shards_beside_it(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model", "text_encoder")
    pack(model)
    # The same names from the top would point at shards that are not there.
    write_index(model, index_of(model / "text_encoder"))
    with pytest.raises(ModelError, match=r"which is not in the model \(model\.safetensors\.index\.json\)"):
        pack(model)


def test_a_missing_shard_is_refused_naming_tensor_shard_and_index(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    (model / "model-00002-of-00002.safetensors").unlink()
    proc = run_cli("pack", model)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(
        "error: tensor 'layers.1.weight' is mapped to shard 'model-00002-of-00002.safetensors', "
        "which is not in the model (model.safetensors.index.json)"
    ), line
    # Left out with --ignore is missing too: the published release would lack it.
    model = sharded(tmp_path / "model2")
    proc = run_cli("pack", model, "--ignore", "model-00001-of-00002.safetensors")
    assert proc.returncode == 1 and "which is not in the model" in error_line(proc)


def test_a_tensor_its_shard_lacks_is_refused(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    weight_map = index_of(model)
    weight_map["lm_head.weight"] = "model-00001-of-00002.safetensors"  # it lives in shard 2
    write_index(model, weight_map)
    store = tmp_path / "store"
    proc = run_cli("publish", model, "m:1", "--store", f"file://{store}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(
        "error: tensor 'lm_head.weight' is mapped to shard 'model-00001-of-00002.safetensors', "
        "whose header lacks it (model.safetensors.index.json)"
    ), line
    assert not (store / "releases").exists()


def test_an_index_pointing_outside_or_at_a_non_shard(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    for shard, why in [
        ("../model-00001-of-00002.safetensors", "which is not in the model"),
        ("config.json", "which is not a safetensors shard"),
        ("", "which is not in the model"),
    ]:
        write_index(model, {**index_of(model), "embed.weight": shard})
        with pytest.raises(ModelError, match=why):
            pack(model)
        write_index(model, {**index_of(model), "embed.weight": "model-00001-of-00002.safetensors"})
    pack(model)


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": {"a": 1}}', '{"weight_map": []}'],
)
def test_a_malformed_index_is_refused(tmp_path: Path, text: str) -> None:
    model = sharded(tmp_path / "model")
    (model / "model.safetensors.index.json").write_text(text)
    proc = run_cli("pack", model)
    assert proc.returncode == 1
    assert error_line(proc).startswith("error: model.safetensors.index.json: malformed safetensors index (")


def test_other_index_files_are_not_read_as_safetensors_indexes(tmp_path: Path) -> None:
    """pytorch_model.bin.index.json maps tensors to pickles; it is not this check's business."""
    model = sharded(tmp_path / "model")
    (model / "pytorch_model.bin.index.json").write_text('{"weight_map": {"a": "missing.bin"}}')
    pack(model)
