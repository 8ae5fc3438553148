"""Interleaved rows: transformers' ``Interleave(dim)`` converter (inkling2's ``w13_weight`` → ``gate_up_proj``).

The checkpoint stores each expert's gate and up rows alternating (gate_0, up_0, gate_1, up_1, ...); at load
transformers cuts each rank's slice of the checkpoint tensor first and then de-interleaves it locally, so rank ``r``
holds its gate rows, then its up rows (a block of ``2I / tp`` rows, its half of the gate and its half of the up). The
model tensor the artifact records is therefore the checkpoint tensor with every such block de-interleaved: its
colwise slices are exactly transformers' shards, and its blocks (``Interleaved.blocks``) depend on the tp. Along
``dim`` a block's even rows are every other row, so each half of a block is one strided move
(``chunks.StridedMove``): forward gathers them, reverse spreads them back, and no row is listed on its own.

Example (one expert, 4 rows of 2 float32: ``g0 u0 g1 u1`` → ``g0 g1 u0 u1`` at tp 1, and back):
    >>> from reshard.manifests.chunks import contiguous
    >>> table = {"w13": StoredTensor("w13", "F32", (1, 4, 2), contiguous("a", 0, 32))}
    >>> record = Interleaved("w13", 1, (4,))
    >>> fused = forward(table, {"gate_up": record})["gate_up"]
    >>> [(c.offset, c.start, c.count, c.stride, c.file_stride) for c in fused.chunks]
    [(0, 0, 2, 8, 16), (8, 16, 2, 8, 16)]
    >>> reverse({"gate_up": fused}, {"gate_up": record})["w13"].shape
    (1, 4, 2)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

from reshard.manifests.chunks import StoredTensor, StridedMove, strided_moved
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import ShardabilityError, SourceError
from reshard.manifests.layout import placement_for, rank_ranges
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import Interleaved, Transforms
from reshard.transforms import Context, Records, Table

Blocks = Callable[[str, tuple[int, ...], int], tuple[int, ...]]
"""(model tensor name, shape, dim) → the rows of ``dim`` in each block transformers de-interleaves."""
KINDS = ("interleaved",)


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    """Each replayed ``Interleave``'s tensor de-interleaved in the blocks of ``context.tp``. Re-sharding has the
    artifact's records instead of the converters: the same tensors, their blocks at the new tp."""
    blocks = blocks_for(context.style, context.tp)
    if context.recorded is None:
        interleaved = records(table, context.converters, blocks)
    else:
        interleaved = {
            name: dataclasses.replace(r, blocks=blocks(name, table[r.source].shape, r.dim))
            for name, r in (context.recorded.interleaved or {}).items()
        }
    return forward(table, interleaved), {"interleaved": interleaved}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    return reverse(table, records.interleaved)


def replays(converter: ConverterRecord) -> bool:
    """One ``Interleave`` (not its inverse) of one checkpoint tensor into one model tensor."""
    if converter.kind != "WeightConverter" or len(converter.operations) != 1:
        return False
    operation, arguments = converter.operations[0]
    return (
        operation == "Interleave"
        and not arguments.get("inverse")
        and isinstance(arguments.get("dim"), int)
        and len(converter.sources) == len(converter.targets) == 1
        and not any("*" in p for p in (*converter.sources, *converter.targets))
    )


def records(table: Table, converters: tuple[ConverterRecord, ...], blocks: Blocks) -> dict[str, Interleaved]:
    """What each replayed ``Interleave`` does to the table's tensors: model name → record. A key matches where
    transformers' search matches it (the source ends on a name boundary: ``w13_weight`` is not ``w13_weight_scale``),
    and its model name replaces the matched text with the target (renames are applied first)."""
    out: dict[str, Interleaved] = {}
    for converter in converters:
        if not replays(converter):
            continue
        dim = int(converter.operations[0][1]["dim"])
        pattern = re.compile(re.escape(converter.sources[0].replace("\\.", ".")) + r"(?!\w)")
        target = converter.targets[0].replace("\\.", ".")
        for name, tensor in table.items():
            if match := pattern.search(name):
                model_name = name[: match.start()] + target + name[match.end() :]
                if dim >= len(tensor.shape):
                    raise SourceError(f"{name}: {list(tensor.shape)} has no dim {dim} to de-interleave")
                out[model_name] = Interleaved(name, dim, blocks(model_name, tensor.shape, dim))
    return out


def forward(table: Table, interleaved: dict[str, Interleaved]) -> Table:
    """The table with each record's checkpoint tensor replaced by its model tensor, every block de-interleaved."""
    out = dict(table)
    for name, record in interleaved.items():
        tensor = out.pop(record.source)
        out[name] = dataclasses.replace(tensor, name=name, chunks=strided_moved(tensor.chunks, _moves(tensor, record)))
    return out


def reverse(table: Table, interleaved: dict[str, Interleaved] | None) -> Table:
    """The table with each model tensor replaced by its checkpoint tensor, every block interleaved again."""
    out = dict(table)
    for name, record in (interleaved or {}).items():
        tensor = out.pop(name)
        back = [
            StridedMove(m.source, m.to, m.length, m.count, m.source_stride, m.to_stride) for m in _moves(tensor, record)
        ]
        out[record.source] = dataclasses.replace(tensor, name=record.source, chunks=strided_moved(tensor.chunks, back))
    return out


def _moves(tensor: StoredTensor, record: Interleaved) -> list[StridedMove]:
    """Checkpoint → model: in every block of every outer index, row ``2k + h`` goes to row ``h * block / 2 + k``."""
    shape, dim = tensor.shape, record.dim
    if dim >= len(shape) or sum(record.blocks) != shape[dim] or any(b % 2 for b in record.blocks):
        raise SourceError(f"{tensor.name}: blocks {list(record.blocks)} do not de-interleave {list(shape)}")
    row = row_bytes(tensor.dtype, shape, dim, tensor.name)
    moves = []
    for outer in range(math.prod(shape[:dim])):
        start = outer * shape[dim]
        for block in record.blocks:
            for half in (0, 1):
                to, source = (start + half * block // 2) * row, (start + half) * row
                moves.append(StridedMove(to, source, row, block // 2, row, 2 * row))
            start += block
    return moves


def blocks_for(styles: Callable[[str], str | None], tp: int) -> Blocks:
    """The blocks transformers de-interleaves at ``tp``: each rank's slice of ``dim`` when the tensor's style cuts
    ``dim`` over the tp ranks, else the whole dim (expert parallelism cuts whole experts). Each must have an even
    number of rows, or transformers' own load fails (and gate and up rows would mix): a ``ShardabilityError``."""

    def blocks(name: str, shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
        placement = placement_for(styles(name), name, len(shape))
        if placement.mesh != "tp" or placement.dim != dim or not placement.is_sharded:
            found: tuple[int, ...] = (shape[dim],)
        else:
            ranges = [rank_ranges(placement, shape, tp, rank) for rank in range(tp)]
            if any(len(r) > 1 for r in ranges):
                raise ShardabilityError(f"{name}: a strided placement of interleaved rows cannot be replayed")
            found = tuple(b - a for r in ranges for a, b in r)
        if any(rows % 2 for rows in found):
            raise ShardabilityError(
                f"{name}: transformers de-interleaves each rank's {list(found)} rows of dim {dim} (Interleave), "
                f"which must be even; choose a tp that divides {shape[dim] // 2} (tp={tp})"
            )
        return found

    return blocks
