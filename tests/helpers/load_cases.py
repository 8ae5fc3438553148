"""Checkpoints as real Hub repos lay them out, for the load report: each made by transformers' ``save_pretrained``
and then given what real repos carry (old rotary buffers, a tied copy of ``lm_head``, DeepSeek-V3's MTP layer) or
lack (a shard, the ``model.`` prefix of a base-model save).

Kinds (``make_case(kind, tiny, root)``):
    ``old_rotary``  llama with a per-layer ``self_attn.rotary_emb.inv_freq`` (checkpoints of older transformers)
    ``tied_copy``   tied llama that also stores ``lm_head.weight`` (equal to the embeddings), and old rotary buffers
    ``tied_differs`` tied llama whose stored ``lm_head.weight`` differs from the embeddings (transformers unties)
    ``half_q``      llama whose layer-1 q_proj lost its second half (a shard missing)
    ``deeper``      llama with a third layer its config (2 layers, nothing declared) does not have
    ``base``        llama saved by ``AutoModel`` (``layers.*``, no ``model.`` prefix, no ``lm_head``)
    ``mtp``         deepseek_v3 (2 layers, the second MoE, vocabulary 1001) with the MTP layer ``model.layers.2.*``
                    its config declares (``num_nextn_predict_layers=1``): per-expert keys, ``eh_proj``,
                    ``enorm``/``hnorm``, ``shared_head``, its own ``embed_tokens``, as DeepSeek-V3's layer 61
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


def tensors_of(folder: Path) -> Tensors:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def rewritten(source: Path, target: Path, change: Callable[[Tensors], Tensors], **config: Any) -> Path:
    """``source`` with its tensors changed, in one ``model.safetensors``, and config.json fields set."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, target / path.name)
    save_file(change(tensors_of(source)), target / "model.safetensors", metadata={"format": "pt"})
    if config:
        data = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**data, **config}, indent=2))
    return target


def _old_rotary(tensors: Tensors, layers: int = 2, head_dim: int = 16) -> Tensors:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return {**tensors, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(layers)}}


def _mtp_layer(tensors: Tensors, layers: int, hidden: int) -> Tensors:
    last = f"model.layers.{layers - 1}."
    extra = {k.replace(last, f"model.layers.{layers}."): v + 0.5 for k, v in tensors.items() if k.startswith(last)}
    generator = torch.Generator().manual_seed(7)
    extra |= {
        f"model.layers.{layers}.enorm.weight": torch.ones(hidden),
        f"model.layers.{layers}.hnorm.weight": torch.ones(hidden),
        f"model.layers.{layers}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator),
        f"model.layers.{layers}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        f"model.layers.{layers}.shared_head.norm.weight": torch.ones(hidden),
        f"model.layers.{layers}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
    }
    return {**tensors, **extra}


def make_case(kind: str, tiny: Any, root: Path) -> Path:
    target = root / kind
    if target.exists():
        return target
    llama = tiny.checkpoint("llama")
    if kind == "old_rotary":
        return rewritten(llama, target, _old_rotary)
    if kind == "tied_copy":
        tied = tiny.checkpoint("llama_tied")
        return rewritten(
            tied, target, lambda t: _old_rotary({**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
        )
    if kind == "tied_differs":
        tied = tiny.checkpoint("llama_tied")
        return rewritten(tied, target, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] * 2})
    if kind == "half_q":
        name = "model.layers.1.self_attn.q_proj.weight"
        return rewritten(llama, target, lambda t: {**t, name: t[name][: t[name].shape[0] // 2].clone()})
    if kind == "deeper":
        return rewritten(
            llama,
            target,
            lambda t: {
                **t,
                **{k.replace(".1.", ".2.", 1): v.clone() for k, v in t.items() if k.startswith("model.layers.1.")},
            },
        )
    if kind == "base":
        from transformers import AutoModel

        AutoModel.from_pretrained(llama).save_pretrained(target)
        return target
    if kind == "mtp":
        from tests.helpers.tester_configs import make_tiny_checkpoint

        plain = make_tiny_checkpoint(
            "deepseek_v3", root / "mtp-plain", num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1001
        )
        config = json.loads((plain / "config.json").read_text())
        hidden = config["hidden_size"]
        return rewritten(plain, target, lambda t: _mtp_layer(t, 2, hidden), num_nextn_predict_layers=1)
    raise ValueError(kind)
