"""The kinds of record under a manifest's ``options``, each with its JSON form, checks and meaning.

A transform (``reshard/transforms/``) that records what it did has its record kind here: the record's typed form,
``read`` from JSON with every field checked, ``write``, which tensors the transform made from which (``made_from``:
what consolidation and ``save_pretrained`` follow back to the checkpoint's keys), how the record can disagree with the
manifest's tensors (``problem``, called by the validator) and, when the record was made for the artifact's tp, why a
load at another tp is refused (``follows_tp``). ``Transforms`` (``manifests/transforms.py``) holds the records by kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reshard.manifests.errors import ManifestError

RenameRules = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class KvReplication:
    """KV heads go from ``original`` to ``replicated`` heads of ``head_dim`` rows each (``replicated`` a multiple)."""

    original: int
    replicated: int
    head_dim: int

    @property
    def factor(self) -> int:
        return self.replicated // self.original

    def to_json(self) -> dict[str, int]:
        return {"original_kv_heads": self.original, "replicated_kv_heads": self.replicated, "head_dim": self.head_dim}

    @classmethod
    def from_json(cls, data: Any, origin: str) -> KvReplication:
        fields = ("original_kv_heads", "replicated_kv_heads", "head_dim")
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ManifestError(f"{origin}: options.replicate_kv must be an object with exactly {list(fields)}")
        values = [data[name] for name in fields]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**20 for v in values):
            raise ManifestError(f"{origin}: options.replicate_kv holds a value that is not a positive integer")
        original, replicated, head_dim = values
        if replicated % original:
            raise ManifestError(f"{origin}: options.replicate_kv: {replicated} heads are not copies of {original}")
        return cls(original, replicated, head_dim)


@dataclass(frozen=True)
class FusedTensor:
    """One fused tensor: the checkpoint tensors it was made of, in fused order, with each one's size in bytes."""

    parts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class RowBlocks:
    """A tensor whose dim-0 rows are other tensors' rows one after another: ``parts`` as (name, rows), in order.

    In ``Transforms.concatenated`` the tensor is a model tensor and the parts checkpoint tensors; in
    ``Transforms.chunked`` the other way round. Rows, not bytes, so that the validator can check them against the
    manifest's shapes."""

    parts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Interleaved:
    """A model tensor made from checkpoint tensor ``source`` (rows along ``dim`` alternating a, b, a, b, ...) by
    transformers' ``Interleave(dim)``: within each of ``blocks`` (consecutive runs of rows along ``dim``, one per
    rank that holds a part of ``dim``, else the whole dim) the even rows come first, then the odd ones. transformers
    de-interleaves each rank's local tensor after cutting it, so the blocks are the ranks' slices."""

    source: str
    dim: int
    blocks: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "dim": self.dim, "blocks": list(self.blocks)}

    @classmethod
    def from_json(cls, name: str, data: Any, origin: str) -> Interleaved:
        path = f"{origin}: options.interleaved.{name}"
        if not isinstance(data, dict) or set(data) != {"source", "dim", "blocks"}:
            raise ManifestError(f"{path} must be an object with exactly ['source', 'dim', 'blocks']")
        source, dim, blocks = data["source"], data["dim"], data["blocks"]
        if not isinstance(source, str) or not source:
            raise ManifestError(f"{path}.source must be a tensor name")
        if not _is_count(dim, 0):
            raise ManifestError(f"{path}.dim must be a non-negative integer, got {dim!r}")
        if not isinstance(blocks, list) or not blocks or not all(_is_count(b, 0) and b % 2 == 0 for b in blocks):
            raise ManifestError(f"{path}.blocks must be a list of even row counts, got {blocks!r}")
        return cls(source, dim, tuple(blocks))


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value < 2**40


