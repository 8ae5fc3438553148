"""Key renames: transformers renames some checkpoint keys at load (gpt_neox's ``embed_out.`` → ``lm_head.``), so
rank files hold the names of the model's parameters; consolidation gives the checkpoint's names back.

A ``PrefixChange`` that removes a prefix (qwen3_5_text's ``model.language_model.`` → ``model.``: a text model read
from its multimodal checkpoint) is one more rename (``prefix_changes``), recorded only where the checkpoint's keys
carry the prefix: a text-only checkpoint has none, and transformers then neither renames at load nor adds the
prefix back at save.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from reshard.manifests.claims import offset_rule, prefix_rule
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.transforms import RenameRules as Rules
from reshard.manifests.transforms import checkpoint_key, model_key
from reshard.planning.tp_plan import generic_name
from reshard.transforms import Table


def forward(table: Table, rules: Rules, parameters: tuple[str, ...] = ()) -> Table:
    """Checkpoint names → model names. A key the model already has keeps its name when a rename would turn it into
    a name the model does not have (transformers' loader does the same: gpt-style ``\\.norm\\.`` rules meant for
    inner norms leave ``model.norm`` alone); ``parameters`` are the model's names, layer numbers as ``*``."""
    known = set(parameters)

    def rename(name: str) -> str:
        renamed = model_key(name, rules)
        if known and generic_name(renamed) not in known and generic_name(name) in known:
            return name
        return renamed

    return _renamed(table, rename)


def reverse(table: Table, rules: Rules) -> Table:
    """Model names → checkpoint names."""
    return _renamed(table, lambda name: checkpoint_key(name, rules))


def _renamed(table: Table, rename: object) -> Table:
    assert callable(rename)
    out: Table = {}
    for name, tensor in table.items():
        new = rename(name)
        out[new] = dataclasses.replace(tensor, name=new)
    return out


def prefix_changes(converters: tuple[ConverterRecord, ...], keys: Iterable[str]) -> Rules:
    """The rules of the prefix-removing ``PrefixChange`` converters that some checkpoint key matches."""
    keys = list(keys)
    rules = [rule for c in converters if (rule := prefix_rule(c)) and any(re.match(rule[0], key) for key in keys)]
    return tuple(rules)


def index_offsets(converters: tuple[ConverterRecord, ...], keys: Iterable[str]) -> Rules:
    """An index-shifting rename (inkling2's ``attn_res.attn_queries.0`` → ``layers.1.attention_input.query``,
    ``Inkling2IndexOffsetWeightRename``) as one literal rule per index the checkpoint's keys hold, longest index
    first (so that ``queries.1`` never renames the start of ``queries.10``); literal rules are undone as any other."""
    keys = list(keys)
    rules: list[tuple[str, str]] = []
    for converter in converters:
        if (rule := offset_rule(converter)) is None:
            continue
        pattern, target, offset = rule
        indices = {int(match.group(1)) for key in keys if (match := re.search(pattern, key))}
        for index in sorted(indices, key=lambda i: (-len(str(i)), i)):
            literal = pattern.replace(r"(\d+)", str(index))
            rules.append((literal, target.replace("\\1", str(index + offset))))
    return tuple(rules)


__all__ = ["forward", "index_offsets", "offset_rule", "prefix_changes", "prefix_rule", "reverse"]
