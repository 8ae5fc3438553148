"""Tiny checkpoints laid out as Hub repos lay theirs out, written by transformers' own ``save_pretrained``.

- ``gemma3_saved``: ``Gemma3ForConditionalGeneration.save_pretrained`` (``language_model.model.*``,
  ``vision_tower.*``, ``multi_modal_projector.*``);
- ``gemma3_hub``: the same tensors as the gemma3 repos store them, the vision tower under
  ``vision_tower.vision_model.*`` (which transformers' vision sub-model removes at load);
- ``llama_base``: ``LlamaModel.save_pretrained`` (``AutoModel``: ``layers.*``, no ``model.`` prefix), tied
  embeddings so that the causal LM read from it has every weight.

Weights are seeded ``0.1 * randn`` (norms ``1 + 0.2 * randn``); vocabulary 1024 (the runtime tests' prompt uses ids
up to 1000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TEXT: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
LAYOUTS = ("gemma3_saved", "gemma3_hub", "llama_base")


def _randomize(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


def make_layout(layout: str, path: Path) -> Path:
    """Write the checkpoint ``layout`` (one of ``LAYOUTS``) into ``path``."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    if layout == "llama_base":
        config = AutoConfig.for_model("llama", **TEXT, tie_word_embeddings=True)
        base = AutoModel.from_config(config, dtype=torch.float32)
        _randomize(base, 1)
        base.save_pretrained(path)
        return path
    config = AutoConfig.for_model("gemma3", text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _randomize(model, 0)
    model.save_pretrained(path)
    if layout == "gemma3_hub":
        tensors = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
        for f in path.glob("*.safetensors*"):
            f.unlink()
        inner = "vision_tower.vision_model."
        hub = {
            inner + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k: v
            for k, v in tensors.items()
        }
        save_file(hub, path / "model.safetensors", metadata={"format": "pt"})
    return path
