"""The manifest's record of what was done to the checkpoint's tensors (its ``options``), as typed records.

Each record is written by the forward half of a transform (``reshard/transforms/``) and read by its reverse half
(consolidate, re-shard) and by the runtime: ``key_renames`` (transformers' load-time renames, e.g. gpt_neox's
``embed_out`` → ``lm_head``), ``fused`` (per-expert checkpoint tensors stacked into fused ones),
``replicate_kv`` (KV heads duplicated so that every rank holds whole heads), ``concatenated`` (checkpoint tensors
joined along dim 0 into one model tensor, transformers' ``Concatenate(dim=0)``) and ``chunked`` (one checkpoint
tensor cut along dim 0 into several model tensors, ``Chunk(dim=0)``) and ``interleaved`` (a checkpoint tensor whose
rows alternate gate, up, de-interleaved per rank as transformers' ``Interleave`` does at load), and ``renamed``
(checkpoint keys renamed at load, transformers' renamings and base-model prefix as its loader applied them: name
before any converter -> the checkpoint's own key; older manifests record ``key_renames`` rules instead).

Example:
    >>> Transforms.from_json({"replicate_kv": {"original_kv_heads": 2, "replicated_kv_heads": 4, "head_dim": 16}})
    ... # doctest: +ELLIPSIS
    Transforms(key_renames=(), fused=None, replicate_kv=KvReplication(original=2, replicated=4, head_dim=16), ...)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reshard.manifests.errors import ManifestError, ReshardError

RenameRules = tuple[tuple[str, str], ...]
_LITERAL_PATTERN = re.compile(r"\^?(?:\w|\\\.|\.)+")


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


@dataclass(frozen=True)
class Transforms:
    """Everything a conversion did to the checkpoint's tensors besides slicing them (empty: nothing)."""

    key_renames: tuple[tuple[str, str], ...] = ()
    fused: dict[str, FusedTensor] | None = None
    replicate_kv: KvReplication | None = None
    concatenated: dict[str, RowBlocks] | None = None  # model tensor -> the checkpoint tensors joined into it
    chunked: dict[str, RowBlocks] | None = None  # checkpoint tensor -> the model tensors cut from it
    interleaved: dict[str, Interleaved] | None = None  # model tensor -> the interleaved checkpoint tensor
    renamed: dict[str, str] | None = None  # name before any converter -> the checkpoint's key

    def source_key(self, name: str) -> str:
        """The checkpoint's key of a name before any converter (a model tensor, or a part of a fused one)."""
        if self.renamed and name in self.renamed:
            return self.renamed[name]
        return checkpoint_key(name, self.key_renames)

    def checkpoint_keys(self, names: list[str]) -> list[str]:
        """The source checkpoint's own keys for the model's tensor ``names``: fused tensors split into their parts,
        renames undone (what ``from_pretrained`` would have read, and what ``save_pretrained`` writes back)."""
        cut_from = {part: key for key, blocks in (self.chunked or {}).items() for part, _ in blocks.parts}
        keys: list[str] = []
        for name in names:
            fused = self.fused.get(name) if self.fused else None
            joined = self.concatenated.get(name) if self.concatenated else None
            if fused is not None:
                keys.extend(self.source_key(key) for key, _ in fused.parts)
            elif self.interleaved and name in self.interleaved:
                keys.append(self.source_key(self.interleaved[name].source))
            elif joined is not None:
                keys.extend(self.source_key(key) for key, _ in joined.parts)
            elif name in cut_from:
                keys.append(self.source_key(cut_from[name]))
            else:
                keys.append(self.source_key(name))
        return list(dict.fromkeys(keys))  # the parts cut from one checkpoint tensor name it once

    def problem(self, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[str, str] | None:
        """The first way the row-block records disagree with the manifest's ``tensors`` (name -> dtype, shape), as
        ``(field path, message)``, or None: every named model tensor exists, the rows add up, and parts cut from one
        checkpoint tensor have its dtype and trailing shape."""
        for name, blocks in sorted((self.concatenated or {}).items()):
            path = f"options.concatenated.{name}"
            if name not in tensors:
                return path, f"{name!r} is not a tensor of this manifest"
            shape = tensors[name][1]
            if not shape or sum(rows for _, rows in blocks.parts) != shape[0]:
                return path, f"parts of {sum(r for _, r in blocks.parts)} rows do not make {name!r} {list(shape)}"
            if clash := [key for key, _ in blocks.parts if key in tensors]:
                return path, f"part {clash[0]!r} is also a tensor of this manifest"
        for name, record in sorted((self.interleaved or {}).items()):
            path = f"options.interleaved.{name}"
            if name not in tensors:
                return path, f"{name!r} is not a tensor of this manifest"
            shape = tensors[name][1]
            if record.dim >= len(shape) or sum(record.blocks) != shape[record.dim]:
                return f"{path}.blocks", f"blocks of {list(record.blocks)} rows do not cover {name!r} {list(shape)}"
            if record.source in tensors:
                return f"{path}.source", f"{record.source!r} is a tensor of this manifest, not a checkpoint tensor"
        if problem := self._renamed_problem(tensors):
            return problem
        owners: dict[str, str] = {}
        for key, blocks in sorted((self.chunked or {}).items()):
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

    def _renamed_problem(self, tensors: dict[str, Any]) -> tuple[str, str] | None:
        """Renamed names must be names of this conversion (a tensor, or a converter's part), and the checkpoint
        keys they give back one each, none of them another name's that stays as it is."""
        if not self.renamed:
            return None
        names = set(tensors)
        names.update(key for record in (self.fused or {}).values() for key, _ in record.parts)
        names.update(key for record in (self.concatenated or {}).values() for key, _ in record.parts)
        names.update(record.source for record in (self.interleaved or {}).values())
        names.update(self.chunked or {})
        names.difference_update(
            name for name in list(self.fused or {}) + list(self.concatenated or {}) + list(self.interleaved or {})
        )
        names.difference_update(part for r in (self.chunked or {}).values() for part, _ in r.parts)
        kept = names - set(self.renamed)
        given: dict[str, str] = {}
        for name, key in sorted(self.renamed.items()):
            path = f"options.renamed.{name}"
            if name not in names:
                return path, f"{name!r} is not a tensor of this conversion"
            if key in given:
                return path, f"{name!r} and {given[key]!r} both give back checkpoint key {key!r}"
            if key in kept:
                return path, f"checkpoint key {key!r} is also the name of a tensor that is not renamed"
            given[key] = name
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.renamed:
            out["renamed"] = dict(sorted(self.renamed.items()))
        if self.key_renames:
            out["key_renames"] = [list(rule) for rule in self.key_renames]
        if self.fused:
            out["fused"] = {
                name: [[key, nbytes] for key, nbytes in fused.parts] for name, fused in sorted(self.fused.items())
            }
        if self.replicate_kv:
            out["replicate_kv"] = self.replicate_kv.to_json()
        for field, records in (("concatenated", self.concatenated), ("chunked", self.chunked)):
            if records:
                out[field] = {name: [[part, rows] for part, rows in r.parts] for name, r in sorted(records.items())}
        if self.interleaved:
            out["interleaved"] = {name: record.to_json() for name, record in sorted(self.interleaved.items())}
        return out

    @classmethod
    def from_json(cls, data: Any, origin: str = "manifest.json") -> Transforms:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: options must be an object")
        known = {"key_renames", "fused", "replicate_kv", "concatenated", "chunked", "interleaved", "renamed"}
        if unknown := sorted(set(data) - known):
            raise ManifestError(f"{origin}: options.{unknown[0]} is not a transform this reshard knows")
        renames = data.get("key_renames") or []
        if not isinstance(renames, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(s, str) for s in r) for r in renames
        ):
            raise ManifestError(f"{origin}: options.key_renames must be a list of [pattern, replacement] strings")
        fused = data.get("fused")
        if fused is not None and not _is_fused_record(fused):
            raise ManifestError(f"{origin}: options.fused must map tensor names to [[checkpoint name, bytes], ...]")
        replicate = data.get("replicate_kv")
        blocks: dict[str, dict[str, RowBlocks] | None] = {}
        for field in ("concatenated", "chunked"):
            value = data.get(field)
            if value is not None and not _is_fused_record(value):
                raise ManifestError(f"{origin}: options.{field} must map tensor names to [[tensor name, rows], ...]")
            blocks[field] = {n: RowBlocks(tuple((k, r) for k, r in p)) for n, p in value.items()} if value else None
        renamed = data.get("renamed")
        if renamed is not None and not (
            isinstance(renamed, dict)
            and renamed
            and all(isinstance(k, str) and k and isinstance(v, str) and v and k != v for k, v in renamed.items())
        ):
            raise ManifestError(f"{origin}: options.renamed must map tensor names to other checkpoint keys")
        interleaved = data.get("interleaved")
        if interleaved is not None and not isinstance(interleaved, dict):
            raise ManifestError(f"{origin}: options.interleaved must map tensor names to records")
        return cls(
            key_renames=tuple((a, b) for a, b in renames),
            fused={n: FusedTensor(tuple((k, b) for k, b in p)) for n, p in fused.items()} if fused else None,
            replicate_kv=KvReplication.from_json(replicate, origin) if replicate is not None else None,
            concatenated=blocks["concatenated"],
            chunked=blocks["chunked"],
            interleaved={n: Interleaved.from_json(n, r, origin) for n, r in interleaved.items()}
            if interleaved
            else None,
            renamed=dict(renamed) if renamed else None,
        )


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


