"""Transforms of a checkpoint's tensors, each one module with its forward and reverse halves side by side.

A transform changes a tensor table (``{name: StoredTensor}``: names, shapes and chunk lists, never bytes). Every
module here is a ``Transform``: ``apply(table, context)`` is its forward half (the checkpoint's tensors towards the
model's: convert, re-shard) and returns the records of what it did, keyed by kind; ``undo(table, records, context)``
is its reverse half (consolidate, re-shard); ``replays(converter)`` says which of transformers' load-time
converters it replays. ``KINDS`` names the record kinds it writes (``manifests/records.py``);
one whose record was made for the tp (``RecordKind.follows_tp``) is undone and applied again when re-sharding.
``chain.CHAIN`` is the one order they run in: forward in order, reverse in reverse order. A new transform is one
module here and one line in ``CHAIN`` (and its record kind in ``manifests/records.py`` if it records something).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from reshard.manifests.chunks import StoredTensor
from reshard.manifests.keymap import KeyName
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import Transforms

Table = dict[str, StoredTensor]
Records = dict[str, Any]
"""What one transform did, by record kind (an empty record: nothing of that kind)."""


def _no_style(name: str) -> str | None:
    return None


@dataclass(frozen=True)
class Context:
    """What a transform may read besides the table.

    ``config`` is the model's config.json with the checkpoint's own KV heads; ``plan`` the tensor-parallel plan
    (KV heads follow it); ``style`` each model tensor's style at ``tp``; ``converters`` and ``names`` transformers'
    load-time conversions of the model type and each checkpoint key's name (``keymap``); ``replicate_kv`` whether KV
    heads may be replicated; ``recorded`` the artifact's records when re-sharding (a transform whose records follow
    the tp derives its new ones from them, as the checkpoint's converters are not at hand).
    """

    tp: int
    plan: dict[str, str] = field(default_factory=dict)
    style: Callable[[str], str | None] = _no_style
    config: dict[str, Any] = field(default_factory=dict)
    converters: tuple[ConverterRecord, ...] = ()
    names: dict[str, KeyName] = field(default_factory=dict)
    replicate_kv: bool = False
    recorded: Transforms | None = None


class Transform(Protocol):
    """One transform: its record kinds, its forward half and its reverse half (a module here is one)."""

    @property
    def KINDS(self) -> tuple[str, ...]: ...  # the record kinds it writes

    def apply(self, table: Table, context: Context) -> tuple[Table, Records]: ...

    def undo(self, table: Table, records: Transforms, context: Context) -> Table: ...

    def replays(self, converter: ConverterRecord) -> bool: ...  # one of transformers' load-time converters
