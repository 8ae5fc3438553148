"""Records checked against what they claim: the second half of the validator (``validate.check_manifest``).

A manifest's digest is a self-hash that anyone who can write the folder can recompute, so each record must also
be what a conversion could have written: every tensor's ``style`` the one the recorded plan gives it, the plan the
model type's built-in one with the recorded overrides, the key renames and row-block/interleave records exactly
what the model type's own converters make of the tensors' names (renames one-to-one), and a KV-replication record
the one the tp needs, with the copies of each head stored identically (their slices' xxh3 agree). Pure and cheap:
the manifest and the built-in plans only, never a tensor byte. Each check returns ``(field path, message)``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from reshard.manifests.errors import ReshardError, shown
from reshard.manifests.keymap import model_names
from reshard.manifests.manifest import Manifest, TensorEntry
from reshard.manifests.names import generic_name, style_of
from reshard.manifests.plans import UNRECORDED_VERSION, BuiltinPlan, ConverterRecord, expert_rule_matcher, plan_sets
from reshard.manifests.transforms import KvReplication, checkpoint_key

Problem = tuple[str, str]
KV_PROJECTIONS = ("k_proj", "v_proj")
_LITERAL = re.compile(r"(?:\w|\\\.|\.)+")


def is_kv_tensor(name: str, plan: dict[str, str]) -> bool:
    """A k_proj/v_proj weight or bias that the plan shards colwise (its rows are whole heads)."""
    module = generic_name(name).rpartition(".")[0]
    return module.rpartition(".")[2] in KV_PROJECTIONS and plan.get(module) in ("colwise", "colwise_rep")


def prefix_rule(converter: ConverterRecord) -> tuple[str, str] | None:
    """A ``PrefixChange(prefix_to_remove=...)`` as a literal rename rule (source ``^model\\.language_model\\.(.+)``,
    target ``model.\\1`` → ``(^model\\.language_model\\., model.)``), or None for any other converter."""
    if converter.kind != "PrefixChange" or len(converter.sources) != 1 or len(converter.targets) != 1:
        return None
    source = re.fullmatch(r"(\^(?:\w|\\\.)+)\(\.\+\)", converter.sources[0])
    target = re.fullmatch(r"((?:\w|\.)*)\\1", converter.targets[0])
    return (source.group(1), target.group(1)) if source and target else None


def offset_rule(converter: ConverterRecord) -> tuple[str, str, int] | None:
    """An ``Inkling2IndexOffsetWeightRename`` as (literal pattern with one ``(\\d+)``, target with ``\\1``, offset), or
    None for any other converter (or one whose patterns are not literal around the index)."""
    if converter.kind != "Inkling2IndexOffsetWeightRename" or len(converter.sources) != 1:
        return None
    offsets = [args.get("offset") for name, args in converter.operations if name == "IndexOffset"]
    source, target = converter.sources[0], converter.targets[0] if len(converter.targets) == 1 else ""
    if len(offsets) != 1 or not isinstance(offsets[0], int) or source.count(r"(\d+)") != 1 or target.count("\\1") != 1:
        return None
    if not all(_LITERAL.fullmatch(part) or not part for part in [*source.split(r"(\d+)"), *target.split("\\1")]):
        return None
    return source, target, offsets[0]


def claims_problem(manifest: Manifest) -> Problem | None:
    """The first record of ``manifest`` that is not what it claims, or None."""
    builtin = _builtin(manifest.model_type, manifest.transformers_version or UNRECORDED_VERSION)
    for check in (_style_problem, _plan_problem, _rename_problem, _row_block_problem, _kv_problem):
        if problem := check(manifest, builtin):
            return problem
    return None


def _builtin(model_type: str | None, version: str) -> BuiltinPlan | None:
    """The model type's built-in plan under the release the artifact followed (``None``: that release has none)."""
    return plan_sets().plan(model_type, version) if model_type is not None else None


def _plan_problem(manifest: Manifest, builtin: BuiltinPlan | None) -> Problem | None:
    """``plan`` (and ``ep_plan``) must be the model type's own, with ``plan_overrides`` merged as transformers
    merges ``DistributedConfig(tp_plan=...)``, and expert rules moved to ``ep_plan`` under expert parallelism."""
    if manifest.tp > 1 and not manifest.plan and not manifest.ep_plan:
        return "plan", f"empty at tp={manifest.tp}: no rule shards anything, and transformers refuses such a load"
    own = builtin.tp_plan if builtin else {}
    overrides = manifest.plan_overrides
    expected = dict(own) if overrides is None else ({**own, **overrides} if overrides else {})
    if manifest.ep_plan:
        wanted = builtin.ep_plan if builtin else {}
        if manifest.ep_plan != wanted:
            return "ep_plan", f"{shown(manifest.ep_plan)}, but model_type {manifest.model_type!r} has {shown(wanted)}"
        is_expert = expert_rule_matcher(manifest.ep_plan)
        expected = {rule: style for rule, style in expected.items() if not is_expert(rule)}
    if manifest.plan != expected:
        rule = sorted(set(manifest.plan) ^ set(expected) or {r for r in expected if manifest.plan[r] != expected[r]})[0]
        return (
            f"plan.{rule}",
            f"{shown(manifest.plan.get(rule))}, but model_type {manifest.model_type!r}'s own plan with "
            f"plan_overrides {shown(overrides)} gives {shown(expected.get(rule))}",
        )
    return None