def model_key(checkpoint_key: str, rules: RenameRules) -> str:
    """The model parameter name of a checkpoint key, after transformers' renames (regex, replacement) in order."""
    for pattern, target in rules:
        checkpoint_key = re.sub(pattern, target, checkpoint_key)
    return checkpoint_key


def checkpoint_key(model_key: str, rules: RenameRules) -> str:
    """Undo the renames, last first. A literal pattern (``^embed_out\\.``) gives its text back; one with a capturing
    group (``(convolution|sconv)\\.weight(?!_)`` → ``\\1.conv1d.weight``) is reversed as transformers reverses it
    for ``save_pretrained``: its target, the group standing for itself, becomes the pattern (lookarounds dropped)."""
    undo = _undo_all(tuple(rules))
    if undo is None:  # a rule that cannot be undone: raise as that rule is reached
        for pattern, target in reversed(rules):
            model_key = _undo(pattern, target)[1](model_key)
        return model_key
    anywhere, steps = undo
    if not anywhere.search(model_key):  # no rule applies to the key, so none applies after another did nothing
        return model_key
    for step in steps:
        model_key = step(model_key)
    return model_key


@functools.lru_cache(maxsize=64)
def _undo_all(rules: RenameRules) -> tuple[re.Pattern[str], list[Callable[[str], str]]] | None:
    """Every rule's reverse, last first, and one pattern matching wherever any of them could apply (the validator
    undoes every tensor's name: working the rules out per name would cost a second on a large model); ``None``
    if a rule cannot be undone (``checkpoint_key`` then raises on the names it is asked for)."""
    try:
        undone = [_undo(pattern, target) for pattern, target in reversed(rules)]
    except ReshardError:
        return None
    return re.compile("|".join(f"(?:{search.pattern})" for search, _ in undone) or "(?!)"), [f for _, f in undone]


