"""transformers' distributed checkpoints (``save_pretrained(dir, distributed_checkpoint=True)``) as a source.

The folders are made by transformers itself under torchrun (2 ranks, ``workers/save_distributed_checkpoint.py``);
converting one must give the same bytes as converting the checkpoint it was loaded from. Damaged or inconsistent
folders made here by hand (torch DCP's layout: per-rank safetensors, ``saved_offsets`` in ``__metadata__``) fail
in one line.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import reshard
from reshard.manifests.chunks import locate
from reshard.manifests.errors import FileFormatError, SourceError
from reshard.source.distributed_checkpoint import distributed_tensors, is_distributed_checkpoint, shard_files
from reshard.transforms import Table
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.distributed import run_torchrun

WORKER = Path(__file__).parent / "workers" / "save_distributed_checkpoint.py"
KINDS = ("llama", "llama_tied", "family_qwen3_moe")  # uneven vocabulary, tied embeddings, fused experts
SHARDS = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """kind -> (the original checkpoint, transformers' distributed checkpoint of it at tp 2)."""
    root = tmp_path_factory.mktemp("dcp")
    pairs = {kind: (make_checkpoint(kind, root / f"{kind}-src"), root / f"{kind}-dcp") for kind in KINDS}
    run_torchrun(WORKER, *[str(p) for pair in pairs.values() for p in pair], nproc=2, timeout=300)
    return pairs


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=120)


def manifest_tensors(folder: Path) -> list[dict[str, object]]:
    return list(json.loads((folder / "manifest.json").read_text())["tensors"])