def _style_problem(manifest: Manifest, builtin: BuiltinPlan | None) -> Problem | None:
    """Every tensor's recorded style must be the one the recorded plan gives it (expert rules first)."""
    plan = {**manifest.plan, **manifest.ep_plan}
    for index, tensor in enumerate(manifest.tensors):
        expected = style_of(tensor.name, plan)
        if tensor.style != expected:
            return (
                f"tensors[{index}].style",
                f"{shown(tensor.style)}, but the plan gives {tensor.name!r} {shown(expected)}",
            )
    return None


def _rename_problem(manifest: Manifest, builtin: BuiltinPlan | None) -> Problem | None:
    """Each renamed key must be what transformers' loader makes of the checkpoint key (``options.renamed``: the
    model type's renamings and base-model prefix replayed by ``keymap``; older manifests' ``key_renames`` rules:
    each one of the model type's renamings, prefix-removing or index-offset converters); and undoing them must give
    every tensor its own checkpoint key (two model names from one key would lose a tensor on the way back)."""
    renamed = manifest.options.renamed or {}
    if renamed:
        if builtin is None:
            name = sorted(renamed)[0]
            return f"options.renamed.{name}", f"model_type {manifest.model_type!r} has no renamings to record"
        # the model's names: the plan's (default config) and the tensors this conversion made, as the loader saw them
        known = (*builtin.parameters, *(generic_name(t.name) for t in manifest.tensors), *map(generic_name, renamed))
        names = model_names(list(renamed.values()), builtin, tuple(sorted(set(known))))
        for name, key in sorted(renamed.items()):
            if names[key].renamed != name:
                return (
                    f"options.renamed.{name}",
                    f"checkpoint key {key!r} loads as {names[key].renamed!r} in model_type "
                    f"{manifest.model_type!r}, not as {name!r}",
                )
    recorded = list(manifest.options.key_renames)
    converters = builtin.key_converters if builtin else ()
    renamings = builtin.renamings if builtin else ()
    own = [(r.sources[0], r.targets[0]) for r in renamings if len(r.sources) == 1 and len(r.targets) == 1]
    own += [rule for c in (*renamings, *converters) if (rule := prefix_rule(c))]
    offsets = [offset for c in (*renamings, *converters) if (offset := offset_rule(c))]
    if bad := [rule for rule in recorded if rule not in own and not _is_offset_expansion(rule, offsets)]:
        return (
            "options.key_renames",
            f"{shown(list(bad[0]))} is not a renaming model_type {manifest.model_type!r}'s conversions make",
        )
    keys: Counter[str] = Counter()
    try:
        for tensor in manifest.tensors:
            keys.update(set(manifest.options.checkpoint_keys([tensor.name])))
    except ReshardError:  # a rule of the model type's own that cannot be undone: consolidate refuses it anyway
        return None
    cut = {
        checkpoint_key(key, manifest.options.key_renames): len(r.parts)
        for key, r in (manifest.options.chunked or {}).items()
    }
    for key, count in sorted(keys.items()):
        if count > 1 and cut.get(key) != count:
            return "options.key_renames", f"{count} tensors go back to one checkpoint key {key!r}"
    return None


def _is_offset_expansion(rule: tuple[str, str], offsets: list[tuple[str, str, int]]) -> bool:
    for pattern, target, offset in offsets:
        head, tail = pattern.split(r"(\d+)")
        match = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail), rule[0])
        if match and rule[1] == target.replace("\\1", str(int(match.group(1)) + offset)):
            return True
    return False