@functools.lru_cache(maxsize=1024)
def _undo(pattern: str, target: str) -> tuple[re.Pattern[str], Callable[[str], str]]:
    """The reverse of one rule: where it applies, and the function of a key that undoes it."""
    anchor = "^" if pattern.startswith("^") else ""
    body = pattern.removeprefix("^")
    if _LITERAL_PATTERN.fullmatch(pattern):
        literal = re.compile(anchor + re.escape(target))
        replacement = body.replace("\\.", ".").replace("\\", "\\\\")
        return literal, lambda key: literal.sub(replacement, key)
    body = re.sub(r"\(\?.+?\)?\)", "", body)  # transformers' process_target_pattern drops lookarounds
    group = re.search(r"\(.+?\)", body)
    parts = body.split(group.group(0), 1) if group else []
    if (
        group is None
        or target.count("\\1") != 1
        or not all(_LITERAL_PATTERN.fullmatch(part) or not part for part in [*parts, *target.split("\\1")])
    ):
        raise ReshardError(f"cannot undo the key rename {pattern!r} -> {target!r} (not a literal pattern)")
    before, after = target.split("\\1")
    head, tail = (part.replace("\\.", ".") for part in parts)
    search = re.compile(anchor + re.escape(before) + group.group(0) + re.escape(after))
    return search, lambda key: search.sub(lambda match: head + match.group(1) + tail, key, count=1)
