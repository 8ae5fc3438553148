"""KV heads fewer than tp: refused with an explanation, or duplicated with --replicate-kv so the model still works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reshard
from reshard.manifests import read_manifest
from reshard.manifests.errors import ShardabilityError
from tests.helpers.checkpoints import make_checkpoint
from tests.test_reshard_artifact import same_rank_file


def full_tensors(artifact: Path) -> dict[str, torch.Tensor]:
    """Reassemble every tensor whole from the rank files (shard dims concatenated, others from rank 0)."""
    manifest = read_manifest(artifact)
    ranks = [load_file(artifact / manifest.rank_file(r).path) for r in range(manifest.tp)]
    out = {}
    for tensor in manifest.tensors:
        if tensor.placement.kind == "shard":
            out[tensor.name] = torch.cat([ranks[r][tensor.name] for r in range(manifest.tp)], dim=tensor.placement.dim)
        else:
            out[tensor.name] = ranks[0][tensor.name]
    return out


def test_kv_heads_below_tp_are_refused_with_the_reason(tmp_path: Path):
    source = make_checkpoint("llama_gqa8", tmp_path / "src", num_key_value_heads=2)  # 8 heads, 2 KV heads
    with pytest.raises(ShardabilityError, match=r"num_key_value_heads=2 is not divisible by tp=4.*--replicate-kv"):
        reshard.convert(source, tmp_path / "art", tp=4, progress=False)
    check = subprocess.run(
        [sys.executable, "-m", "reshard", "check", "--tp", "4", "--replicate-kv", str(source)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0 and "duplicated 2x" in check.stdout


def test_replicated_kv_model_computes_the_original_logits(tmp_path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    source = make_checkpoint("llama_gqa8", tmp_path / "src", num_key_value_heads=2, dtype="float32")
    manifest = reshard.convert(source, tmp_path / "art", tp=4, replicate_kv=True, progress=False)
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and manifest.options.replicate_kv.original == 2
    k_proj = next(t for t in manifest.tensors if t.name == "model.layers.0.self_attn.k_proj.weight")
    assert [s.shape[0] for s in k_proj.slices] == [8, 8, 8, 8]  # one whole head (head_dim 64 / 8) per rank

    original = AutoModelForCausalLM.from_pretrained(source).eval()
    replicated = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "art")).eval()
    missing = replicated.load_state_dict(full_tensors(tmp_path / "art"), strict=False).missing_keys
    assert missing == []
    tokens = torch.tensor([[5, 17, 300, 999, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(replicated(tokens).logits, original(tokens).logits, rtol=1e-5, atol=1e-5)


def test_llama3_8b_attention_shapes_at_tp16(tmp_path: Path):
    """32 heads, 8 KV heads of 128 at tp 16: every rank holds exactly one whole copy of KV head rank // 2."""
    source = tmp_path / "src"
    source.mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 64,
        "tie_word_embeddings": False,
    }  # fmt: skip
    (source / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (64, 4096), "lm_head.weight": (64, 4096), "model.norm.weight": (4096,),
        "model.layers.0.self_attn.q_proj.weight": (4096, 4096), "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
        "model.layers.0.self_attn.v_proj.weight": (1024, 4096), "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
        "model.layers.0.mlp.gate_proj.weight": (64, 4096), "model.layers.0.mlp.up_proj.weight": (64, 4096),
        "model.layers.0.mlp.down_proj.weight": (4096, 64), "model.layers.0.input_layernorm.weight": (4096,),
        "model.layers.0.post_attention_layernorm.weight": (4096,),
    }  # fmt: skip
    tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    manifest = reshard.convert(source, tmp_path / "art", tp=16, replicate_kv=True, progress=False)
    for rank in range(16):
        local = load_file(tmp_path / "art" / manifest.rank_file(rank).path)
        head = rank // 2
        for name in ("k_proj", "v_proj"):
            weight = tensors[f"model.layers.0.self_attn.{name}.weight"]
            assert torch.equal(local[f"model.layers.0.self_attn.{name}.weight"], weight[head * 128 : (head + 1) * 128])
        assert local["model.layers.0.self_attn.q_proj.weight"].shape == (256, 4096)  # 2 query heads per rank


@pytest.mark.parametrize(("new_tp", "replicate"), [(2, False), (8, True)])
def test_replicated_artifact_reshards_and_consolidates(tmp_path: Path, new_tp: int, replicate: bool):
    source = make_checkpoint("llama_gqa8", tmp_path / "src", num_key_value_heads=2)
    reshard.convert(source, tmp_path / "tp4", tp=4, replicate_kv=True, progress=False)
    reshard.convert(source, tmp_path / "direct", tp=new_tp, replicate_kv=replicate, progress=False)
    reshard.convert(tmp_path / "tp4", tmp_path / "new", tp=new_tp, progress=False)
    for path in (tmp_path / "direct").iterdir():
        if path.name.startswith("rank-"):  # the same header but for the artifact id, the same bytes
            assert same_rank_file(path, tmp_path / "new" / path.name), path.name
        elif path.name != "manifest.json":
            assert path.read_bytes() == (tmp_path / "new" / path.name).read_bytes(), path.name

    from reshard.commands.consolidate import consolidate

    consolidate(tmp_path / "tp4", tmp_path / "back", progress=False)
    original = {k: v for f in source.glob("*.safetensors") for k, v in load_file(f).items()}
    back = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert (tmp_path / "back" / "config.json").read_bytes() == (source / "config.json").read_bytes()