def test_what_transformers_writes(folders: dict[str, tuple[Path, Path]]):
    """The format this source reads, as transformers 5.23 / torch 2.13 write it: no index, nothing pickled."""
    _, dcp = folders["llama"]
    assert sorted(p.name for p in dcp.iterdir()) == ["config.json", "generation_config.json", *SHARDS]
    assert is_distributed_checkpoint(dcp)
    offsets = {}
    for name in SHARDS:
        with safe_open(dcp / name, framework="pt") as handle:
            metadata = handle.metadata()
            assert set(metadata) == {"DCP_SHARDING_INFO", "DCP_VERSION", "format"}
            assert metadata["DCP_VERSION"] == "1.0"
            info = json.loads(metadata["DCP_SHARDING_INFO"])
            assert set(info) == set(handle.keys())
            offsets[name] = {key: value["saved_offsets"] for key, value in info.items()}
    assert [offsets[name]["lm_head.weight"] for name in SHARDS] == [[0, 0], [501, 0]]  # 1001 rows: 501 + 500
    assert offsets[SHARDS[1]]["model.layers.0.self_attn.o_proj.weight"] == [0, 32]  # rowwise: columns
    assert "model.norm.weight" in offsets[SHARDS[0]].keys() ^ offsets[SHARDS[1]].keys()  # replicated: saved once


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_convert_gives_the_original_bytes(folders: dict[str, tuple[Path, Path]], tmp_path: Path, kind: str, tp: int):
    source, dcp = folders[kind]
    reshard.convert(dcp, tmp_path / "from-dcp", tp=tp, progress=False)
    reshard.convert(source, tmp_path / "from-source", tp=tp, progress=False)
    # every slice of every tensor: same name, shape, ranges and xxh3 as converting the original checkpoint
    assert manifest_tensors(tmp_path / "from-dcp") == manifest_tensors(tmp_path / "from-source")
    if tp == 1 and kind != "family_qwen3_moe":  # and, independently of reshard's hashing, the original tensors
        original = {k: v for f in source.glob("*.safetensors") for k, v in load_file(f).items()}
        artifact = load_file(tmp_path / "from-dcp" / "rank-00000-of-00001.safetensors")
        assert artifact.keys() == original.keys()  # a tied lm_head.weight, which DCP saves again, left out
        for name, tensor in original.items():
            assert torch.equal(artifact[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize("kind", ["llama", "family_qwen3_moe"])
def test_cli_convert_check_consolidate(folders: dict[str, tuple[Path, Path]], tmp_path: Path, kind: str):
    source, dcp = folders[kind]
    result = run_cli("check", str(dcp), "--tp", "2")
    assert result.returncode == 0 and "tp=2   ok" in result.stdout, result.stderr
    result = run_cli("--tp", "2", str(dcp), "-o", str(tmp_path / "art"), "-q")
    assert result.returncode == 0, result.stderr
    assert run_cli("verify", str(tmp_path / "art"), "-q").returncode == 0
    result = run_cli("consolidate", str(tmp_path / "art"), "-o", str(tmp_path / "back"), "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "config.json").read_bytes() == (dcp / "config.json").read_bytes()

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    ("how", "code", "fragment"),
    [
        ("truncated", 12, SHARDS[1]),
        ("missing_first", 3, "no shard-00001-model-*.safetensors, but shard 2 is there"),
        ("missing_last", 3, "has 501 rows but config.json vocab_size is 1001"),  # nothing else says it is short
    ],
)
def test_a_damaged_folder_fails_in_one_line(
    folders: dict[str, tuple[Path, Path]], tmp_path: Path, how: str, code: int, fragment: str
):
    damaged = tmp_path / "dcp"
    shutil.copytree(folders["llama"][1], damaged)
    if how == "truncated":
        shard = damaged / SHARDS[1]
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        (damaged / SHARDS[0 if how == "missing_first" else 1]).unlink()
    result = run_cli("--tp", "2", str(damaged), "-o", str(tmp_path / "art"), "-q")
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists()


# Folders written here in torch DCP's layout, to check the tiling rules without torchrun.


def write_shard(path: Path, parts: dict[str, tuple[torch.Tensor, list[int]]], **metadata: str) -> None:
    info = json.dumps({name: {"saved_offsets": offsets} for name, (_, offsets) in parts.items()})
    fields = {"DCP_SHARDING_INFO": info, "DCP_VERSION": "1.0", "format": "pt", **metadata}
    save_file({name: tensor.contiguous() for name, (tensor, _) in parts.items()}, path, metadata=fields)


def assembled(table: Table, name: str) -> bytes:
    """A tensor's bytes read back through its chunks (float32)."""
    tensor = table[name]
    out = bytearray()
    for piece in locate(tensor.chunks, 0, math.prod(tensor.shape) * 4, name):
        with open(piece.file, "rb") as handle:
            handle.seek(piece.offset)
            out += handle.read(piece.nbytes)
    return bytes(out)


def test_slices_along_any_dim_are_reassembled(tmp_path: Path):
    weight = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(5, 6, 4)
    write_shard(tmp_path / SHARDS[0], {"w": (weight[:, :4], [0, 0, 0]), "v": (weight[:3], [0, 0, 0])})
    write_shard(tmp_path / SHARDS[1], {"w": (weight[:, 4:], [0, 4, 0]), "v": (weight[3:], [3, 0, 0])})
    table = distributed_tensors(tmp_path, shard_files(tmp_path))
    assert table["w"].shape == table["v"].shape == (5, 6, 4)
    assert assembled(table, "w") == assembled(table, "v") == weight.numpy().tobytes()


@pytest.mark.parametrize(
    ("parts", "error", "fragment"),
    [
        ([{"w": (slice(0, 3), [0, 0])}, {"w": (slice(2, 6), [2, 0])}], SourceError, "overlaps"),
        ([{"w": (slice(0, 2), [0, 0])}, {"w": (slice(3, 6), [3, 0])}], SourceError, "dim 0 2..3 is in no shard"),
        ([{"w": (slice(0, 6), [0, 0])}, {"w": (slice(0, 6), [0, 0])}], SourceError, "saved whole here and in"),
        ([{"w": (slice(0, 3), [0, 0])}, {"w": (slice(3, 6), [3, 1])}], SourceError, "cut along dims [0, 1]"),
        ([{"w": (slice(0, 3), [0])}, {"w": (slice(3, 6), [3, 0])}], FileFormatError, "has 1 dims"),
    ],
)
def test_bad_tiling_is_refused(
    tmp_path: Path, parts: list[dict[str, tuple[slice, list[int]]]], error: type, fragment: str
):
    weight = torch.ones(6, 4)
    for name, part in zip(SHARDS, parts, strict=True):
        write_shard(tmp_path / name, {k: (weight[rows], offsets) for k, (rows, offsets) in part.items()})
    with pytest.raises(error, match=re.escape(fragment)):
        distributed_tensors(tmp_path, shard_files(tmp_path))


def test_inconsistent_files_are_refused(tmp_path: Path):
    write_shard(tmp_path / SHARDS[0], {"w": (torch.ones(3, 4), [0, 0])})
    write_shard(tmp_path / SHARDS[1], {"w": (torch.ones(3, 4, dtype=torch.bfloat16), [3, 0])})
    with pytest.raises(SourceError, match=r"shard-00002.*'w' is BF16\[3, 4\] here but F32\[3, 4\]"):
        distributed_tensors(tmp_path, shard_files(tmp_path))
    save_file({"w": torch.ones(3, 4)}, tmp_path / SHARDS[1], metadata={"DCP_VERSION": "1.0"})
    with pytest.raises(FileFormatError, match=r"shard-00002.*has no DCP_SHARDING_INFO"):
        distributed_tensors(tmp_path, shard_files(tmp_path))
    write_shard(tmp_path / SHARDS[1], {"w": (torch.ones(3, 4), [3, 0])}, DCP_SHARDING_INFO="{")
    with pytest.raises(FileFormatError, match="DCP_SHARDING_INFO is not valid JSON"):
        distributed_tensors(tmp_path, shard_files(tmp_path))
    write_shard(tmp_path / SHARDS[1], {"w": (torch.ones(3, 4), [3, 0])})
    save_file({"w": torch.ones(6, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(SourceError, match=r"model\.safetensors: a safetensors file beside DCP shard files"):
        shard_files(tmp_path)