def _row_block_problem(manifest: Manifest, builtin: BuiltinPlan | None) -> Problem | None:
    """Row-block and interleave records only where a converter of the model type makes them: each record's names
    are the converter's source and target patterns around the same text, and a chunk's rows ``torch.chunk``'s."""
    converters = builtin.key_converters if builtin else ()
    options = manifest.options
    for name, blocks in sorted((options.concatenated or {}).items()):
        parts = [part for part, _ in blocks.parts]
        if not any(_made_by(c, "Concatenate", parts, [name]) for c in converters):
            return f"options.concatenated.{name}", f"no Concatenate converter of {manifest.model_type!r} makes it"
    for key, blocks in sorted((options.chunked or {}).items()):
        names = [part for part, _ in blocks.parts]
        if not any(_made_by(c, "Chunk", [key], names) for c in converters):
            return f"options.chunked.{key}", f"no Chunk converter of {manifest.model_type!r} makes it"
        rows = [count for _, count in blocks.parts]
        size = -(-sum(rows) // len(rows))
        if rows != [min(size, sum(rows) - start) for start in range(0, sum(rows), size)]:
            return f"options.chunked.{key}", f"rows {rows} are not torch.chunk's cut of {sum(rows)} rows"
    for name, record in sorted((options.interleaved or {}).items()):
        made = any(_made_by(c, "Interleave", [record.source], [name], dim=record.dim) for c in converters)
        if not made:
            return f"options.interleaved.{name}", f"no Interleave converter of {manifest.model_type!r} makes it"
    return None


def _made_by(converter: ConverterRecord, operation: str, sources: list[str], targets: list[str], dim: int = 0) -> bool:
    """Whether ``converter`` (one ``operation`` along ``dim``, no expert index) turns ``sources`` into ``targets``:
    each name is one of its patterns (literal text, dots as written or escaped) between the same prefix and suffix."""
    if converter.kind != "WeightConverter" or len(converter.operations) != 1:
        return False
    name, arguments = converter.operations[0]
    if (
        name != operation
        or arguments.get("dim") != dim
        or arguments.get("inverse")
        or arguments.get("num_shards_attribute")
    ):
        return False
    patterns = [p.replace("\\.", ".") for p in (*converter.sources, *converter.targets)]
    if "*" in "".join(patterns) or len(sources) != len(converter.sources) or len(targets) != len(converter.targets):
        return False
    first = patterns[0]
    at = sources[0].rfind(first)
    if at < 0:
        return False
    before, after = sources[0][:at], sources[0][at + len(first) :]
    return [before + p + after for p in patterns] == [*sources, *targets]


def _kv_problem(manifest: Manifest, builtin: BuiltinPlan | None) -> Problem | None:
    """A KV-replication record must be the one the tp needs (``tp`` heads from fewer that divide it), every KV
    tensor must hold ``replicated`` heads of ``head_dim`` rows, and the ranks holding copies of one head must hold
    the same bytes (equal slice xxh3): a record laid over distinct heads would fold real heads away."""
    record = manifest.options.replicate_kv
    if record is None:
        return None
    path = "options.replicate_kv"
    tp = manifest.tp
    if record.replicated != tp or record.original >= tp or tp % record.original:
        return path, f"{record.original} → {record.replicated} KV heads is not the replication tp={tp} needs"
    kv = [(i, t) for i, t in enumerate(manifest.tensors) if is_kv_tensor(t.name, manifest.plan)]
    if not kv:
        return path, "recorded, but the plan shards no k_proj/v_proj colwise"
    for index, tensor in kv:
        if problem := _copies_problem(index, tensor, record):
            return problem
    return None


def _copies_problem(index: int, tensor: TensorEntry, record: KvReplication) -> Problem | None:
    rows = record.replicated * record.head_dim
    if not tensor.shape or tensor.shape[0] != rows:
        return (
            f"tensors[{index}].shape",
            f"{list(tensor.shape)}, but options.replicate_kv gives {tensor.name!r} {rows} rows "
            f"({record.replicated} heads of {record.head_dim})",
        )
    for piece in tensor.slices:
        first = tensor.slices[piece.rank // record.factor * record.factor]
        if piece.xxh3 != first.xxh3:
            return (
                f"tensors[{index}].slices[{piece.rank}].xxh3",
                f"rank {piece.rank} of {tensor.name!r} should hold a copy of rank {first.rank}'s KV head "
                "(options.replicate_kv), but their bytes differ",
            )
    return None


def config_problem(manifest: Manifest, config: dict[str, Any]) -> Problem | None:
    """The artifact's ``config.json`` against the manifest: the same ``model_type`` (whose built-in plan and
    converters the records were checked against; the runtime builds the model from the config), and with replicated
    KV heads the replicated number (what the stored k/v_proj hold), as the conversion wrote it."""
    if config.get("model_type") != manifest.model_type:
        return "model_type", f"{shown(manifest.model_type)}, but config.json says {shown(config.get('model_type'))}"
    record = manifest.options.replicate_kv
    if record is None:
        return None
    nested = config.get("text_config")
    text = nested if isinstance(nested, dict) else config
    heads = text.get("num_key_value_heads")
    if heads != record.replicated:
        return (
            "options.replicate_kv",
            f"{record.replicated} replicated KV heads, but config.json says num_key_value_heads={shown(heads)}",
        )
    return None
