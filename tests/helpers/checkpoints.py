"""Tiny Hugging Face checkpoints for tests, written with ``save_pretrained`` and split into several files.

Every kind is small (hidden 64, 2 layers) but exercises what tensor parallelism gets wrong: a vocabulary of 1001
that no tp divides, grouped-query attention, tied and untied embeddings, biases (qwen2). Weights are random but
seeded, so a kind always gives the same bytes; norms are random too, so a swapped or missing tensor shows.

Kinds:
    ``llama``        4 heads, 2 KV heads (GQA; shardable at tp 2, not 4), untied, bfloat16
    ``llama_tied``   the same with ``tie_word_embeddings``
    ``llama_mha8``   8 heads, 8 KV heads (shardable at tp 4)
    ``llama_gqa8``   8 heads, 4 KV heads (GQA shardable at tp 2 and 4)
    ``qwen2``        4 heads, 2 KV heads, biases on q/k/v, untied, float32
    ``llama_h24``    24 heads of width 4 (tp 1, 2, 3, 4, 6, 8 valid), intermediate 100, untied
    ``family_NAME``  the smallest sensible model of each family in ``FAMILIES`` (dense) or ``MOE_FAMILIES``

Example:
    >>> make_checkpoint("llama_gqa8", tmp_path / "src", tie_word_embeddings=True)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1001,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"tie_word_embeddings": False, "dtype": "bfloat16"}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "dtype": "bfloat16"}),
    "llama_mha8": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 8, "dtype": "bfloat16"}),
    "llama_gqa8": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 4, "dtype": "bfloat16"}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False, "dtype": "float32"}),
    # 24 heads: tp 1, 2, 3, 4, 6 and 8 are all valid, with the vocabulary and MLP uneven at most of them
    "llama_h24": (
        "llama",
        {
            "hidden_size": 96,
            "num_attention_heads": 24,
            "num_key_value_heads": 24,
            "intermediate_size": 100,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        },
    ),
}

# Dense families with a built-in plan, and what their tiny config needs beyond _TINY (head_dim defaults of 128 or
# 256 would dwarf hidden 64; gpt_neox has no KV heads).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "granite": {},
    "olmo2": {},
    "cohere": {},
    "starcoder2": {},
    "phi3": {"pad_token_id": 0},
    "gpt_neox": {"num_key_value_heads": None},
}

# Mixture-of-experts families: per-expert tensors on disk, fused by transformers at load. An expert intermediate
# size of 42 is uneven at tp 4 (11/11/11/9), as torch.chunk cuts it.
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 42,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 42,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 1,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 42},
    # experts stored fused already (fc1/fc2, renamed at load); gate_up_proj is packed_rowwise
    "aria_text": {
        "moe_num_experts": 4,
        "moe_topk": 2,
        "moe_num_shared_experts": 1,
        "intermediate_size": 42,
        "head_dim": 16,
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 42},
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 42,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
    },
}


def make_checkpoint(
    kind: str,
    path: str | os.PathLike[str],
    *,
    max_shard_size: str = "60KB",
    seed: int = 0,
    tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny checkpoint of ``kind`` (see the module docstring) to ``path``; ``overrides`` set config fields.

    ``max_shard_size`` splits the weights over several safetensors files plus an index, like a real Hub repo;
    ``tokenizer`` adds a word-level tokenizer (``w0 w1 ...``) covering the vocabulary, for end-to-end examples.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind.startswith("family_"):
        family = kind.removeprefix("family_")
        model_type, extra = family, {"dtype": "float32", **{**FAMILIES, **MOE_FAMILIES}[family]}
    else:
        model_type, extra = KINDS[kind]
    fields = {key: value for key, value in {**_TINY, **extra, **overrides}.items() if value is not None}
    dtype = getattr(torch, fields.pop("dtype"))
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            value = 1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise
            param.copy_(value.to(param.dtype))
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer:
        save_word_tokenizer(path, config.vocab_size)
    return path


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer: ``<unk>``, ``<s>``, ``</s>``, then ``w3`` ... up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


class CheckpointCache:
    """Build each checkpoint, and each artifact converted from it, once per test session.

    Example:
        >>> cache = CheckpointCache(tmp_path)  # doctest: +SKIP
        >>> cache.artifact("qwen2", tp=2)  # the qwen2 checkpoint, converted for tp 2  # doctest: +SKIP
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint(self, kind: str, **overrides: Any) -> Path:
        path = self.root / _label(kind, overrides)
        if not path.exists():
            make_checkpoint(kind, path, **overrides)
        return path

    def artifact(self, kind: str, tp: int, **overrides: Any) -> Path:
        import reshard

        path = self.root / f"{_label(kind, overrides)}-tp{tp}"
        if not path.exists():
            reshard.convert(self.checkpoint(kind, **overrides), path, tp=tp, progress=False)
        return path


def _label(kind: str, overrides: dict[str, Any]) -> str:
    return "-".join([kind, *(f"{key}={overrides[key]}" for key in sorted(overrides))])


# Families whose load_model is checked against from_pretrained(tp_plan="auto") (logits, generate) under torchrun:
# llama and qwen2 in tests/test_runtime_tp.py, the MoE ones in tests/test_runtime_moe.py (qwen2_moe, olmoe and
# deepseek_v3 at 2 ranks only).
# Families compared slice for slice with transformers' own TP shards from their tester-sized configs
# (``tester_configs.make_tiny_checkpoint``): those whose load-time converters reshard replays offline.
TESTER_FAMILIES = (
    "bailing_hybrid",
    "gemma3n_text",
    "inkling2_text",
    "kimi_linear",
    "olmo_hybrid",
    "qwen3_5_moe_text",
    "qwen3_5_text",
)
# ...and the ones transformers' own TP load cannot give shards of, with the reason.
SLICES_SKIPPED = {
    "hrm_text": "transformers' own TP load fails: it cuts the fused gqkv_proj per rank before its Chunk converter",
}

RUNTIME_PARITY_FAMILIES = ("llama", "qwen2", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3")
