"""The built-in tensor-parallel plans: transformers' own resolved plans per model type, as typed records.

``manifests/plans/<model_type>.json`` is generated from the installed transformers by
``scripts/generate_plans.py`` (which writes these same records), so neither the offline stage nor the runtime
needs transformers to know a plan. A plan maps module names, with ``*`` standing for a layer number, to style
names, exactly like transformers' ``model._tp_plan``.

Example:
    >>> builtin_plan("llama").tp_plan["model.layers.*.self_attn.o_proj"]
    'rowwise'
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from reshard.manifests.errors import PlanError


@dataclass(frozen=True)
class ConverterRecord:
    """One of transformers' load-time weight transforms, as data reshard can replay: a renaming (``WeightRenaming``,
    ``PrefixChange``, ...) or a converter (``WeightConverter``: checkpoint ``sources`` patterns, ``*`` an expert
    index, merged by ``operations`` into ``targets``).

    ``pattern`` is transformers' compiled search (``compiled_sources.pattern``: one named group ``g<i>`` per source,
    longest first); ``scope_prefix`` and ``base_model_prefix`` confine a sub-model's transform to its keys, as
    ``get_model_conversion_mapping`` sets them (``None``: the top-level model's, matching anywhere)."""

    kind: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    operations: tuple[tuple[str, dict[str, Any]], ...]
    pattern: str = ""
    scope_prefix: str | None = None
    base_model_prefix: str | None = None

    @property
    def operation_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.operations)

    def to_json(self) -> dict[str, Any]:
        scope = {"scope_prefix": self.scope_prefix, "base_model_prefix": self.base_model_prefix}
        return {
            "kind": self.kind,
            "sources": list(self.sources),
            "targets": list(self.targets),
            "operations": [[name, dict(args)] for name, args in self.operations],
            **({"pattern": self.pattern} if self.pattern else {}),
            **({key: value for key, value in scope.items() if value is not None}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConverterRecord:
        scope, base = data.get("scope_prefix"), data.get("base_model_prefix")
        return cls(
            str(data["kind"]),
            tuple(data["sources"]),
            tuple(data["targets"]),
            tuple((str(name), dict(args)) for name, args in data["operations"]),
            str(data.get("pattern") or ""),
            None if scope is None else str(scope),
            None if base is None else str(base),
        )


@dataclass(frozen=True)
class BuiltinPlan:
    """The resolved plans of one model type: ``tp_plan`` and ``ep_plan`` as ``model._tp_plan`` / ``_ep_plan``;
    the renamings and weight converters transformers' loader applies to checkpoint keys
    (``get_model_conversion_mapping``: the sub-models' too, each in order), the model's ``base_model_prefix``
    (added to or removed from a key as ``from_pretrained`` does), and the model's own parameter names (a rename whose
    result is none of them leaves a key as it is, as transformers' loader does)."""

    model_type: str
    architecture: str
    transformers_version: str
    tp_plan: dict[str, str]
    ep_plan: dict[str, str] = field(default_factory=dict)
    renamings: tuple[ConverterRecord, ...] = ()
    key_converters: tuple[ConverterRecord, ...] = ()
    parameters: tuple[str, ...] = ()  # the model's state-dict names, layer numbers as ``*`` (default config)
    base_model_prefix: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``<model_type>.json``."""
        return {
            "model_type": self.model_type,
            "architecture": self.architecture,
            "transformers_version": self.transformers_version,
            "tp_plan": dict(self.tp_plan),
            "ep_plan": dict(self.ep_plan),
            "styles": sorted(set(self.tp_plan.values())),
            "renamings": [r.to_json() for r in self.renamings],
            "key_converters": [c.to_json() for c in self.key_converters],
            "parameters": list(self.parameters),
            "base_model_prefix": self.base_model_prefix,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuiltinPlan:
        return cls(
            model_type=str(data["model_type"]),
            architecture=str(data["architecture"]),
            transformers_version=str(data["transformers_version"]),
            tp_plan=dict(data["tp_plan"]),
            ep_plan=dict(data.get("ep_plan") or {}),
            renamings=tuple(ConverterRecord.from_json(r) for r in data.get("renamings") or []),
            key_converters=tuple(ConverterRecord.from_json(c) for c in data.get("key_converters") or []),
            parameters=tuple(str(p) for p in data.get("parameters") or []),
            base_model_prefix=str(data.get("base_model_prefix") or ""),
        )


@functools.cache
def builtin_plan_names() -> list[str]:
    """The model types that have a built-in plan."""
    folder = resources.files("reshard.manifests") / "plans"
    return sorted(
        p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "INDEX.json"
    )


@functools.cache
def builtin_plan(model_type: str) -> BuiltinPlan:
    """The built-in plan of ``model_type`` (read once per process; callers copy the dicts they change)."""
    if model_type not in builtin_plan_names():
        raise PlanError(
            f"no built-in tensor-parallel plan for model_type {model_type!r} (transformers has none, or it is "
            f"not a causal LM); pass --plan PLAN.json. Known: {', '.join(builtin_plan_names())}"
        )
    path = resources.files("reshard.manifests") / "plans" / f"{model_type}.json"
    return BuiltinPlan.from_json(json.loads(path.read_text()))


def plan_for_config(config: dict[str, Any]) -> BuiltinPlan | None:
    """The built-in plan of a config's ``model_type``, or ``None`` when there is none."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in builtin_plan_names():
        return None
    return builtin_plan(model_type)


def expert_rule_matcher(ep_plan: dict[str, str]) -> Callable[[str], bool]:
    """Whether a plan rule names an expert-parallel module or one of its children (EP rules take precedence over
    TP rules there, as in transformers' ``_resolve_parallel_plans``)."""
    if not ep_plan:
        return lambda rule: False
    pattern = re.compile(rf"(?:{'|'.join(map(re.escape, ep_plan))})(?:\..+)?")
    return lambda rule: pattern.fullmatch(rule) is not None
