"""KV heads fewer than tp: duplicate them so every rank holds whole heads (what TensorRT-LLM and vLLM do).

transformers shards ``k_proj``/``v_proj`` colwise regardless and crashes in the first forward when
``num_key_value_heads % tp != 0`` (upstream #48307). With ``--replicate-kv``, KV head ``h`` is copied ``tp / kv``
times (new head ``j`` is old head ``j // r``), the artifact's config says ``num_key_value_heads = tp``, and each
query group still attends to the same keys and values, so the model computes what the original computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from reshard.plan import generic_name
from reshard.preflight import text_config
from reshard.readers import ColumnSpan, Span, TensorReader

KV_PROJECTIONS = ("k_proj", "v_proj")


@dataclass(frozen=True)
class KvReplication:
    """KV heads go from ``original`` to ``replicated`` heads of ``head_dim`` rows each."""

    original: int
    replicated: int
    head_dim: int

    @property
    def factor(self) -> int:
        return self.replicated // self.original

    def to_json(self) -> dict[str, int]:
        return {"original_kv_heads": self.original, "replicated_kv_heads": self.replicated, "head_dim": self.head_dim}


def kv_replication(config: dict[str, Any], tp: int) -> KvReplication | None:
    """The replication a tp needs, or None if the KV heads already divide by tp (or tp does not divide by them)."""
    cfg = text_config(config)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if not heads or not kv or kv % tp == 0 or tp % kv:
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return KvReplication(kv, tp, head_dim)


def is_kv_tensor(name: str, plan: dict[str, str]) -> bool:
    """A k_proj/v_proj weight or bias that the plan shards colwise (its rows are whole heads)."""
    module = generic_name(name).rpartition(".")[0]
    return module.rpartition(".")[2] in KV_PROJECTIONS and plan.get(module) in ("colwise", "colwise_rep")


def with_kv_heads(config: dict[str, Any], kv_heads: int) -> dict[str, Any]:
    """A copy of ``config`` with ``num_key_value_heads`` set (in ``text_config`` for multimodal configs)."""
    updated = json.loads(json.dumps(config))
    target = updated["text_config"] if isinstance(updated.get("text_config"), dict) else updated
    target["num_key_value_heads"] = kv_heads
    return updated


def config_json(config: dict[str, Any]) -> bytes:
    """A config as transformers' ``save_pretrained`` writes it (2-space indent, sorted keys, newline)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def head_maps(
    names: list[str], plan: dict[str, str], original_kv: int, target_factor: int, stored_factor: int
) -> dict[str, tuple[int, ...]]:
    """For every KV tensor, the stored head each new head copies; empty when no head moves.

    The source stores each original head ``stored_factor`` times (1 for a checkpoint, more for a replicated
    artifact); the output stores it ``target_factor`` times. New head ``j`` is original head ``j // target_factor``.
    """
    if target_factor == stored_factor == 1:
        return {}
    mapping = tuple((j // target_factor) * stored_factor for j in range(original_kv * target_factor))
    return {name: mapping for name in names if is_kv_tensor(name, plan)}


def mapped_shape(shape: tuple[int, ...], mapping: tuple[int, ...] | None, head_dim: int) -> tuple[int, ...]:
    """A KV tensor's shape once its heads are mapped (rows = heads x head_dim)."""
    return shape if mapping is None else (len(mapping) * head_dim, *shape[1:])


@dataclass(frozen=True)
class HeadMapReader:
    """A ``[heads * head_rows, ...]`` tensor whose head ``j`` is head ``source_heads[j]`` of ``base`` (dim 0)."""

    base: TensorReader
    head_rows: int
    source_heads: tuple[int, ...]

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        """The source head's span when the rows lie inside one head, else ``None``."""
        head, offset = divmod(lo, self.head_rows)
        if hi > (head + 1) * self.head_rows:
            return None
        source = self.source_heads[head] * self.head_rows + offset
        return self.base.span(first, count, source, source + hi - lo)

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        """Head boundaries, and wherever the base tensor breaks inside a head."""
        edges = set(range((lo // self.head_rows + 1) * self.head_rows, hi, self.head_rows))
        for position in range(lo, hi, self.head_rows):
            head, offset = divmod(position, self.head_rows)
            stop = min(hi, (head + 1) * self.head_rows)
            source = self.source_heads[head] * self.head_rows + offset
            edges.update(b - source + position for b in self.base.breaks(index, source, source + stop - position))
        return sorted(edge for edge in edges if lo < edge < hi)

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        return None  # sharded on dim 0: never read as whole outer blocks

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        assert first == 0 and count == 1, "a head map is read along dim 0 of a tensor sharded on dim 0"
        row_bytes = len(out) // (hi - lo) if hi > lo else 0
        position = lo
        while position < hi:
            head, offset = divmod(position, self.head_rows)
            stop = min(hi, (head + 1) * self.head_rows)
            source = self.source_heads[head] * self.head_rows + offset
            piece = out[(position - lo) * row_bytes : (stop - lo) * row_bytes]
            self.base.read(0, 1, source, source + stop - position, piece)
            position = stop
