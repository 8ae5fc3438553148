"""Changing tp from an artifact alone: the result equals converting the original checkpoint at the new tp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import reshard
from reshard.manifests import read_manifest
from reshard.manifests.errors import ShardabilityError
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama_h24", tmp_path_factory.mktemp("src") / "llama")


def without_lineage(path: Path) -> dict[str, object]:
    """The manifest without what names this conversion (lineage, artifact id, its digest, rank files' hashes: their
    headers carry the artifact id); tensor slices and their hashes stay."""
    data = json.loads(path.read_text())
    for key in ("lineage", "artifact", "manifest_xxh3"):
        data.pop(key)
    for entry in data["files"]:
        if entry["rank"] is not None:
            entry.pop("xxh3")
    return data


def same_rank_file(a: Path, b: Path) -> bool:
    """The same header (but the artifact id each conversion writes) and the same data bytes."""
    import struct

    def parts(path: Path) -> tuple[dict[str, object], bytes]:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header["__metadata__"].pop("reshard.artifact")
        return header, data[8 + length :]

    return parts(a) == parts(b)


@pytest.mark.parametrize(("old_tp", "new_tp"), [(8, 4), (4, 8), (8, 3), (2, 1), (3, 2)])
def test_reshard_equals_direct_conversion(source: Path, tmp_path: Path, monkeypatch, old_tp: int, new_tp: int):
    old = tmp_path / f"tp{old_tp}"
    reshard.convert(source, old, tp=old_tp, progress=False)
    direct = tmp_path / f"direct-tp{new_tp}"
    reshard.convert(source, direct, tp=new_tp, progress=False)
    # the original checkpoint is gone: only the old artifact's rank files can be read
    moved = tmp_path / "elsewhere"
    shutil.move(source, moved)
    try:
        resharded = tmp_path / f"resharded-tp{new_tp}"
        manifest = reshard.convert(old, resharded, tp=new_tp, progress=False)
    finally:
        shutil.move(moved, source)
    assert sorted(p.name for p in resharded.iterdir()) == sorted(p.name for p in direct.iterdir())
    for path in direct.iterdir():
        if path.name.startswith("rank-"):
            assert same_rank_file(path, resharded / path.name), path.name
        elif path.name != "manifest.json":
            assert path.read_bytes() == (resharded / path.name).read_bytes(), path.name
    assert without_lineage(resharded / "manifest.json") == without_lineage(direct / "manifest.json")
    assert manifest.lineage is not None and manifest.lineage["resharded_from"]["mesh"] == {"tp": old_tp}


@pytest.mark.parametrize("buffer_bytes", [16, 700])
def test_reshard_with_small_buffers(source: Path, tmp_path: Path, monkeypatch, buffer_bytes: int):
    reshard.convert(source, tmp_path / "tp4", tp=4, progress=False)
    reshard.convert(source, tmp_path / "direct", tp=3, progress=False)
    monkeypatch.setattr("reshard.write.rank_files.DEFAULT_BUFFER_BYTES", buffer_bytes)
    reshard.convert(tmp_path / "tp4", tmp_path / "tp3", tp=3, progress=False)
    for path in (tmp_path / "direct").glob("rank-*"):
        assert same_rank_file(path, tmp_path / "tp3" / path.name)


def test_reshard_checks_the_new_tp(source: Path, tmp_path: Path):
    reshard.convert(source, tmp_path / "tp8", tp=8, progress=False)
    with pytest.raises(ShardabilityError, match="tp=5"):
        reshard.convert(tmp_path / "tp8", tmp_path / "tp5", tp=5, progress=False)


@pytest.mark.parametrize(("old_tp", "new_tp"), [(2, 4), (4, 2)])
def test_reshard_moe_artifact(tmp_path: Path, old_tp: int, new_tp: int):
    """Fused experts (strided gate_up, uneven expert width 42 at tp 4) re-shard like any other tensor."""
    source = make_checkpoint("family_qwen3_moe", tmp_path / "src", num_key_value_heads=4)
    reshard.convert(source, tmp_path / "old", tp=old_tp, progress=False)
    reshard.convert(source, tmp_path / "direct", tp=new_tp, progress=False)
    reshard.convert(tmp_path / "old", tmp_path / "new", tp=new_tp, progress=False)
    for path in (tmp_path / "direct").glob("rank-*"):
        assert same_rank_file(path, tmp_path / "new" / path.name), path.name
    assert without_lineage(tmp_path / "new" / "manifest.json") == without_lineage(tmp_path / "direct" / "manifest.json")


def test_reshard_when_an_old_rank_holds_no_columns(tmp_path: Path):
    """intermediate 42 over 8 ranks: 6 columns each for ranks 0-6 and none for rank 7 (torch.chunk). Re-sharding
    the rowwise down_proj gathers columns from every old rank file; the empty one must add nothing."""
    source = make_checkpoint("llama_h24", tmp_path / "src", intermediate_size=42)
    reshard.convert(source, tmp_path / "tp8", tp=8, progress=False)
    down = next(t for t in read_manifest(tmp_path / "tp8").tensors if t.name == "model.layers.0.mlp.down_proj.weight")
    assert down.slices[7].shape[1] == 0
    reshard.convert(source, tmp_path / "direct", tp=3, progress=False)
    reshard.convert(tmp_path / "tp8", tmp_path / "tp3", tp=3, progress=False)
    for rank in range(3):
        name = f"rank-{rank:05d}-of-00003.safetensors"
        assert same_rank_file(tmp_path / "tp3" / name, tmp_path / "direct" / name), name
