"""A toy transform (the chain's seam shown, not for use): every 1-D ``norm.weight`` stored with its elements in
reverse order, recorded with the tp it was made for (so re-sharding re-derives it)."""

from __future__ import annotations

import dataclasses

from reshard.manifests.chunks import StoredTensor, remapped
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.safetensors import ITEMSIZES
from reshard.manifests.transforms import Transforms
from reshard.transforms import Context, Records, Table

KINDS = ("toy_flipped",)


def _flipped(tensor: StoredTensor) -> StoredTensor:
    size, count = ITEMSIZES[tensor.dtype], tensor.shape[0]
    moves = [(i * size, (count - 1 - i) * size, size) for i in range(count)]
    return dataclasses.replace(tensor, chunks=remapped(tensor.chunks, moves))


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    names = tuple(sorted(n for n, t in table.items() if n.endswith("norm.weight") and len(t.shape) == 1))
    return {**table, **{n: _flipped(table[n]) for n in names}}, {"toy_flipped": {"tp": context.tp, "names": names}}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    record = records.records.get("toy_flipped")
    return {**table, **{n: _flipped(table[n]) for n in record["names"]}} if record else table


def replays(converter: ConverterRecord) -> bool:
    return False
