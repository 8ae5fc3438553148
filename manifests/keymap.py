"""The name transformers' loader gives each checkpoint key, replayed from the built-in plan's records.

``from_pretrained`` renames a checkpoint key in three steps (``core_model_loading.rename_source_key``): every
renaming in order, each one's search matching at most once (a sub-model's renaming only under its scope prefix,
with or without the base model's prefix before it); then at most one converter, the first whose search matches;
then the base model's prefix added when only the prefixed name is the model's, or removed when only the bare name
is (a checkpoint saved from the base model, or a causal LM's loaded into its base model). A key the model has that
the renamings would turn into a name it lacks keeps its own name. This module does the same, with transformers'
compiled patterns, on names alone; ``parameters`` are the model's state-dict names, layer numbers as ``*``.

Example (gemma3's Hub keys: the language model's renamed, the vision tower's prefix dropped in its scope):
    >>> from reshard.manifests.plans import builtin_plan
    >>> plan = builtin_plan("gemma3", "5.23")
    >>> names = model_names(["language_model.model.norm.weight",
    ...                      "vision_tower.vision_model.post_layernorm.weight"], plan)
    >>> [name.final for name in names.values()]
    [('model.language_model.norm.weight',), ('model.vision_tower.post_layernorm.weight',)]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from reshard.manifests.errors import PlanError
from reshard.manifests.names import generic_name
from reshard.manifests.plans import BuiltinPlan, ConverterRecord

RENAMING_KINDS = frozenset({"WeightRenaming", "PrefixChange", "Inkling2IndexOffsetWeightRename"})


@dataclass(frozen=True)
class KeyName:
    """What transformers' loader makes of one checkpoint key.

    ``renamed``: the name after the renamings and the base model's prefix, before a converter (reshard's converter
    replays start from it); ``final``: the model names the key loads into (a converter's targets, several for a
    ``Chunk``); ``converter``: the index of the converter that matched, or None; ``loaded``: whether ``final`` names
    the model's tensors (else transformers reports them unexpected and ignores them)."""

    renamed: str
    final: tuple[str, ...]
    converter: int | None
    loaded: bool


def replayable(record: ConverterRecord) -> bool:
    """Whether a renaming is one this module replays (a stateful ``GroupWeightRename`` is not)."""
    return record.kind in RENAMING_KINDS and bool(record.pattern)


def model_names(
    keys: Iterable[str], plan: BuiltinPlan, parameters: tuple[str, ...] | None = None
) -> dict[str, KeyName]:
    """Every checkpoint key's name in the model, as transformers' loader derives it (``parameters``: the model's
    names, layer numbers as ``*``; the plan's, recorded from the default config, when not given)."""
    if bad := [r for r in (*plan.renamings, *plan.key_converters) if not r.pattern]:
        raise PlanError(f"the built-in plan of {plan.model_type} records no search pattern for {bad[0].to_json()}")
    if bad := [r for r in plan.renamings if not replayable(r)]:
        raise PlanError(f"reshard cannot replay transformers' renaming {bad[0].to_json()} ({plan.model_type})")
    known = frozenset(plan.parameters if parameters is None else parameters)
    return {key: _model_name(key, plan, known) for key in keys}


def _model_name(key: str, plan: BuiltinPlan, known: frozenset[str]) -> KeyName:
    prefix = plan.base_model_prefix

    def has(name: str) -> bool:
        return generic_name(name) in known

    renamed = key
    for renaming in plan.renamings:
        renamed, _ = _rename(renaming, renamed)
    converted, converter = renamed, None
    for index, record in enumerate(plan.key_converters):
        converted, pattern = _rename(record, renamed)
        if pattern is not None:
            converter = index
            break
    final = _with_base_prefix(converted, prefix, has)
    if not has(final) and has(key):  # a name the model has, which the renamings would lose: kept as it is
        renamed = final = _with_base_prefix(key, prefix, has)
        converter = None
    else:
        renamed = _same_prefix_change(renamed, converted, final)
    if converter is None:
        return KeyName(renamed, (final,), None, has(final))
    targets = plan.key_converters[converter].targets
    head, _, tail = final.partition(targets[0])
    return KeyName(renamed, tuple(head + target + tail for target in targets), converter, has(final))


def _with_base_prefix(name: str, prefix: str, has: object) -> str:
    """transformers' last step, literally (its ``re.sub`` with an unescaped dot included)."""
    assert callable(has)
    if name.startswith(prefix) and has(re.sub(f"^{prefix}.", "", name, count=1)):
        return re.sub(f"^{prefix}.", "", name, count=1)
    if has(f"{prefix}.{name}"):
        return f"{prefix}.{name}"
    return name


def _same_prefix_change(renamed: str, converted: str, final: str) -> str:
    """``renamed`` with the prefix the last step added to or removed from ``converted`` (giving ``final``)."""
    if final == converted:
        return renamed
    if final.endswith(converted):
        return final[: len(final) - len(converted)] + renamed
    removed = len(converted) - len(final)
    return renamed[removed:] if converted.endswith(final) else renamed


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _rename(record: ConverterRecord, key: str) -> tuple[str, str | None]:
    """``WeightTransform.rename_source_key`` (and its ``Inkling2IndexOffsetWeightRename`` form): the renamed key and
    the source pattern that matched, or the key unchanged and None."""
    key_to_match, prefix = key, None
    if record.scope_prefix is not None:
        scope = f"{record.scope_prefix}." if record.scope_prefix != "" else ""
        base = f"{record.base_model_prefix}." if record.base_model_prefix != "" else ""
        if key.startswith(base + scope):
            prefix = base + scope
        elif key.startswith(scope):
            prefix = scope
        else:
            return key, None
        key_to_match = key.removeprefix(prefix)
    compiled = _compiled(record.pattern)
    match = compiled.search(key_to_match)
    if match is None:
        return key, None
    group = next(name for name, value in match.groupdict().items() if value is not None)
    replacement = record.targets[0]
    if record.kind == "Inkling2IndexOffsetWeightRename":
        offset = next(args["offset"] for name, args in record.operations if name == "IndexOffset")
        index = int(match.group(compiled.groupindex[group] + 1))
        replacement = replacement.replace("\\1", str(index + offset))
    elif "\\1" in replacement:
        replacement = replacement.replace("\\1", match.group(compiled.groupindex[group] + 1))
    renamed = key_to_match.replace(match.group(0), replacement, 1)
    if prefix is not None:
        renamed = prefix + renamed
    return renamed, record.sources[int(group[1:])]


def require_same(table: dict[str, object], names: dict[str, KeyName], origin: str) -> None:
    """Refuse a conversion whose tensors, after reshard's replays, are not the ones transformers' loader fills: every
    name it loads must be in the table, and no name in the table may be one of the model's that it does not load
    (a tensor the model lacks is kept under the name transformers reports it by)."""
    if not names:
        return
    expected = {name: key for key, found in names.items() if found.loaded for name in found.final}
    if missing := sorted(name for name in expected if name not in table):
        name = missing[0]
        raise PlanError(
            f"{origin}: checkpoint key {expected[name]!r} loads into {name!r} in transformers, but reshard's "
            "replay of its conversions does not make that tensor; this model type cannot be converted exactly"
        )
    loaded = {name for found in names.values() for name in found.final if found.loaded}
    known = {generic_name(name) for name in loaded}
    if extra := sorted(name for name in table if name not in loaded and generic_name(name) in known):
        raise PlanError(
            f"{origin}: reshard's replay makes {extra[0]!r}, a tensor transformers' loader does not fill from this "
            "checkpoint; this model type cannot be converted exactly"
        )
