"""Shardability, decided from config.json and the plan alone, before any weight is read.

transformers loads a model whose attention heads or KV heads do not divide by tp and crashes in the first
forward (``shape '[2, 16, -1, 32]' is invalid``, upstream #48307). reshard refuses it up front and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reshard.manifests.errors import ShardabilityError, SourceError

if TYPE_CHECKING:
    from reshard.manifests.pipeline import Pipeline

# Projections whose output holds attention heads; sharding them colwise splits heads across ranks.
_QUERY_PROJECTIONS = ("q_proj", "query", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
_KEY_PROJECTIONS = ("k_proj", "key", "qkv_proj", "query_key_value", "c_attn", "Wqkv")


@dataclass
class Verdict:
    """Whether ``tp`` works for a model: ``problems`` would break the model, ``notes`` are harmless facts."""

    tp: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# Fields every later step reads, by what they must hold. Counts that build the model must be positive; a null
# KV-head count means "as many as the heads" (transformers' default), a null size means "not given".
_POSITIVE = ("num_attention_heads", "n_head", "num_hidden_layers", "hidden_size", "vocab_size")
_POSITIVE_OR_NULL = ("num_key_value_heads", "head_dim")
_COUNT_OR_NULL = ("intermediate_size", "num_experts", "num_local_experts", "n_routed_experts")
_PER_LAYER = ("intermediate_size",)  # may be one integer per layer (gemma3n)


def validate_config(config: dict[str, Any], origin: str) -> None:
    """Check the type of every config field reshard reads, so a bad config.json ends in one line naming the field.

    Wrong types (``"4"`` for a count, a list for ``text_config``) raise ``SourceError``; counts that cannot make a
    model (zero or negative heads, layers, sizes) raise ``ShardabilityError``, both before any weight is read.
    """
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise SourceError(f"{origin}: model_type must be a string, got {_shown(config['model_type'])}")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise SourceError(f"{origin}: architectures must be a list of strings, got {_shown(architectures)}")
    nested = config.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise SourceError(f"{origin}: text_config must be an object, got {_shown(nested)}")
    _check_flag(config, "tie_word_embeddings", origin, "")
    if isinstance(nested, dict):
        _check_flag(nested, "tie_word_embeddings", origin, "text_config.")
    cfg, prefix = (nested, "text_config.") if isinstance(nested, dict) else (config, "")
    for key in (*_POSITIVE, *_POSITIVE_OR_NULL, *_COUNT_OR_NULL):
        if key not in cfg or (cfg[key] is None and key not in _POSITIVE):
            continue
        values = cfg[key] if key in _PER_LAYER and isinstance(cfg[key], list) and cfg[key] else [cfg[key]]
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool):
                raise SourceError(f"{origin}: {prefix}{key} must be an integer, got {_shown(cfg[key])}")
            least = 0 if key in _COUNT_OR_NULL else 1
            if value < least:
                raise ShardabilityError(
                    f"{origin}: {prefix}{key}={value} cannot make a model (must be at least {least})"
                )


def _check_flag(cfg: dict[str, Any], key: str, origin: str, prefix: str) -> None:
    if cfg.get(key) is not None and not isinstance(cfg[key], bool):
        raise SourceError(f"{origin}: {prefix}{key} must be true or false, got {_shown(cfg[key])}")


def _shown(value: object) -> str:
    """A value as JSON, with its JSON type, cut short: the message stays one line."""
    if value is None:
        return "null"
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), "a number")
    text = json.dumps(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: multimodal configs nest it under ``text_config``."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _shards_heads(plan: dict[str, str], projections: tuple[str, ...]) -> bool:
    # A gathered output (colwise_gather_output, e.g. phi3's fused qkv) hands every rank all heads again.
    return any(
        rule.rpartition(".")[2] in projections and style in ("colwise", "colwise_rep") for rule, style in plan.items()
    )


def check_shardability(config: dict[str, Any], plan: dict[str, str], tp: int, replicate_kv: bool = False) -> Verdict:
    """Decide whether ``tp`` can split this model; never raises (see ``require_shardable``).

    With ``replicate_kv``, KV heads fewer than tp (tp a multiple of them) are duplicated instead of refused.
    """
    verdict = Verdict(tp)
    if tp < 1:
        verdict.problems.append(f"tp must be at least 1, got {tp}")
        return verdict
    cfg = text_config(config)
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads and _shards_heads(plan, _QUERY_PROJECTIONS) and heads % tp:
        verdict.problems.append(
            f"num_attention_heads={heads} is not divisible by tp={tp}: the query projection would split a head "
            "across ranks and attention would fail in the first forward"
        )
    if kv_heads and _shards_heads(plan, _KEY_PROJECTIONS) and kv_heads % tp:
        can_replicate = tp % kv_heads == 0
        if replicate_kv and can_replicate:
            verdict.notes.append(
                f"num_key_value_heads={kv_heads} < tp={tp}: each KV head is duplicated {tp // kv_heads}x "
                f"(--replicate-kv), the artifact's config says num_key_value_heads={tp}"
            )
        else:
            hint = (
                " Pass --replicate-kv to duplicate KV heads so that each rank holds whole heads."
                if can_replicate
                else ""
            )
            verdict.problems.append(
                f"num_key_value_heads={kv_heads} is not divisible by tp={tp}: each rank would hold a fraction of a "
                f"KV head; transformers loads this and crashes in the first forward (upstream #48307).{hint}"
            )
    vocab = cfg.get("vocab_size")
    if vocab and vocab % tp:
        verdict.notes.append(
            f"vocab_size={vocab} is uneven over tp={tp}: the last rank holds fewer rows (as transformers)"
        )
    intermediate = cfg.get("intermediate_size")
    uneven = sorted(
        {size for size in (intermediate if isinstance(intermediate, list) else [intermediate]) if size and size % tp}
    )
    if uneven:
        verdict.notes.append(f"intermediate_size={uneven[0]} is uneven over tp={tp}: the last rank holds less")
    return verdict


def valid_tp_sizes(
    config: dict[str, Any], plan: dict[str, str], up_to: int = 64, replicate_kv: bool = False
) -> list[int]:
    """Every tp in 1..up_to that passes the check, for error messages."""
    return [tp for tp in range(1, up_to + 1) if check_shardability(config, plan, tp, replicate_kv).ok]


def require_shardable(
    config: dict[str, Any], plan: dict[str, str], tp: int, model: str, replicate_kv: bool = False
) -> Verdict:
    """Raise ``ShardabilityError`` with the reasons and the tp sizes that would work."""
    validate_config(config, f"{model}: config.json")
    verdict = check_shardability(config, plan, tp, replicate_kv)
    if not verdict.ok:
        sizes = ", ".join(str(t) for t in valid_tp_sizes(config, plan, 16, replicate_kv))
        raise ShardabilityError(f"{model}: cannot use tp={tp}: " + "; ".join(verdict.problems) + f". Valid tp: {sizes}")
    return verdict


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def require_expert_parallel(config: dict[str, Any], tp: int, ep: int, model: str) -> None:
    """Refuse an EP size reshard cannot lay out, before any weight is read.

    transformers needs ``ep`` to be a multiple of tp dividing ``fsdp * tp``; without FSDP that is ``ep == tp``: the
    experts are spread over the same ranks as the dense tensor-parallel layers. Experts must divide evenly.
    """
    if ep != tp:
        raise ShardabilityError(
            f"{model}: --ep {ep} with --tp {tp}: expert parallelism runs on the tp ranks (ep must equal tp "
            f"without FSDP, as in transformers), so use --ep {tp}"
        )
    cfg = text_config(config)
    experts = next((cfg[key] for key in EXPERT_COUNT_KEYS if isinstance(cfg.get(key), int)), None)
    if experts is None:
        raise ShardabilityError(f"{model}: config.json names no number of experts; --ep needs a mixture of experts")
    if experts % ep:
        raise ShardabilityError(
            f"{model}: {experts} experts cannot be split evenly over ep={ep} ranks (each rank holds whole experts); "
            f"valid ep: {', '.join(str(n) for n in range(1, experts + 1) if experts % n == 0)}"
        )


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether ``lm_head`` is tied to the input embeddings (the top-level flag, else the text config's)."""
    return bool(config.get("tie_word_embeddings", text_config(config).get("tie_word_embeddings", False)))


