"""The one order the transforms run in, and the loops over it: forward (convert), reverse (consolidate), and both
for the transforms whose records follow the tp (re-shard).

Forward order: ``renames`` (with a ``PrefixChange`` that removes a prefix, and inkling2's index-shifting one as
literal rules), ``row_blocks`` (dim-0 ``Concatenate``/``Chunk``), ``interleave`` (gate/up rows de-interleaved per
rank block), ``experts`` (per-expert tensors fused), ``kv_heads`` (KV heads replicated for the tp).
"""

from __future__ import annotations

from reshard.manifests.records import KINDS
from reshard.manifests.transforms import Transforms
from reshard.transforms import Context, Table, Transform, experts, interleave, kv_heads, renames, row_blocks

CHAIN: tuple[Transform, ...] = (renames, row_blocks, interleave, experts, kv_heads)


def follows_tp(transform: Transform) -> bool:
    """Whether the transform's records were made for the tp: re-sharding undoes it and applies it again."""
    return any(KINDS[kind].follows_tp for kind in transform.KINDS)


def forward(table: Table, context: Context) -> tuple[Table, Transforms]:
    """The checkpoint's tensors as the model's, every transform applied in order, and the records of all."""
    records: dict[str, object] = {}
    for transform in CHAIN:
        table, made = transform.apply(table, context)
        records.update(made)
    return table, Transforms(records)


def reverse(table: Table, records: Transforms, context: Context) -> tuple[Table, dict[str, str]]:
    """The checkpoint's tensors back, every transform undone last first; and for each, the tensor of ``table`` it
    comes from (a fused part its fused tensor, a renamed key its model name: consolidation cuts it as that one)."""
    came_from = {name: name for name in table}
    for transform in reversed(CHAIN):
        made = records.made_from(transform.KINDS, list(table))
        table = transform.undo(table, records, context)
        back: dict[str, str] = {}
        for name, sources in made.items():
            for source in sources:
                back.setdefault(source, came_from.get(name, name))
        came_from = {name: back.get(name, came_from.get(name, name)) for name in table}
    return table, came_from


def reshard(table: Table, context: Context) -> tuple[Table, Transforms]:
    """An artifact's tensors at a new tp: the transforms that follow the tp undone (last first) with the artifact's
    records (``context.recorded``) and applied again at ``context.tp``; the others' records kept as they are."""
    recorded = context.recorded or Transforms()
    following = [transform for transform in CHAIN if follows_tp(transform)]
    for transform in reversed(following):
        table = transform.undo(table, recorded, context)
    records = dict.fromkeys([kind for transform in following for kind in transform.KINDS])
    for transform in following:
        table, made = transform.apply(table, context)
        records.update(made)
    return table, recorded.replaced(records)
