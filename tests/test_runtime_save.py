"""``save_pretrained`` on a model loaded by reshard writes the source checkpoint's own format, as transformers' own
TP model does (its ``test_model_save``): per-expert keys for fused experts, gpt_neox's ``embed_out``, the same bytes.

One torchrun job at 2 ranks loads each artifact and saves it on every rank (saving gathers the DTensors; rank 0
writes the files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_runtime_tp import run

pytest.importorskip("transformers")

FAMILIES = ("family_qwen3_moe", "family_mixtral", "family_deepseek_v3", "family_gpt_neox", "llama")


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("save")
    spec = [{"name": kind, "kind": "save", "artifact": str(tiny.artifact(kind, tp=2))} for kind in FAMILIES]
    run(spec, 2, root / "out")
    return root / "out"


@pytest.mark.parametrize("kind", FAMILIES)
def test_save_pretrained_writes_the_checkpoint_format(tiny, saved: Path, kind: str) -> None:
    original = tensors_of(tiny.checkpoint(kind))
    back = tensors_of(saved / f"{kind}-rank0")  # the main process writes, as transformers' save_pretrained does
    assert sorted(back) == sorted(original)  # the checkpoint's own keys: per expert, embed_out, no tied head
    for name, tensor in original.items():
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name