Tensors = Mapping[str, tuple[str, tuple[int, ...]]]
"""The tensors records are checked against: name -> (dtype, shape)."""
Problem = tuple[str, str]
"""(field path, message)."""
Origins = dict[str, tuple[str, ...]]
"""A tensor a transform made -> the tensors it was made from, in order."""


def _nothing_made(record: Any) -> Origins:
    return {}


def _no_problem(record: Any, tensors: Tensors) -> Problem | None:
    return None


@dataclass(frozen=True)
class RecordKind:
    """How one kind of record under ``options`` is read from JSON (``read(data, origin)``, every field checked: a
    ``ManifestError`` naming the field), written (``write``), which tensors its transform made from which
    (``made_from``), how it can disagree with the manifest's tensors (``problem``), and, for a record made for the
    artifact's tp, why a load at another tp is refused (``follows_tp``, with ``{tp}``; empty if it is not)."""

    read: Callable[[Any, str], Any]
    write: Callable[[Any], Any]
    made_from: Callable[[Any], Origins] = _nothing_made
    problem: Callable[[Any, Tensors], Problem | None] = _no_problem
    follows_tp: str = ""


def _read_renamed(data: Any, origin: str) -> dict[str, str]:
    if not (
        isinstance(data, dict)
        and data
        and all(isinstance(k, str) and k and isinstance(v, str) and v and k != v for k, v in data.items())
    ):
        raise ManifestError(f"{origin}: options.renamed must map tensor names to other checkpoint keys")
    return dict(data)


def _read_key_renames(data: Any, origin: str) -> RenameRules:
    data = data or []
    if not isinstance(data, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(s, str) for s in r) for r in data
    ):
        raise ManifestError(f"{origin}: options.key_renames must be a list of [pattern, replacement] strings")
    return tuple((a, b) for a, b in data)


def _read_fused(data: Any, origin: str) -> dict[str, FusedTensor]:
    if not _is_fused_record(data):
        raise ManifestError(f"{origin}: options.fused must map tensor names to [[checkpoint name, bytes], ...]")
    return {name: FusedTensor(tuple((key, nbytes) for key, nbytes in parts)) for name, parts in data.items()}


def _row_blocks_kind(field: str) -> Callable[[Any, str], dict[str, RowBlocks]]:
    def read(data: Any, origin: str) -> dict[str, RowBlocks]:
        if not _is_fused_record(data):
            raise ManifestError(f"{origin}: options.{field} must map tensor names to [[tensor name, rows], ...]")
        return {name: RowBlocks(tuple((key, rows) for key, rows in parts)) for name, parts in data.items()}

    return read


def _read_interleaved(data: Any, origin: str) -> dict[str, Interleaved]:
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: options.interleaved must map tensor names to records")
    return {name: Interleaved.from_json(name, record, origin) for name, record in data.items()}


def _write_parts(records: dict[str, Any]) -> dict[str, list[list[Any]]]:
    return {name: [[part, count] for part, count in record.parts] for name, record in sorted(records.items())}


def _parts_made(records: dict[str, Any]) -> Origins:
    return {name: tuple(part for part, _ in record.parts) for name, record in records.items()}


def _chunks_made(records: dict[str, RowBlocks]) -> Origins:
    return {part: (key,) for key, record in records.items() for part, _ in record.parts}


def _concatenated_problem(records: dict[str, RowBlocks], tensors: Tensors) -> Problem | None:
    """Every joined tensor exists, its parts' rows add up to its rows, and no part is a tensor as well."""
    for name, blocks in sorted(records.items()):
        path = f"options.concatenated.{name}"
        if name not in tensors:
            return path, f"{name!r} is not a tensor of this manifest"
        shape = tensors[name][1]
        if not shape or sum(rows for _, rows in blocks.parts) != shape[0]:
            return path, f"parts of {sum(r for _, r in blocks.parts)} rows do not make {name!r} {list(shape)}"
        if clash := [key for key, _ in blocks.parts if key in tensors]:
            return path, f"part {clash[0]!r} is also a tensor of this manifest"
    return None


