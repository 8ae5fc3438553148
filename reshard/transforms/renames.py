"""Key renames: transformers renames checkpoint keys at load (gemma3's ``language_model.model.`` →
``model.language_model.``, gpt_neox's ``embed_out.`` → ``lm_head.``, the base model's prefix added to a checkpoint
saved from the base model), so rank files hold the names of the model's parameters; consolidation gives the
checkpoint's names back.

``keymap`` decides each key's name as transformers' loader does; this module applies it to the table and records
every name that changed (``Transforms.renamed``: name → checkpoint key), which is all the reverse half needs.
Manifests written before that record carry ``key_renames`` rules instead; the reverse half undoes those too.
"""

from __future__ import annotations

import dataclasses

from reshard.manifests import keymap
from reshard.manifests.errors import SourceError
from reshard.manifests.keymap import KeyName
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import Transforms
from reshard.transforms import Context, Records, Table

KINDS = ("renamed", "key_renames")


def apply(table: Table, context: Context) -> tuple[Table, Records]:
    """Every key under its name before any converter (``context.names``); records what changed."""
    table, renamed = forward(table, context.names)
    return table, {"renamed": renamed}


def undo(table: Table, records: Transforms, context: Context) -> Table:
    return reverse(table, records)


def replays(converter: ConverterRecord) -> bool:
    """A renaming ``keymap`` replays (renamings, ``PrefixChange``, inkling2's index-shifting one)."""
    return keymap.replayable(converter)


def forward(table: Table, names: dict[str, KeyName]) -> tuple[Table, dict[str, str]]:
    """Checkpoint names → the names before any converter (``KeyName.renamed``; a key without one keeps its name),
    and the record of what changed. Two keys that would load as one tensor are refused: transformers would keep one
    of them without a word."""
    out: Table = {}
    renamed: dict[str, str] = {}
    for key, tensor in table.items():
        new = names[key].renamed if key in names else key
        if new in out:
            other = renamed.get(new, new)
            raise SourceError(f"checkpoint keys {other!r} and {key!r} both load as {new!r}; keep one of them")
        out[new] = dataclasses.replace(tensor, name=new)
        if new != key:
            renamed[new] = key
    return out, renamed


def reverse(table: Table, options: Transforms) -> Table:
    """Names before any converter → checkpoint names."""
    out: Table = {}
    for name, tensor in table.items():
        key = options.source_key(name)
        out[key] = dataclasses.replace(tensor, name=key)
    return out
