"""Plan rules and tensor names: the one lookup transformers uses to find a tensor's rule (layer numbers as ``*``)."""

from __future__ import annotations

import re

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
