"""Row blocks: transformers' dim-0 ``Concatenate`` and ``Chunk`` converters of whole tensors, replayed on chunks.

Some checkpoints store as several tensors what the model holds as one: kimi_linear's, olmo_hybrid's and
bailing_hybrid's ``q_conv1d``/``k_conv1d``/``v_conv1d`` become ``conv1d`` at load (``Concatenate(dim=0)``); others
the other way round: hrm_text's ``gqkv_proj`` becomes ``gate_proj``, ``q_proj``, ``k_proj``, ``v_proj``
(``Chunk(dim=0)``, ``torch.chunk``'s sizes). Along dim 0 a row-major tensor is its blocks of rows one after another,
so joining is placing each block's chunks at its byte offset (``chunks.shifted``) and cutting is taking each
block's byte range back (``chunks.remapped``). ``join`` and ``cut`` are each other's reverse: a ``Concatenate`` is
joined forward and cut in reverse, a ``Chunk`` cut forward and joined in reverse. No tensor is built in memory.

Example (a [6, 4] float32 checkpoint tensor cut as ``Chunk(dim=0)`` into 3 model tensors, and joined back):
    >>> from reshard.manifests.chunks import contiguous
    >>> whole = StoredTensor("qkv", "F32", (6, 4), contiguous("a.safetensors", 0, 96))
    >>> parts = cut(whole, [("q", 2), ("k", 2), ("v", 2)])
    >>> parts["k"].shape, [(c.offset, c.length) for c in parts["k"].chunks]
    ((2, 4), [(32, 32)])
    >>> join("qkv", list(parts.values())).shape
    (6, 4)
"""

from __future__ import annotations

import re

from reshard.manifests.chunks import StoredTensor, remapped, shifted
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import SourceError
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import RowBlocks, Transforms
from reshard.transforms import Context, Records, Table

OPERATIONS = ("Concatenate", "Chunk")
KINDS = ("concatenated", "chunked")


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    """The model type's replayed ``Concatenate``s joined and ``Chunk``s cut (``forward``)."""
    table, concatenated, chunked = forward(table, context.converters)
    return table, {"concatenated": concatenated, "chunked": chunked}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    return reverse(table, records.concatenated, records.chunked)


def replays(converter: ConverterRecord) -> bool:
    """A converter of whole tensors this module replays: one ``Concatenate`` of several tensors into one, or one
    ``Chunk`` of a tensor into several, along dim 0, with no expert index (``*``) and no count read from the
    config (``num_shards_attribute``)."""
    if converter.kind != "WeightConverter" or len(converter.operations) != 1:
        return False
    operation, arguments = converter.operations[0]
    if operation not in OPERATIONS or arguments.get("dim") != 0 or arguments.get("num_shards_attribute"):
        return False
    if any("*" in pattern for pattern in (*converter.sources, *converter.targets)):
        return False
    if operation == "Concatenate":  # several sources, one target
        return len(converter.targets) == 1
    return len(converter.sources) == 1  # Chunk: one source, several targets


def forward(
    table: Table, converters: tuple[ConverterRecord, ...]
) -> tuple[Table, dict[str, RowBlocks], dict[str, RowBlocks]]:
    """The table with each replayed ``Concatenate``'s checkpoint tensors joined into its model tensor and each
    ``Chunk``'s checkpoint tensor cut into its model tensors; and what was done: ``(table, concatenated, chunked)``.

    A key matches a source pattern where transformers' search matches it; the model name replaces the matched
    text with the target, as transformers' ``rename_source_key`` does (so renames are applied first)."""
    out = dict(table)
    concatenated: dict[str, RowBlocks] = {}
    chunked: dict[str, RowBlocks] = {}
    for converter in converters:
        if not replays(converter):
            continue
        patterns = [_pattern(source) for source in converter.sources]
        groups: dict[tuple[str, str], dict[int, str]] = {}  # (text before, text after the match) -> source -> key
        for name in out:
            for index, pattern in enumerate(patterns):
                if match := pattern.search(name):
                    groups.setdefault((name[: match.start()], name[match.end() :]), {})[index] = name
                    break
        for (before, after), found in sorted(groups.items()):
            targets = [before + target.replace("\\.", ".") + after for target in converter.targets]
            if len(found) != len(patterns):
                missing = [converter.sources[i] for i in range(len(patterns)) if i not in found]
                raise SourceError(f"{targets[0]}: the checkpoint lacks {missing} of the tensors it is made of")
            if converter.operations[0][0] == "Concatenate":
                parts = [out.pop(found[index]) for index in range(len(patterns))]
                out[targets[0]] = join(targets[0], parts)
                concatenated[targets[0]] = RowBlocks(tuple((part.name, part.shape[0]) for part in parts))
            else:
                whole = out.pop(found[0])
                blocks = list(zip(targets, chunk_rows(whole, len(targets)), strict=True))
                out.update(cut(whole, blocks))
                chunked[whole.name] = RowBlocks(tuple(blocks))
    return out, concatenated, chunked