def config_pipeline(
    config: dict[str, Any], pp: int, names: list[str], tied: bool | None = None
) -> tuple[Pipeline | None, list[str]]:
    """transformers' split of this model into ``pp`` stages, and what stops it, one line each (empty: it splits).

    ``names`` are the model's parameter names (a tensor table, or a built-in plan's with ``*``; empty when neither
    is known: only the layer count is judged); ``tied`` defaults to the config's flag."""
    from reshard.manifests.pipeline import Pipeline, base_model_prefix, pipeline_split_problems

    layers = text_config(config).get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        return None, ["config.json has no num_hidden_layers: the layers cannot be split into stages"]
    try:
        prefix = base_model_prefix(names) if names else "model"
    except ShardabilityError as exc:
        return None, [str(exc)]
    pipeline = Pipeline(pp, layers, prefix, tied_embeddings(config) if tied is None else tied)
    return pipeline, pipeline_split_problems(pipeline, names)


def pipeline_verdict(config: dict[str, Any], pp: int, version: str) -> Verdict:
    """Whether transformers' split into ``pp`` pipeline stages works for this model, and the layers each stage
    holds (``Verdict.tp`` is ``pp`` here); never raises."""
    from reshard.manifests.pipeline import describe_split
    from reshard.manifests.plans import plan_for_config

    builtin = plan_for_config(config, version)
    pipeline, problems = config_pipeline(config, pp, list(builtin.parameters) if builtin else [])
    verdict = Verdict(pp, problems)
    if pipeline is not None and verdict.ok and pp > 1:
        verdict.notes.append(describe_split(pipeline))
        if pipeline.layers % pp:
            verdict.notes.append(
                f"{pipeline.layers} layers do not split evenly into {pp} stages: as in transformers, the last stage "
                f"takes the remaining {pipeline.layers % pp}"
            )
        if pipeline.tied:
            verdict.notes.append("tied embeddings: the first and the last stage both hold embed_tokens")
    return verdict
