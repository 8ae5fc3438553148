"""Resolve a tensor-parallel plan and assign a style to every tensor of a checkpoint. Pure, no tensor I/O.

A plan maps module names, with ``*`` standing for a layer number, to style names, exactly like transformers'
``model._tp_plan`` (``{"model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}``).
``auto`` reads the built-in plan for the config's ``model_type`` and the transformers release the conversion follows
(``plans.plans_version``) from ``manifests/plans/``, generated under each release by ``scripts/generate_plans.py`` so
that the offline stage needs no transformers at run time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reshard.manifests.errors import PlanError
from reshard.manifests.layout import STYLES
from reshard.manifests.names import generic_name, style_of
from reshard.manifests.plans import builtin_plan, expert_rule_matcher, plan_for_config


def load_plan(plan: str | dict[str, str], config: dict[str, Any], version: str) -> dict[str, str]:
    """Resolve ``"auto"`` (the built-in plan under transformers ``version``), a path to a JSON plan, inline JSON or a
    dict into a validated ``{rule: style}`` plan."""
    if isinstance(plan, dict):
        resolved = dict(plan)
        origin = "plan"
    elif plan == "auto":
        model_type = config.get("model_type")
        if not model_type:
            raise PlanError("config.json has no model_type, so --plan auto cannot pick a plan; pass --plan PLAN.json")
        resolved = dict(builtin_plan(model_type, version).tp_plan)
        origin = f"built-in plan for {model_type}"
        if not resolved:
            raise PlanError(f"{model_type} has no tensor-parallel plan in transformers {version} (EP only)")
    elif plan.lstrip().startswith("{"):  # an inline JSON plan (how local workers receive a plan dict)
        origin = "plan"
        try:
            resolved = json.loads(plan)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not valid JSON ({exc})") from exc
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


def merged_plan(rules: dict[str, str], config: dict[str, Any], version: str) -> dict[str, str]:
    """A custom plan as transformers applies ``DistributedConfig(tp_plan=rules)``: the rules override the model's
    own plan rule by rule and the other rules are kept; an empty dict applies no rule at all."""
    if not rules:
        return {}
    builtin = plan_for_config(config, version)
    return {**(builtin.tp_plan if builtin else {}), **rules}


def assign_styles(
    tensor_names: list[str], plan: dict[str, str], *, tied_embeddings: bool, checked: Iterable[str] = ()
) -> dict[str, str | None]:
    """Give every tensor its style (None: unplanned, kept whole on every rank).

    A rule in ``checked`` (a custom plan's own rules) that names no module or tensor of the checkpoint is an error,
    as transformers refuses it; the head's rule may match nothing when the embeddings are tied (its weight is the
    embedding's). The model's own rules may match nothing (transformers then only warns).
    """
    styles = {name: style_of(name, plan) for name in tensor_names}  # load_plan has checked every style
    if checked:
        generic = {generic_name(n) for n in tensor_names}
        for rule in checked:
            matched = any(g == rule or g.startswith(rule + ".") for g in generic)
            if not matched and not (tied_embeddings and rule.rpartition(".")[2] in ("lm_head", "embed_out")):
                raise PlanError(f"plan rule {rule!r} matches no tensor of the checkpoint")
    return styles


def split_expert_parallel(
    config: dict[str, Any], tp_plan: dict[str, str], version: str
) -> tuple[dict[str, str], dict[str, str]]:
    """transformers' EP resolution: the built-in ``ep_plan``, and ``tp_plan`` without rules on EP modules or their
    children (EP rules take precedence, as in ``_resolve_parallel_plans``)."""
    builtin = plan_for_config(config, version)
    ep_plan = dict(builtin.ep_plan) if builtin else {}
    if not ep_plan:
        model_type = config.get("model_type") or "this model"
        raise PlanError(f"{model_type} has no expert-parallel plan in transformers; drop --ep")
    is_expert = expert_rule_matcher(ep_plan)
    return {rule: style for rule, style in tp_plan.items() if not is_expert(rule)}, ep_plan


__all__ = ["assign_styles", "generic_name", "load_plan", "merged_plan", "split_expert_parallel", "style_of"]