def _chunked_problem(records: dict[str, RowBlocks], tensors: Tensors) -> Problem | None:
    """Every part cut from a checkpoint tensor exists with its rows, cut from one tensor only, and the parts of one
    checkpoint tensor share its dtype and trailing shape."""
    owners: dict[str, str] = {}
    for key, blocks in sorted(records.items()):
        path = f"options.chunked.{key}"
        if key in tensors:
            return path, f"{key!r} is a tensor of this manifest, not a checkpoint tensor cut into several"
        first = tensors.get(blocks.parts[0][0])
        for index, (name, rows) in enumerate(blocks.parts):
            where = f"{path}[{index}]"
            if name not in tensors:
                return where, f"{name!r} is not a tensor of this manifest"
            if name in owners:
                return where, f"{name!r} is cut from {owners[name]!r} as well"
            owners[name] = key
            dtype, shape = tensors[name]
            if not shape or shape[0] != rows:
                return where, f"{rows} rows, but {name!r} is {list(shape)}"
            if first is not None and (dtype != first[0] or shape[1:] != first[1][1:]):
                return where, f"{name!r} {dtype} {list(shape)} does not join {first[0]} {list(first[1])}"
    return None


def _interleaved_problem(records: dict[str, Interleaved], tensors: Tensors) -> Problem | None:
    """Every de-interleaved tensor exists, its blocks cover its dim, and its source is not a tensor as well."""
    for name, record in sorted(records.items()):
        path = f"options.interleaved.{name}"
        if name not in tensors:
            return path, f"{name!r} is not a tensor of this manifest"
        shape = tensors[name][1]
        if record.dim >= len(shape) or sum(record.blocks) != shape[record.dim]:
            return f"{path}.blocks", f"blocks of {list(record.blocks)} rows do not cover {name!r} {list(shape)}"
        if record.source in tensors:
            return f"{path}.source", f"{record.source!r} is a tensor of this manifest, not a checkpoint tensor"
    return None


KINDS: dict[str, RecordKind] = {  # in the order the manifest writes them
    "renamed": RecordKind(_read_renamed, lambda renamed: dict(sorted(renamed.items()))),
    "key_renames": RecordKind(_read_key_renames, lambda rules: [list(rule) for rule in rules]),
    "fused": RecordKind(
        _read_fused,
        lambda fused: {name: [[key, n] for key, n in record.parts] for name, record in sorted(fused.items())},
        _parts_made,
    ),
    "replicate_kv": RecordKind(
        lambda data, origin: KvReplication.from_json(data, origin),
        KvReplication.to_json,
        follows_tp="its KV heads were replicated for tp={tp}",
    ),
    "concatenated": RecordKind(_row_blocks_kind("concatenated"), _write_parts, _parts_made, _concatenated_problem),
    "chunked": RecordKind(_row_blocks_kind("chunked"), _write_parts, _chunks_made, _chunked_problem),
    "interleaved": RecordKind(
        _read_interleaved,
        lambda records: {name: record.to_json() for name, record in sorted(records.items())},
        lambda records: {name: (record.source,) for name, record in records.items()},
        _interleaved_problem,
        follows_tp="its interleaved rows were de-interleaved per rank for tp={tp} (as transformers does)",
    ),
}
RENAME_KINDS = ("renamed", "key_renames")
"""The kinds that rename tensors (``Transforms.source_key``); the others make tensors from others (``made_from``)."""


def _is_fused_record(data: Any) -> bool:
    """``{name: [[name, positive count], ...]}``: a fused tensor's parts and their bytes, or row blocks' rows."""
    return isinstance(data, dict) and all(
        isinstance(name, str)
        and isinstance(parts, list)
        and parts
        and all(
            isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], int)
            and not isinstance(p[1], bool)
            and p[1] > 0
            for p in parts
        )
        for name, parts in data.items()
    )