def reverse(table: Table, concatenated: dict[str, RowBlocks] | None, chunked: dict[str, RowBlocks] | None) -> Table:
    """The checkpoint's tensors back: each concatenated model tensor cut into its parts, and each chunked
    checkpoint tensor joined from its model tensors."""
    out = dict(table)
    for name, record in (concatenated or {}).items():
        out.update(cut(out.pop(name), list(record.parts)))
    for key, record in (chunked or {}).items():
        out[key] = join(key, [out.pop(name) for name, _ in record.parts])
    return out


def join(name: str, parts: list[StoredTensor]) -> StoredTensor:
    """``name``: the ``parts`` one after another along dim 0 (each part's chunks placed at its byte offset)."""
    first = parts[0]
    chunks, position = [], 0
    for part in parts:
        if part.dtype != first.dtype or not part.shape or part.shape[1:] != first.shape[1:]:
            raise SourceError(
                f"{name}: {part.name!r} {part.dtype} {list(part.shape)} does not join {first.name!r} "
                f"{first.dtype} {list(first.shape)} along dim 0"
            )
        chunks.extend(shifted(part.chunks, position))
        position += part.nbytes
    rows = sum(part.shape[0] for part in parts)
    return StoredTensor(name, first.dtype, (rows, *first.shape[1:]), tuple(chunks))


def cut(whole: StoredTensor, blocks: list[tuple[str, int]]) -> Table:
    """The tensors ``blocks`` (name, rows) whose rows, one block after another, are ``whole``'s rows."""
    if not whole.shape or sum(rows for _, rows in blocks) != whole.shape[0]:
        raise SourceError(
            f"{whole.name}: blocks of {[rows for _, rows in blocks]} rows do not cut it ({list(whole.shape)})"
        )
    row = row_bytes(whole.dtype, whole.shape, 0, whole.name)
    out: Table = {}
    start = 0
    for name, rows in blocks:
        chunks = remapped(whole.chunks, [(0, start * row, rows * row)])
        out[name] = StoredTensor(name, whole.dtype, (rows, *whole.shape[1:]), chunks)
        start += rows
    return out


def chunk_rows(whole: StoredTensor, count: int) -> list[int]:
    """The rows of each of ``torch.chunk(whole, count, dim=0)``: ``ceil(n / count)`` each, the last fewer; fewer
    pieces than ``count`` (transformers would leave a model tensor unloaded) is an error."""
    rows = whole.shape[0] if whole.shape else 0
    size = -(-rows // count)
    pieces = [min(size, rows - start) for start in range(0, rows, size)] if size else []
    if len(pieces) != count:
        raise SourceError(f"{whole.name}: {rows} rows do not chunk into {count} tensors as transformers cuts them")
    return pieces


def _pattern(source: str) -> re.Pattern[str]:
    """A converter's source in transformers' dialect (dots as written or escaped) as a regex of literal text that
    ends on a name boundary, as transformers compiles it (``weight`` does not match ``weight_scale``)."""
    literal = source.replace("\\.", ".")
    return re.compile(re.escape(literal) + (r"(?!\w)" if re.search(r"[a-zA-Z0-9]$", literal) else ""))
