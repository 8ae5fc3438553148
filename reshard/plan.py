"""Resolve a tensor-parallel plan and assign a style to every tensor of a checkpoint. Pure, no tensor I/O.

A plan maps module names, with ``*`` standing for a layer number, to style names, exactly like transformers'
``model._tp_plan`` (``{"model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}``).
``auto`` reads the built-in plan for the config's ``model_type`` from ``manifests/plans/``, generated from
transformers by ``scripts/generate_plans.py`` so that the offline stage needs no transformers at run time.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from reshard.errors import PlanError
from reshard.layout import STYLES

_LAYER_NUMBER = re.compile(r"\.\d+(\.|$)")


def generic_name(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` → ``model.layers.*.mlp.up_proj.weight`` (transformers' rule)."""
    return _LAYER_NUMBER.sub(lambda m: ".*" + m.group(1), name)


def style_of(tensor_name: str, plan: dict[str, str]) -> str | None:
    """The style a plan gives a tensor: a rule on the parameter itself, else on its module (transformers' lookup)."""
    generic = generic_name(tensor_name)
    if generic in plan:
        return plan[generic]
    module = generic.rpartition(".")[0]
    return plan.get(module) if module else None


@functools.cache
def builtin_plan_names() -> list[str]:
    """The model types that have a built-in plan."""
    folder = resources.files("reshard.manifests") / "plans"
    return sorted(
        p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "INDEX.json"
    )


@functools.cache
def builtin_plan(model_type: str) -> dict[str, Any]:
    """The built-in plan record for ``model_type`` (``tp_plan``, ``ep_plan``, ``architecture``, ...); read once per
    process. Callers copy what they change."""
    path = resources.files("reshard.manifests") / "plans" / f"{model_type}.json"
    if not path.is_file():
        raise PlanError(
            f"no built-in tensor-parallel plan for model_type {model_type!r} (transformers has none, or it is "
            f"not a causal LM); pass --plan PLAN.json. Known: {', '.join(builtin_plan_names())}"
        )
    return json.loads(path.read_text())


def load_plan(plan: str | dict[str, str], config: dict[str, Any]) -> dict[str, str]:
    """Resolve ``"auto"``, a path to a JSON plan, or a dict into a validated ``{rule: style}`` plan."""
    if isinstance(plan, dict):
        resolved = dict(plan)
        origin = "plan"
    elif plan == "auto":
        model_type = config.get("model_type")
        if not model_type:
            raise PlanError("config.json has no model_type, so --plan auto cannot pick a plan; pass --plan PLAN.json")
        resolved = dict(builtin_plan(model_type)["tp_plan"])
        origin = f"built-in plan for {model_type}"
        if not resolved:
            raise PlanError(f"{model_type} has no tensor-parallel plan in transformers (only expert parallel)")
    else:
        origin = str(plan)
        try:
            resolved = json.loads(Path(plan).read_text())
        except FileNotFoundError as exc:
            raise PlanError(f"{plan}: plan file not found (use --plan auto or a JSON file)") from exc
        except json.JSONDecodeError as exc:
            raise PlanError(f"{plan}: not valid JSON ({exc})") from exc
    if not isinstance(resolved, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in resolved.items()
    ):
        raise PlanError(f"{origin}: a plan is a JSON object of module pattern -> style name")
    for rule, style in resolved.items():
        if style not in STYLES:
            raise PlanError(f"{origin}: rule {rule!r} has unknown style {style!r}; known styles: {sorted(STYLES)}")
    return resolved


def key_renames(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The checkpoint-key renames transformers applies when loading this architecture (e.g. gpt_neox's
    ``embed_out.`` → ``lm_head.``), so rank files hold the names of the model's parameters."""
    model_type = config.get("model_type")
    if not model_type or model_type not in builtin_plan_names():
        return []
    return [(pattern, target) for pattern, target in builtin_plan(model_type).get("key_renames", [])]


def key_converters(config: dict[str, Any]) -> list[dict[str, Any]]:
    """transformers' load-time weight converters for this architecture (fused experts), as recorded data."""
    model_type = config.get("model_type")
    if not model_type or model_type not in builtin_plan_names():
        return []
    return list(builtin_plan(model_type).get("key_converters", []))


def model_key(checkpoint_key: str, renames: list[tuple[str, str]]) -> str:
    """The model parameter name of a checkpoint key, after transformers' renames."""
    for pattern, target in renames:
        checkpoint_key = re.sub(pattern, target, checkpoint_key)
    return checkpoint_key


def assign_styles(
    tensor_names: list[str], plan: dict[str, str], *, tied_embeddings: bool, strict: bool
) -> dict[str, str | None]:
    """Give every tensor its style (None: unplanned, kept whole on every rank).

    With ``strict`` (custom plans) a rule that names no module or tensor of the checkpoint is an error; the
    head's rule is allowed to match nothing when the embeddings are tied (its weight is the embedding's).
    """
    styles = {name: style_of(name, plan) for name in tensor_names}  # load_plan has checked every style
    if strict:
        generic = {generic_name(n) for n in tensor_names}
        for rule in plan:
            matched = any(g == rule or g.startswith(rule + ".") for g in generic)
            if not matched and not (tied_embeddings and rule.rpartition(".")[2] in ("lm_head", "embed_out")):
                raise PlanError(f"plan rule {rule!r} matches no tensor of the checkpoint")
    return styles


def split_expert_parallel(config: dict[str, Any], tp_plan: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """transformers' EP resolution: the built-in ``ep_plan``, and ``tp_plan`` without rules on EP modules or their
    children (EP rules take precedence, as in ``_resolve_parallel_plans``)."""
    model_type = config.get("model_type") or ""
    ep_plan = dict(builtin_plan(model_type).get("ep_plan", {})) if model_type in builtin_plan_names() else {}
    if not ep_plan:
        raise PlanError(f"{model_type or 'this model'} has no expert-parallel plan in transformers; drop --ep")
    is_expert = re.compile(rf"(?:{'|'.join(map(re.escape, ep_plan))})(?:\..+)?").fullmatch
    return {rule: style for rule, style in tp_plan.items() if not is_expert(rule)}, ep_plan
