"""The manifest's record of what was done to the checkpoint's tensors (its ``options``): records keyed by kind.

Each transform (``reshard/transforms/``) writes its records in its forward half and reads them in its reverse half
(consolidate, re-shard); the validator and the runtime read them too. The kinds and what each one means are in
``manifests/records.py``: ``renamed`` (or older manifests' ``key_renames`` rules), ``fused``, ``replicate_kv``,
``concatenated``, ``chunked``, ``interleaved``. This module holds them together (``Transforms``), and the name
functions both halves need (checkpoint keys <-> model names).

Example:
    >>> options = Transforms.from_json({"replicate_kv": {"original_kv_heads": 2, "replicated_kv_heads": 4,
    ...                                                  "head_dim": 16}})
    >>> options.replicate_kv, options.fused
    (KvReplication(original=2, replicated=4, head_dim=16), None)
    >>> options.to_json()["replicate_kv"]["replicated_kv_heads"]
    4
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reshard.manifests.errors import ManifestError, ReshardError
from reshard.manifests.records import (
    KINDS,
    RENAME_KINDS,
    FusedTensor,
    Interleaved,
    KvReplication,
    Origins,
    Problem,
    RecordKind,
    RenameRules,
    RowBlocks,
    Tensors,
)

__all__ = [
    "KINDS",
    "FusedTensor",
    "Interleaved",
    "KvReplication",
    "RecordKind",
    "RowBlocks",
    "Transforms",
    "checkpoint_key",
    "model_key",
]

_LITERAL_PATTERN = re.compile(r"\^?(?:\w|\\\.|\.)+")


@dataclass(frozen=True, init=False)
class Transforms:
    """Everything a conversion did to the checkpoint's tensors besides slicing them: its records by kind (``KINDS``
    order; a kind that did nothing is absent, so an empty ``Transforms`` did nothing). Built as
    ``Transforms({"fused": ...})`` or ``Transforms(fused=...)``."""

    records: dict[str, Any]

    def __init__(self, records: Mapping[str, Any] | None = None, /, **by_kind: Any) -> None:
        given = {**(records or {}), **by_kind}
        if unknown := sorted(set(given) - set(KINDS)):
            raise TypeError(f"{unknown[0]!r} is not a kind of transform record")
        object.__setattr__(self, "records", {kind: given[kind] for kind in KINDS if given.get(kind)})

    def replaced(self, records: Mapping[str, Any]) -> Transforms:
        """These records instead of their kinds' (an empty one removes its kind)."""
        return Transforms({**self.records, **records})

    @property
    def renamed(self) -> dict[str, str] | None:  # name before any converter -> the checkpoint's key
        return self.records.get("renamed")

    @property
    def key_renames(self) -> RenameRules:  # older manifests' rename rules
        return self.records.get("key_renames", ())

    @property
    def fused(self) -> dict[str, FusedTensor] | None:
        return self.records.get("fused")

    @property
    def replicate_kv(self) -> KvReplication | None:
        return self.records.get("replicate_kv")

    @property
    def concatenated(self) -> dict[str, RowBlocks] | None:  # model tensor -> the checkpoint tensors joined into it
        return self.records.get("concatenated")

    @property
    def chunked(self) -> dict[str, RowBlocks] | None:  # checkpoint tensor -> the model tensors cut from it
        return self.records.get("chunked")

    @property
    def interleaved(self) -> dict[str, Interleaved] | None:  # model tensor -> the interleaved checkpoint tensor
        return self.records.get("interleaved")

    def source_key(self, name: str) -> str:
        """The checkpoint's key of a name before any converter (a model tensor, or a part of a fused one)."""
        if self.renamed and name in self.renamed:
            return self.renamed[name]
        return checkpoint_key(name, self.key_renames)

    def made_from(self, kinds: Iterable[str], names: Iterable[str] = ()) -> Origins:
        """What the ``kinds``' transforms made from what: each tensor they made -> the tensors it was made from, in
        order (the first kind that names a tensor wins); with a renames kind, each of ``names`` that is renamed ->
        its checkpoint key."""
        wanted = set(kinds)
        out: Origins = {}
        for kind, record in self.records.items():
            if kind in wanted:
                for made, sources in KINDS[kind].made_from(record).items():
                    out.setdefault(made, sources)
        if wanted.intersection(RENAME_KINDS):
            for name in names:
                if (key := self.source_key(name)) != name:
                    out.setdefault(name, (key,))
        return out

    def checkpoint_keys(self, names: list[str]) -> list[str]:
        """The source checkpoint's own keys for the model's tensor ``names``: fused tensors split into their parts,
        renames undone (what ``from_pretrained`` would have read, and what ``save_pretrained`` writes back)."""
        made = self.made_from(set(KINDS) - set(RENAME_KINDS))
        keys = [self.source_key(source) for name in names for source in made.get(name, (name,))]
        return list(dict.fromkeys(keys))  # the parts cut from one checkpoint tensor name it once

    def problem(self, tensors: Tensors) -> Problem | None:
        """The first way the records disagree with the manifest's ``tensors``, or None: each kind's own check
        (every named model tensor exists, the rows add up, ...), then the renames against all of them."""
        for kind, record in self.records.items():
            if problem := KINDS[kind].problem(record, tensors):
                return problem
        return self._renamed_problem(tensors)

    def _renamed_problem(self, tensors: Tensors) -> Problem | None:
        """Renamed names must be names of this conversion (a tensor, or a converter's part), and the checkpoint
        keys they give back one each, none of them another name's that stays as it is."""
        if not self.renamed:
            return None
        made = [KINDS[kind].made_from(record) for kind, record in self.records.items() if kind not in RENAME_KINDS]
        names = set(tensors)
        names.update(source for origins in made for sources in origins.values() for source in sources)
        names.difference_update(name for origins in made for name in origins)
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
        return {kind: KINDS[kind].write(record) for kind, record in self.records.items()}

    @classmethod
    def from_json(cls, data: Any, origin: str = "manifest.json") -> Transforms:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: options must be an object")
        if unknown := sorted(set(data) - set(KINDS)):
            raise ManifestError(f"{origin}: options.{unknown[0]} is not a transform this reshard knows")
        return cls({kind: KINDS[kind].read(value, origin) for kind, value in data.items() if value is not None})


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
