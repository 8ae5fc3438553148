"""Pipeline stages: which decoder layers, and so which tensors, each stage of transformers' split holds.

transformers' pipeline parallelism (``DistributedConfig(pp_size=P)``, ``apply_pipeline_parallelism``) splits
``base_model.layers`` evenly in order, the last stage taking the remainder; the embeddings stay on the first stage
(and on the last too when they are tied to ``lm_head``, which is tied there); the final norm and ``lm_head`` live on
the last stage; every other module (rotary embeddings, anything outside those four) on every stage. The offline
stage writes each stage's tensors into that stage's rank files by these rules, the validator re-derives them from a
manifest, and the runtime checks them against the model transformers' own split leaves on the rank.

Pure functions of names and sizes; the format core, imported by both halves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from reshard.manifests.errors import ShardabilityError


@dataclass(frozen=True)
class Pipeline:
    """The split of a model into ``stages`` pipeline stages: ``layers`` decoder layers under ``prefix.layers``
    (``prefix`` is transformers' ``base_model_prefix``), embeddings tied to ``lm_head`` or not."""

    stages: int
    layers: int
    prefix: str = "model"
    tied: bool = False

    def layer_range(self, stage: int) -> tuple[int, int]:
        """``[start, end)`` of the layers ``stage`` holds: ``PipelineStage.layer_range_for_rank``."""
        per_stage = self.layers // self.stages
        start = stage * per_stage
        return start, self.layers if stage == self.stages - 1 else start + per_stage

    def stages_of(self, name: str) -> tuple[int, ...]:
        """The stages whose model holds the parameter or buffer ``name`` (``PipelineStage.find_rank_for_key``,
        with the tied embeddings also on the last stage and unowned modules on every stage)."""
        last = self.stages - 1
        if name.startswith(f"{self.prefix}.embed_tokens."):
            return (0, last) if self.tied and last > 0 else (0,)
        if name.startswith((f"{self.prefix}.norm.", "lm_head.")):
            return (last,)
        layer = self.layer_of(name)
        if layer is not None:
            for stage in range(self.stages):
                start, end = self.layer_range(stage)
                if start <= layer < end:
                    return (stage,)
        return tuple(range(self.stages))

    def layer_of(self, name: str) -> int | None:
        """The decoder layer ``name`` belongs to (``PREFIX.layers.N.…``), or ``None``."""
        layers = f"{self.prefix}.layers."
        index = name[len(layers) :].split(".", 1)[0] if name.startswith(layers) else ""
        return int(index) if index.isdigit() else None

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "prefix": self.prefix, "tied": self.tied}

    @classmethod
    def from_json(cls, data: dict[str, Any], stages: int) -> Pipeline:
        return cls(stages, data["layers"], data["prefix"], data["tied"])


def pipeline_split_problems(pipeline: Pipeline, names: Iterable[str]) -> list[str]:
    """What makes transformers' split unusable for this model, one line each (empty: it splits).

    The split replaces ``PREFIX.embed_tokens``, ``PREFIX.layers.N``, ``PREFIX.norm`` and ``lm_head``; a model whose
    modules are named otherwise (``embed_in``, ``h.N``, ``final_layernorm``) would keep every weight on every stage,
    and a stage without a layer computes nothing.
    """
    names = list(names)
    problems = []
    prefix = pipeline.prefix
    for part in ("embed_tokens", "layers", "norm") if names else ():  # no names known: only the layer count
        if not any(name.startswith(f"{prefix}.{part}.") for name in names):
            problems.append(
                f"the model has no {prefix}.{part} (transformers' pipeline split replaces {prefix}.embed_tokens, "
                f"{prefix}.layers and {prefix}.norm, and this model names its modules otherwise)"
            )
    if pipeline.layers < pipeline.stages:
        problems.append(
            f"{pipeline.layers} decoder layers cannot fill {pipeline.stages} pipeline stages: each stage needs at "
            f"least one layer (use --pp {pipeline.layers} or fewer)"
        )
    return problems


def describe_split(pipeline: Pipeline) -> str:
    """The layers per stage, e.g. ``stage 0: layers 0-9 (10), stage 1: layers 10-21 (12)``."""
    parts = []
    for stage in range(pipeline.stages):
        start, end = pipeline.layer_range(stage)
        layers = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
        parts.append(f"stage {stage}: {layers} ({end - start})")
    return ", ".join(parts)


def base_model_prefix(parameters: Iterable[str]) -> str:
    """The base model's prefix, read off the model's parameter names: the part before ``.layers.``."""
    for name in parameters:
        head, found, _ = name.partition(".layers.")
        if found and head and "." not in head:
            return head
    raise ShardabilityError(
        "the model has no decoder layers under PREFIX.layers: it cannot be split into pipeline stages"
    )
