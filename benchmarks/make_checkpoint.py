"""Write a random-weight checkpoint with SmolLM2-1.7B's public shapes, laid out like the Hub's.

bf16 weights (about 3.42 GB at 24 layers), saved by transformers' ``save_pretrained`` into 4 safetensors shards
plus ``model.safetensors.index.json``. Deterministic for a given seed. The model is built on the meta device and
each parameter materialized and filled in place, so peak memory is about one copy of the weights.

    python benchmarks/make_checkpoint.py OUT [--layers N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

FULL_LAYERS = 24
FULL_SHARD_BYTES = 1_000_000_000  # "1GB": 4 shards at full size
SHARDS = 4
INDEX_NAME = "model.safetensors.index.json"

SMOLLM2_1_7B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": FULL_LAYERS,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 130000.0,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def make_smollm2_checkpoint(out: Path, layers: int = FULL_LAYERS, seed: int = 0) -> Path:
    """Create the checkpoint in ``out`` unless a complete one with ``layers`` layers is already there.

    Written into a hidden ``.NAME.partial`` folder and renamed into place, so ``out`` only ever holds a complete
    checkpoint. Raises ``FileExistsError`` if ``out`` holds something else.
    """
    out = Path(out)
    if is_complete(out):
        found = json.loads((out / "config.json").read_text())["num_hidden_layers"]
        if found != layers:
            raise FileExistsError(f"{out}: holds a {found}-layer checkpoint, not {layers} layers")
        return out
    if out.exists():
        raise FileExistsError(f"{out}: exists but is not a complete checkpoint; remove it first")
    staging = out.resolve().parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    _save(staging, layers, seed)
    os.replace(staging, out)
    return out


def is_complete(out: Path) -> bool:
    """True if ``out`` has config.json, the index and every shard it names, each shard as long as its header says."""
    index = out / INDEX_NAME
    if not (out / "config.json").is_file() or not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return bool(shards) and all(_shard_is_whole(out / name) for name in shards)
    except (OSError, ValueError, KeyError):
        return False


def _shard_is_whole(path: Path) -> bool:
    with open(path, "rb") as handle:
        header_len: int = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    end: int = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + header_len + end


def _save(folder: Path, layers: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_1_7B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied parameter is listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings must stay tied"
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    full = total + (FULL_LAYERS - layers) * _layer_bytes(model)
    # Scale the shard size with the layer count so a smoke checkpoint is sharded much the same way.
    shard_bytes = FULL_SHARD_BYTES if layers == FULL_LAYERS else max(1, FULL_SHARD_BYTES * total // full)
    model.save_pretrained(folder, max_shard_size=shard_bytes)
    if not (folder / INDEX_NAME).is_file():
        raise RuntimeError(f"{folder}: save_pretrained wrote a single file; expected {SHARDS} shards and an index")


def _layer_bytes(model: Any) -> int:
    if not model.model.layers:
        return 0
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (fewer for a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    started = time.perf_counter()
    existed = is_complete(args.out)
    out = make_smollm2_checkpoint(args.out, args.layers, args.seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    verb = "kept existing" if existed else f"wrote in {time.perf_counter() - started:.1f}s"
    print(f"{out}: {size / 1e9:.2f} GB, {len(list(out.glob('*.safetensors')))} shards ({verb})")


if __name__ == "__main__":
    main()
