"""Expert fusion: per-expert checkpoint tensors ↔ the fused tensors transformers builds at load.

Hub MoE checkpoints store one tensor per expert (``mlp.experts.3.gate_proj.weight``); transformers 5.x stacks them
at load (``MergeModulelist(dim=0)``) and concatenates gate and up (``Concatenate(dim=1)``) into
``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, and shards those. In row-major order a fused
tensor is its parts one after another (gate_0, up_0, gate_1, up_1, ...), so fusing is placing each part's chunks
at its offset, and splitting is taking each part's byte range back: no fused tensor is ever built in memory.
"""

from __future__ import annotations

import dataclasses
import re

from reshard.manifests.chunks import StoredTensor, remapped, shifted
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import PlanError, SourceError
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import FusedTensor, Transforms
from reshard.transforms import Context, Records, Table

SUPPORTED_OPERATIONS = (frozenset({"MergeModulelist"}), frozenset({"MergeModulelist", "Concatenate"}))
KINDS = ("fused",)


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    """Each of the model type's per-expert converters fused (``forward``)."""
    table, fused = forward(table, context.converters)
    return table, {"fused": fused}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    return reverse(table, records.fused or {})


def replays(converter: ConverterRecord) -> bool:
    """A per-expert ``MergeModulelist`` (with ``Concatenate(dim=1)`` of gate and up)."""
    return converter.kind == "WeightConverter" and converter.operation_names in SUPPORTED_OPERATIONS


def _pattern(source: str) -> re.Pattern[str]:
    """A converter's source in transformers' dialect (``mlp.experts.*.gate_proj.weight``, or with escaped dots,
    ``\\.experts.*.w1.weight``) → a regex capturing the expert index (``*`` is a number), dots literal."""
    parts = source.replace("\\.", ".").split("*")
    return re.compile(r"(\d+)".join(re.escape(part) for part in parts) + "$")


def forward(table: Table, converters: tuple[ConverterRecord, ...]) -> tuple[Table, dict[str, FusedTensor]]:
    """The table with each converter's per-expert tensors replaced by the fused tensor, and what was fused."""
    remaining = dict(table)
    fused: dict[str, FusedTensor] = {}
    for converter in converters:
        patterns = [_pattern(s) for s in converter.sources]
        if any(pattern.groups != 1 for pattern in patterns):  # not per-expert tensors (Chunk, Concatenate, ...)
            if matched := [name for name in remaining if any(p.search(name) for p in patterns)]:
                raise PlanError(
                    f"tensor {matched[0]!r}: reshard cannot replay transformers' converter {converter.to_json()}"
                )
            continue
        groups: dict[str, dict[int, dict[int, str]]] = {}  # prefix -> expert -> part -> checkpoint name
        for name in list(remaining):
            for part, pattern in enumerate(patterns):
                if match := pattern.search(name):
                    groups.setdefault(name[: match.start()], {}).setdefault(int(match.group(1)), {})[part] = name
        if not groups:
            continue
        if (
            converter.operation_names not in SUPPORTED_OPERATIONS
            or len(converter.targets) != 1
            or converter.kind != "WeightConverter"
        ):
            example = next(iter(next(iter(groups.values())).values()))[0]
            raise PlanError(f"tensor {example!r}: reshard cannot replay transformers' converter {converter.to_json()}")
        for prefix, experts in sorted(groups.items()):
            target = prefix + converter.targets[0]
            names = _ordered_parts(target, experts, len(converter.sources))
            remaining[target] = _fuse(target, [remaining[n] for n in names], len(experts), len(converter.sources))
            fused[target] = FusedTensor(tuple((n, remaining[n].nbytes) for n in names))
            for name in names:
                del remaining[name]
    return remaining, fused


def reverse(table: Table, fused: dict[str, FusedTensor]) -> Table:
    """The table with each fused tensor split back into the per-expert tensors it was made of."""
    out: Table = {}
    for name, tensor in table.items():
        record = fused.get(name)
        if record is None:
            out[name] = tensor
            continue
        if len(tensor.shape) < 2 or len(record.parts) % tensor.shape[0]:
            raise SourceError(f"{name}: {len(record.parts)} fused parts do not split over {tensor.shape[0]} experts")
        row = row_bytes(tensor.dtype, tensor.shape, 1, name)
        start = 0
        for key, nbytes in record.parts:
            if nbytes % row:
                raise SourceError(f"{name}: part {key!r} of {nbytes} bytes is not whole rows of {row} bytes")
            chunks = remapped(tensor.chunks, [(0, start, nbytes)])
            out[key] = StoredTensor(key, tensor.dtype, (nbytes // row, *tensor.shape[2:]), chunks)
            start += nbytes
        if start != tensor.nbytes:
            raise SourceError(f"{name}: its parts hold {start} bytes, the fused tensor {tensor.nbytes}")
    return out


def _ordered_parts(target: str, experts: dict[int, dict[int, str]], parts: int) -> list[str]:
    """Checkpoint names in fused order (expert-major, then part), every expert with every part."""
    if sorted(experts) != list(range(len(experts))):
        raise SourceError(f"{target}: expert indices {sorted(experts)} are not 0..{len(experts) - 1}")
    names: list[str] = []
    for index in range(len(experts)):
        if sorted(experts[index]) != list(range(parts)):
            raise SourceError(f"{target}: expert {index} lacks some of its {parts} parts")
        names.extend(experts[index][part] for part in range(parts))
    return names


def _fuse(target: str, tensors: list[StoredTensor], experts: int, parts: int) -> StoredTensor:
    """``[E, sum of the parts' rows, ...]`` whose bytes are the parts' one after another."""
    first = tensors[0]
    for tensor in tensors:
        if tensor.dtype != first.dtype or len(tensor.shape) != len(first.shape) or tensor.shape[1:] != first.shape[1:]:
            raise SourceError(f"{target}: tensor {tensor.name!r} does not match the shape/dtype of {first.name!r}")
    rows = sum(t.shape[0] for t in tensors[:parts])
    for index in range(experts):
        expert_rows = sum(t.shape[0] for t in tensors[index * parts : (index + 1) * parts])
        if expert_rows != rows:
            raise SourceError(f"{target}: expert {index} has {expert_rows} rows, expert 0 has {rows}")
    chunks, position = [], 0
    for tensor in tensors:
        chunks.extend(shifted(tensor.chunks, position))
        position += tensor.nbytes
    return dataclasses.replace(first, name=target, shape=(experts, rows, *first.shape[1:]), chunks=tuple(chunks))
