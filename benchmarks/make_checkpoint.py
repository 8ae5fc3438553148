"""Write a random-weight checkpoint with a public model's shapes, laid out like the Hub's.

``dense`` (default): SmolLM2-1.7B, bf16 (about 3.42 GB at 24 layers), saved by transformers' ``save_pretrained``
into 4 safetensors shards plus ``model.safetensors.index.json``. The model is built on the meta device and each
parameter materialized and filled in place, so peak memory is about one copy of the weights.

``moe``: Qwen3-30B-A3B (its Hub ``config.json``: hidden 2048, 32 heads / 4 KV heads of 128, 128 experts, 8 active,
moe_intermediate 768, vocab 151936, untied, bf16) with 2 layers by default (about 3.74 GB; the real model has 48).
Keys are the Hub's per-expert ones (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, which is also what
transformers 5.23's ``save_pretrained`` writes; it fuses them into ``gate_up_proj``/``down_proj`` on load). No model is
built: each tensor is drawn and written straight into its shard (safetensors layout, header first), one tensor in
memory at a time, shards of about 1 GB (4 at 2 layers and 128 experts, scaled with ``--experts``), the Hub's
``model-0000K-of-0000N.safetensors`` names and index. ``--experts`` shrinks the expert count for smoke runs.

Both are deterministic for a given seed.

    python benchmarks/make_checkpoint.py OUT [--model dense|moe] [--layers N] [--experts E] [--seed S]
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

MOE_LAYERS = 2  # of Qwen3-30B-A3B's 48: enough for two layers' worth of experts, 3.74 GB
MOE_EXPERTS = 128
QWEN3_30B_A3B: dict[str, Any] = {  # Qwen/Qwen3-30B-A3B config.json, num_hidden_layers set at write time
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": MOE_EXPERTS,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def make_smollm2_checkpoint(out: Path, layers: int = FULL_LAYERS, seed: int = 0) -> Path:
    """Create the checkpoint in ``out`` unless a complete one with ``layers`` layers is already there.

    Written into a hidden ``.NAME.partial`` folder and renamed into place, so ``out`` only ever holds a complete
    checkpoint. Raises ``FileExistsError`` if ``out`` holds something else.
    """
    if _kept(Path(out), {"num_hidden_layers": layers}):
        return Path(out)
    staging = _staging(Path(out))
    _save(staging, layers, seed)
    os.replace(staging, out)
    return Path(out)


def make_qwen3_moe_checkpoint(out: Path, layers: int = MOE_LAYERS, experts: int = MOE_EXPERTS, seed: int = 0) -> Path:
    """Create the Qwen3-30B-A3B-shaped checkpoint in ``out`` unless a complete one of this size is already there.

    Staged and renamed into place like ``make_smollm2_checkpoint``; raises ``FileExistsError`` the same way.
    """
    if _kept(Path(out), {"num_hidden_layers": layers, "num_experts": experts}):
        return Path(out)
    staging = _staging(Path(out))
    config = {**QWEN3_30B_A3B, "num_hidden_layers": layers, "num_experts": experts}
    tensors = _qwen3_moe_tensors(config)
    total = sum(2 * _numel(shape) for _, shape in tensors)
    full = sum(2 * _numel(shape) for _, shape in _qwen3_moe_tensors({**config, "num_experts": MOE_EXPERTS}))
    shard_bytes = max(1, FULL_SHARD_BYTES * total // full)  # ~4 shards whatever --experts is, like the dense one
    staging.mkdir(parents=True)
    _write_shards(staging, tensors, shard_bytes, seed)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(staging, out)
    return Path(out)


def _kept(out: Path, expected: dict[str, int]) -> bool:
    """True if ``out`` already holds a complete checkpoint of this size; raises if it holds anything else."""
    if is_complete(out):
        found = json.loads((out / "config.json").read_text())
        wrong = {k: found.get(k) for k, v in expected.items() if found.get(k) != v}
        if wrong:
            raise FileExistsError(f"{out}: holds a checkpoint with {wrong}, not {expected}")
        return True
    if out.exists():
        raise FileExistsError(f"{out}: exists but is not a complete checkpoint; remove it first")
    return False


def _staging(out: Path) -> Path:
    staging = out.resolve().parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


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


def _qwen3_moe_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, name and shape, in the order ``save_pretrained`` writes them."""
    hidden, heads, kv, head_dim = (
        config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    moe, experts, vocab = config["moe_intermediate_size"], config["num_experts"], config["vocab_size"]
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)),
            (p + "self_attn.k_norm.weight", (head_dim,)),
        ]
        for expert in range(experts):
            e = f"{p}mlp.experts.{expert}."
            tensors += [(e + "gate_proj.weight", (moe, hidden)), (e + "up_proj.weight", (moe, hidden))]
            tensors += [(e + "down_proj.weight", (hidden, moe))]
        tensors += [(p + "mlp.gate.weight", (experts, hidden))]
        tensors += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return [*tensors, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _write_shards(folder: Path, tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int, seed: int) -> None:
    """Greedy shards of at most ``shard_bytes`` (a bigger tensor alone), each written header first, then the index.

    Norm weights are ones, everything else N(0, 0.02) in bf16, drawn one tensor at a time from one generator.
    """
    import torch

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            end = offset + 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
            offset, weight_map[name] = end, file_name
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
        with open(folder / file_name, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for name, shape in shard:
                tensor = torch.empty(shape, dtype=torch.bfloat16)
                if name.endswith("norm.weight"):
                    tensor.fill_(1.0)
                else:
                    tensor.normal_(0.0, 0.02, generator=generator)
                handle.write(tensor.view(torch.uint8).numpy().data)
    total = sum(2 * _numel(shape) for _, shape in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _layer_bytes(model: Any) -> int:
    if not model.model.layers:
        return 0
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--model", choices=["dense", "moe"], default="dense", help="SmolLM2-1.7B or Qwen3-30B-A3B")
    parser.add_argument("--layers", type=int, help=f"decoder layers [dense {FULL_LAYERS}, moe {MOE_LAYERS}]")
    parser.add_argument("--experts", type=int, default=MOE_EXPERTS, help=f"moe: experts per layer [{MOE_EXPERTS}]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = args.layers if args.layers is not None else FULL_LAYERS if args.model == "dense" else MOE_LAYERS
    if layers < 1 or args.experts < QWEN3_30B_A3B["num_experts_per_tok"]:
        parser.error(f"--layers must be at least 1, --experts at least {QWEN3_30B_A3B['num_experts_per_tok']}")
    started = time.perf_counter()
    existed = is_complete(args.out)
    if args.model == "dense":
        out = make_smollm2_checkpoint(args.out, layers, args.seed)
    else:
        out = make_qwen3_moe_checkpoint(args.out, layers, args.experts, args.seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    verb = "kept existing" if existed else f"wrote in {time.perf_counter() - started:.1f}s"
    print(f"{out}: {size / 1e9:.2f} GB, {len(list(out.glob('*.safetensors')))} shards ({verb})")


if __name__ == "__main__":
    main()
