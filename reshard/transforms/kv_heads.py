"""KV-head replication: when tp exceeds the KV heads, duplicate them so every rank holds whole heads.

transformers shards ``k_proj``/``v_proj`` colwise regardless and crashes in the first forward when
``num_key_value_heads % tp != 0`` (upstream #48307). Forward: KV head ``h`` is copied ``tp / kv`` times (new head
``j`` is old head ``j // factor``), and the artifact's config says ``num_key_value_heads = tp``; each query group
still attends to the same keys and values, so the model computes what the original computes. Reverse: the first
copy of each head is kept (folded back), and the config gets its own number of KV heads again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from reshard.manifests.chunks import remapped
from reshard.manifests.claims import KV_PROJECTIONS, is_kv_tensor
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import ShardabilityError
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.preflight import text_config
from reshard.manifests.transforms import KvReplication, Transforms
from reshard.transforms import Context, Records, Table

KINDS = ("replicate_kv",)


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    """KV heads replicated as ``context.tp`` needs, when ``context.replicate_kv`` allows it."""
    record = needed(context.config, context.tp) if context.replicate_kv else None
    return (forward(table, record, context.plan) if record else table), {"replicate_kv": record}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    record = records.replicate_kv
    return reverse(table, record, context.plan) if record else table


def replays(converter: ConverterRecord) -> bool:
    """None: transformers has no converter that replicates KV heads."""
    return False


def needed(config: dict[str, Any], tp: int) -> KvReplication | None:
    """The replication a tp needs, or None if the KV heads already divide by tp (or tp does not divide by them)."""
    cfg = text_config(config)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if not heads or not kv or kv % tp == 0 or tp % kv:
        return None
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size") or 0) // heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ShardabilityError("config.json: --replicate-kv needs head_dim (or hidden_size and num_attention_heads)")
    return KvReplication(kv, tp, head_dim)


def forward(table: Table, record: KvReplication, plan: dict[str, str]) -> Table:
    """Every KV tensor with its heads duplicated ``record.factor`` times."""
    return _mapped(table, plan, record, [j // record.factor for j in range(record.replicated)])


def reverse(table: Table, record: KvReplication, plan: dict[str, str]) -> Table:
    """Every KV tensor folded back to the original heads (the first copy of each)."""
    return _mapped(table, plan, record, [h * record.factor for h in range(record.original)])


def _mapped(table: Table, plan: dict[str, str], record: KvReplication, source_heads: list[int]) -> Table:
    """KV tensors whose head ``j`` is head ``source_heads[j]`` of the stored tensor (dim 0 is heads x head_dim)."""
    out = dict(table)
    for name, tensor in table.items():
        if not is_kv_tensor(name, plan):
            continue
        head_bytes = record.head_dim * row_bytes(tensor.dtype, tensor.shape, 0, name)
        moves = [(j * head_bytes, h * head_bytes, head_bytes) for j, h in enumerate(source_heads)]
        shape = (len(source_heads) * record.head_dim, *tensor.shape[1:])
        out[name] = dataclasses.replace(tensor, shape=shape, chunks=remapped(tensor.chunks, moves))
    return out


def with_kv_heads(config: dict[str, Any], kv_heads: int) -> dict[str, Any]:
    """A copy of ``config`` with ``num_key_value_heads`` set (in ``text_config`` for multimodal configs)."""
    updated = json.loads(json.dumps(config))
    target = updated["text_config"] if isinstance(updated.get("text_config"), dict) else updated
    target["num_key_value_heads"] = kv_heads
    return updated


def config_json(config: dict[str, Any]) -> bytes:
    """A config as transformers' ``save_pretrained`` writes it (2-space indent, sorted keys, newline)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


__all__ = [
    "KINDS",
    "KV_PROJECTIONS",
    "apply",
    "config_json",
    "forward",
    "is_kv_tensor",
    "needed",
    "replays",
    "reverse",
    "undo",
    "with_kv_heads",
]
