"""Each rank file holds exactly what transformers' own TP load (tp_plan="auto") puts on that rank.

One 2-rank torchrun/gloo run loads every dense and MoE family with transformers and dumps its local tensors
(for MoE: the fused ``gate_up_proj``/``down_proj`` transformers builds from per-expert tensors); the test
compares them, bit for bit and placement for placement, with reshard's rank files for the same checkpoint. The
families whose converters reshard replays last (``TESTER_FAMILIES``) are built from transformers' tester-sized configs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reshard
from tests.helpers.checkpoints import FAMILIES, MOE_FAMILIES, SLICES_SKIPPED, TESTER_FAMILIES, make_checkpoint

ALL_FAMILIES = sorted({**FAMILIES, **MOE_FAMILIES}) + list(TESTER_FAMILIES)
EP_FAMILIES = ["qwen3_moe", "mixtral"]  # expert parallel (ep = tp = 2): whole experts per rank

pytest.importorskip("transformers")

WORKER = Path(__file__).parent / "workers" / "dump_transformers_tp.py"
TP = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
    ]
    return subprocess.run([*command, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def transformers_dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("families")
    jobs, result = [], {}
    for family in ALL_FAMILIES:
        if family in TESTER_FAMILIES:  # built as transformers' testers build it
            from tests.helpers.tester_configs import make_tiny_checkpoint

            source = make_tiny_checkpoint(family, root / family)
        else:
            source = make_checkpoint(f"family_{family}", root / family)
        result[family] = (source, root / f"{family}-hf")
        jobs.append([str(source), str(root / f"{family}-hf"), 1])
    for family in EP_FAMILIES:
        result[f"{family}-ep"] = (result[family][0], root / f"{family}-ep-hf")
        jobs.append([str(result[family][0]), str(root / f"{family}-ep-hf"), TP])
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = torchrun(WORKER, str(root / "jobs.json"), nproc=TP)
    assert run.returncode == 0, run.stderr[-3000:]
    return result


def describe(placement: reshard.manifests.Placement) -> list[list[object]] | None:
    """The manifest's placement in the worker's JSON form: kind, dim, [split factor], mesh name."""
    if placement.kind == "plain":
        return None
    if placement.kind == "replicate":
        return [["replicate", placement.mesh]]
    if placement.kind == "strided_shard":
        return [["strided_shard", placement.dim, placement.split_factor, placement.mesh]]
    return [["shard", placement.dim, placement.mesh]]


def normalized(placements: list[list[object]] | None, ndim: int) -> list[list[object]] | None:
    """transformers' placements with negative dims counted from the front, as the manifest records them."""
    if placements is None:
        return None
    return [[p[0], p[1] % ndim, *p[2:]] if isinstance(p[1], int) else p for p in placements]  # type: ignore[operator]


@pytest.mark.parametrize(
    "family",
    ALL_FAMILIES
    + [f"{family}-ep" for family in EP_FAMILIES]
    + [pytest.param(family, marks=pytest.mark.skip(reason=reason)) for family, reason in SLICES_SKIPPED.items()],
)
def test_rank_files_equal_transformers_local_shards(transformers_dumps, tmp_path: Path, family: str):
    source, dump = transformers_dumps[family]
    ep = TP if family.endswith("-ep") else 1
    manifest = reshard.convert(source, tmp_path / "art", tp=TP, ep=ep, progress=False)
    entries = {t.name: t for t in manifest.tensors}
    for rank in range(TP):
        ours = load_file(tmp_path / "art" / manifest.rank_file(rank).path)
        theirs = load_file(f"{dump}.rank{rank}.safetensors")
        placements = json.loads(Path(f"{dump}.rank{rank}.json").read_text())
        tied = {n for n in theirs if n not in ours}
        # the only parameter transformers has that the rank file lacks is a tied head (same tensor as the embedding)
        assert tied <= {"lm_head.weight"}, tied
        assert set(ours) <= set(theirs)
        for name, tensor in ours.items():
            assert tensor.dtype == theirs[name].dtype, name
            assert tensor.shape == theirs[name].shape, (name, tensor.shape, theirs[name].shape)
            assert torch.equal(tensor.view(torch.uint8), theirs[name].view(torch.uint8)), name
            ndim = len(entries[name].shape)
            assert describe(entries[name].placement) == normalized(placements[name], ndim), name
        for name in tied:
            assert torch.equal(theirs[name], ours["model.embed_tokens.weight"])
