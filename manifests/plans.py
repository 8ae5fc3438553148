"""The built-in tensor-parallel plans: transformers' own resolved plans per model type and release, as typed records.

``manifests/plans/<minor>/`` holds the plans of one transformers minor release, generated under it by
``scripts/generate_plans.py`` (which writes these same records), so neither the offline stage nor the runtime
needs transformers to know a plan. The oldest folder holds every model type (and ``INDEX.json``); each newer one
only the types whose record differs from the release below it or is new, and ``CHANGES.json`` (which types changed,
are new, or lost their plan). A plan maps module names, with ``*`` standing for a layer number, to style names,
exactly like transformers' ``model._tp_plan``.

Example:
    >>> builtin_plan("llama", "5.23.0").tp_plan["model.layers.*.self_attn.o_proj"]
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


# A release as pip and transformers.__version__ spell it: "5.24", "5.24.0", "5.25.0.dev0", "5.24.0rc1"
VERSION_PATTERN = re.compile(r"[0-9]{1,4}\.[0-9]{1,4}(?:\.[0-9]{1,4})?(?:[.+-]?[0-9A-Za-z]{1,16}){0,4}")
# What an artifact without a recorded version followed: every plan before the field existed came from 5.23.
UNRECORDED_VERSION = "5.23"
CHANGES_NAME = "CHANGES.json"
INDEX_NAME = "INDEX.json"


def minor_version(version: str) -> str | None:
    """``"5.24.0"`` → ``"5.24"``; ``None`` for anything that is not a release number."""
    if not VERSION_PATTERN.fullmatch(version):
        return None
    major, minor = version.split(".")[:2]
    return f"{int(major)}.{int(minor)}"


def _order(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


class PlanSets:
    """The plan folders under ``root``, one per transformers minor release, read lazily and cached.

    ``plan(model_type, version)`` is the record in the newest folder at or below ``version``'s minor that has one,
    unless a folder on the way lists the type as ``removed`` in its ``CHANGES.json``.
    """

    def __init__(self, root: Any) -> None:
        self.root = root  # a pathlib.Path or an importlib.resources Traversable
        self._plans: dict[tuple[str, str], BuiltinPlan | None] = {}
        self._names: dict[str, tuple[str, ...]] = {}

    @functools.cached_property
    def versions(self) -> tuple[str, ...]:
        """The minor releases with a folder, oldest first."""
        folders = [p.name for p in self.root.iterdir() if p.is_dir() and minor_version(p.name) == p.name]
        return tuple(sorted(folders, key=_order))

    def known(self, version: str) -> bool:
        return minor_version(version) in self.versions

    def chain(self, version: str) -> tuple[str, ...]:
        """The folders a lookup under ``version`` reads, newest first (``version``'s own minor, then older)."""
        minor = minor_version(version)
        if minor is None:
            return ()
        return tuple(v for v in reversed(self.versions) if _order(v) <= _order(minor))

    def changes(self, minor: str) -> dict[str, list[str]]:
        path = self.root / minor / CHANGES_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def names(self, version: str) -> tuple[str, ...]:
        """The model types with a built-in plan under ``version``."""
        minor = minor_version(version) or version
        if minor not in self._names:
            found: set[str] = set()
            for folder in reversed(self.chain(minor)):  # oldest first
                found -= set(self.changes(folder).get("removed", []))
                found |= {
                    p.name[: -len(".json")]
                    for p in (self.root / folder).iterdir()
                    if p.name.endswith(".json") and p.name not in (INDEX_NAME, CHANGES_NAME)
                }
            self._names[minor] = tuple(sorted(found))
        return self._names[minor]

    def plan(self, model_type: str, version: str) -> BuiltinPlan | None:
        """The record of ``model_type`` under ``version``, or ``None`` when that release has no plan for it."""
        minor = minor_version(version) or version
        if (model_type, minor) not in self._plans:
            found = None
            if model_type in self.names(minor):
                folder = next(v for v in self.chain(minor) if (self.root / v / f"{model_type}.json").is_file())
                found = BuiltinPlan.from_json(json.loads((self.root / folder / f"{model_type}.json").read_text()))
            self._plans[(model_type, minor)] = found
        return self._plans[(model_type, minor)]

    def first_with(self, model_type: str) -> str | None:
        """The oldest minor release with a plan for ``model_type``."""
        return next((v for v in self.versions if self.plan(model_type, v) is not None), None)


@functools.cache
def plan_sets() -> PlanSets:
    """The plan folders installed with reshard."""
    return PlanSets(resources.files("reshard.manifests") / "plans")


def installed_transformers() -> str | None:
    """The installed transformers' version (from its package metadata: transformers is not imported), or ``None``."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def plans_version(requested: str | None = None) -> str:
    """The transformers release whose built-in plans and conversions a conversion follows: ``requested``, else
    the installed one, else (transformers not installed) the newest release reshard has plans for. A release
    reshard has no plans for is refused: its plans may differ, and the artifact would be another model."""
    sets = plan_sets()
    if requested is None:
        installed = installed_transformers()
        if installed is None:
            return sets.versions[-1]
        version, what = installed, "is installed"
    else:
        version, what = requested, "was asked for (--transformers)"
    if not isinstance(version, str) or minor_version(version) is None:
        raise PlanError(f"transformers version {version!r} {what}: not a release number such as 5.24.0")
    if not sets.known(version):
        raise PlanError(
            f"transformers {version} {what}, but reshard has the built-in plans of transformers "
            f"{', '.join(sets.versions)} only (transformers>={sets.versions[0]},<{_next(sets.versions[-1])}); "
            "install one of them, or pass --transformers VERSION: the release the artifact will be loaded with"
        )
    return version


def _next(minor: str) -> str:
    major, number = _order(minor)
    return f"{major}.{number + 1}"


def builtin_plan_names(version: str) -> tuple[str, ...]:
    """The model types with a built-in plan under transformers ``version``."""
    return plan_sets().names(version)


def builtin_plan(model_type: str, version: str) -> BuiltinPlan:
    """The built-in plan of ``model_type`` under transformers ``version`` (callers copy the dicts they change)."""
    sets = plan_sets()
    plan = sets.plan(model_type, version)
    if plan is not None:
        return plan
    first = sets.first_with(model_type)
    if first is not None and _order(first) > _order(minor_version(version) or first):
        raise PlanError(
            f"{model_type} has a tensor-parallel plan from transformers {first}; this conversion follows transformers "
            f"{version} (the installed one, or --transformers): install transformers {first} or pass --plan PLAN.json"
        )
    raise PlanError(
        f"no built-in tensor-parallel plan for model_type {model_type!r} (transformers {version} has none, or it is "
        f"not a causal LM); pass --plan PLAN.json. Known: {', '.join(sets.names(version))}"
    )


def plan_for_config(config: dict[str, Any], version: str) -> BuiltinPlan | None:
    """The built-in plan of a config's ``model_type`` under transformers ``version``, or ``None`` when there is none."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    return plan_sets().plan(model_type, version)


def conversions_of(plan: BuiltinPlan | None) -> tuple[tuple[ConverterRecord, ...], tuple[ConverterRecord, ...], str]:
    """The key renamings, weight converters and base-model prefix a plan record makes transformers apply at load
    (none without one)."""
    return (plan.renamings, plan.key_converters, plan.base_model_prefix) if plan is not None else ((), (), "")


def expert_rule_matcher(ep_plan: dict[str, str]) -> Callable[[str], bool]:
    """Whether a plan rule names an expert-parallel module or one of its children (EP rules take precedence over
    TP rules there, as in transformers' ``_resolve_parallel_plans``)."""
    if not ep_plan:
        return lambda rule: False
    pattern = re.compile(rf"(?:{'|'.join(map(re.escape, ep_plan))})(?:\..+)?")
    return lambda rule: pattern.fullmatch(rule) is not None
