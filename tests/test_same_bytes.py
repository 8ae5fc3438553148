"""Guard rail for restructuring: fixed conversions give the very bytes recorded in ``fixtures/slice_hashes.json``.

Each case converts (or re-shards, or consolidates) a seeded tiny checkpoint and compares every tensor slice's xxh3
with the recorded one: dense tp 2/3/4, biases, renames, MoE (fused experts, packed rowwise), expert parallel,
replicated KV heads, re-sharding and consolidation. The hashes are of tensor bytes only, so a change to headers or
manifest fields does not touch them; a change to which bytes land where does.

Record again (only when a change of bytes is intended): ``python -m tests.test_same_bytes --record``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash

FIXTURE = Path(__file__).parent / "fixtures" / "slice_hashes.json"

# case name -> (checkpoint kind, overrides, steps); a step is ("convert", tp, options), ("reshard", tp, options)
# or ("consolidate",), each applied to the previous step's output.
CASES: dict[str, tuple[str, dict[str, Any], list[tuple[Any, ...]]]] = {
    "llama-tp2": ("llama", {}, [("convert", 2, {})]),
    "llama_h24-tp3": ("llama_h24", {}, [("convert", 3, {})]),
    "llama_mha8-tp4": ("llama_mha8", {}, [("convert", 4, {})]),
    "llama_tied-tp4": ("llama_tied", {"num_attention_heads": 8, "num_key_value_heads": 4}, [("convert", 4, {})]),
    "qwen2-tp2": ("qwen2", {}, [("convert", 2, {})]),
    "gpt_neox-tp2": ("family_gpt_neox", {}, [("convert", 2, {})]),
    "phi3-tp2": ("family_phi3", {}, [("convert", 2, {})]),
    "qwen3_moe-tp2": ("family_qwen3_moe", {}, [("convert", 2, {})]),
    "qwen3_moe-tp4": ("family_qwen3_moe", {"num_key_value_heads": 4}, [("convert", 4, {})]),
    "mixtral-tp2": ("family_mixtral", {}, [("convert", 2, {})]),
    "aria_text-tp2": ("family_aria_text", {}, [("convert", 2, {})]),
    "qwen3_moe-ep2": ("family_qwen3_moe", {}, [("convert", 2, {"ep": 2})]),
    "llama_gqa8-kv2-tp4-replicated": (
        "llama_gqa8",
        {"num_key_value_heads": 2},
        [("convert", 4, {"replicate_kv": True})],
    ),
    "llama_gqa8-kv2-tp8-to-tp4": (
        "llama_gqa8",
        {"num_key_value_heads": 2},
        [("convert", 8, {"replicate_kv": True}), ("reshard", 4, {})],
    ),
    "llama_h24-tp3-to-tp4": ("llama_h24", {}, [("convert", 3, {}), ("reshard", 4, {})]),
    "llama_h24-tp4-to-tp6": ("llama_h24", {}, [("convert", 4, {}), ("reshard", 6, {})]),
    "qwen3_moe-tp4-to-tp2": ("family_qwen3_moe", {"num_key_value_heads": 4}, [("convert", 4, {}), ("reshard", 2, {})]),
    "aria_text-tp2-to-tp1": ("family_aria_text", {}, [("convert", 2, {}), ("reshard", 1, {})]),
    "qwen3_moe-ep2-to-ep4": (
        "family_qwen3_moe",
        {"num_key_value_heads": 4},
        [("convert", 2, {"ep": 2}), ("reshard", 4, {"ep": 4})],
    ),
    "mixtral-tp2-consolidated": ("family_mixtral", {}, [("convert", 2, {}), ("consolidate",)]),
    "gpt_neox-tp2-consolidated": ("family_gpt_neox", {}, [("convert", 2, {}), ("consolidate",)]),
    "llama_gqa8-kv2-tp4-replicated-consolidated": (
        "llama_gqa8",
        {"num_key_value_heads": 2},
        [("convert", 4, {"replicate_kv": True}), ("consolidate",)],
    ),
}


def run_case(name: str, root: Path) -> dict[str, list[str]]:
    """Run one case in ``root``; return ``{tensor: [xxh3 of each rank's slice]}`` of its final output."""
    import reshard
    from reshard.manifests import read_manifest
    from tests.helpers.checkpoints import make_checkpoint

    kind, overrides, steps = CASES[name]
    current = make_checkpoint(kind, root / "src", **overrides)
    for index, step in enumerate(steps):
        out = root / f"step{index}"
        if step[0] == "consolidate":
            from reshard.commands.consolidate import consolidate

            consolidate(current, out, progress=False, max_shard_bytes=60_000)
        else:
            reshard.convert(current, out, tp=step[1], progress=False, **step[2])
        current = out
    if steps[-1][0] == "consolidate":
        return _checkpoint_hashes(current)
    manifest = read_manifest(current)
    return {t.name: [s.xxh3 for s in t.slices] for t in manifest.tensors}


def _checkpoint_hashes(folder: Path) -> dict[str, list[str]]:
    """Each tensor of a safetensors checkpoint folder, hashed from the file's bytes (independently of reshard)."""
    import struct

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header.pop("__metadata__", None)
        for tensor, info in header.items():
            begin, end = info["data_offsets"]
            out[tensor] = [xxhash.xxh3_128(data[8 + length + begin : 8 + length + end]).hexdigest()]
    return dict(sorted(out.items()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bytes_are_the_recorded_ones(tmp_path: Path, name: str):
    recorded = json.loads(FIXTURE.read_text())[name]
    assert run_case(name, tmp_path) == recorded


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    results = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as folder:
            results[case] = run_case(case, Path(folder))
            print(case, len(results[case]), "tensors")
    FIXTURE.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
