"""Consolidating an artifact gives back the original checkpoint's tensors, bit for bit, under their names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reshard
from tests.helpers.checkpoints import make_checkpoint


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize(
    ("kind", "tp"),
    [
        ("llama", 2),
        ("llama_tied", 2),
        ("family_gpt_neox", 2),  # lm_head goes back to embed_out
        ("llama_h24", 3),
        ("family_qwen3_moe", 2),  # fused experts go back to one tensor per expert
        ("family_mixtral", 2),  # ... and block_sparse_moe.experts.N.w1/w2/w3
    ],
)
def test_consolidate_round_trip(tmp_path: Path, kind: str, tp: int):
    source = make_checkpoint(kind, tmp_path / "src")
    reshard.convert(source, tmp_path / "art", tp=tp, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "reshard", "consolidate", str(tmp_path / "art"), "-o", str(tmp_path / "back"),
         "--max-shard-size", "60KB", "-q"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    original, back = tensors_of(source), tensors_of(tmp_path / "back")
    assert back.keys() == original.keys()  # original names: embed_out, per-expert keys, no tied lm_head
    for name, tensor in original.items():
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert (tmp_path / "back" / "config.json").read_bytes() == (source / "config.json").read_bytes()

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    reference = AutoModelForCausalLM.from_pretrained(source)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
