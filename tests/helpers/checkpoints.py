"""Tiny checkpoints with real architectures, written by transformers' save_pretrained like the Hub has them.

Random weights, a few KB each, sharded into several files with ``model.safetensors.index.json`` so that every
test exercises the multi-file path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Small shapes that still show the interesting cases: GQA (4 heads, 2 KV heads), an uneven vocabulary (1001).
BASE: dict[str, Any] = {
    "vocab_size": 1001,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

KINDS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama_tied": {"model_type": "llama", "tie_word_embeddings": True},
    "llama_mha8": {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 64},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
}


def make_checkpoint(kind: str, path: str | Path, *, dtype: str = "bfloat16", seed: int = 0, **overrides: Any) -> Path:
    """Save a random ``kind`` model (see ``KINDS``) with save_pretrained into ``path``, sharded into several files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**BASE, **KINDS[kind], **overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # norms start at exactly 1 or 0: make every tensor distinct so slices cannot pass by luck
        for param in model.parameters():
            param.copy_(torch.randn_like(param, dtype=torch.float32).to(param.dtype) * 0.05)
    path = Path(path)
    model.save_pretrained(path, max_shard_size="100KB")
    return path
