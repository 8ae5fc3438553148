"""The toy transform goes through convert, re-shard and consolidate with no other change than its module, its line
in the chain and its record kind."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests import read_manifest
from tests.helpers.checkpoints import make_checkpoint


def _rank0(folder: Path) -> dict[str, torch.Tensor]:
    manifest = read_manifest(folder)
    return load_file(folder / next(f.path for f in manifest.files if f.rank == 0))


def _all(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_toy_transform_through_convert_reshard_consolidate(tmp_path: Path):
    source = make_checkpoint("llama", tmp_path / "src")
    original = _all(source)
    first = reshard.convert(source, tmp_path / "tp2", tp=2, progress=False)
    record = first.options.records["toy_flipped"]
    assert record["tp"] == 2 and "model.norm.weight" in record["names"]
    for name in record["names"]:
        assert torch.equal(_rank0(tmp_path / "tp2")[name], original[name].flip(0)), name
    second = reshard.convert(tmp_path / "tp2", tmp_path / "tp1", tp=1, progress=False)  # re-shard: re-derived
    assert read_manifest(tmp_path / "tp1").options.records["toy_flipped"]["tp"] == 1 == second.tp
    for name in record["names"]:
        assert torch.equal(_rank0(tmp_path / "tp1")[name], original[name].flip(0)), name
    consolidate(tmp_path / "tp1", tmp_path / "back", progress=False)
    back = _all(tmp_path / "back")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)
