"""The model's own tensor names for a config, when the built-in plan's (recorded from the default config) do not
explain a checkpoint's keys.

transformers decides a key's name against the state dict of the model it builds from this very config (the base
model's prefix added only where the prefixed name is the model's, a key kept where renaming would lose it). The
built-in plan records the names of the default config's model; a config that switches a part on (kimi_linear's
``q_lora_rank``) has names that list lacks. So when some key is not one of the plan's names, the model is built on
the meta device from the config (no weights, no initialisation) and its names are used instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from reshard.manifests.keymap import KeyName, model_names
from reshard.manifests.plans import BuiltinPlan
from reshard.planning.tp_plan import generic_name


def names_for(keys: Iterable[str], plan: BuiltinPlan, config: dict[str, Any] | None) -> dict[str, KeyName]:
    """Every key's name in the model, as transformers' loader derives it for a model of ``config``."""
    keys = list(keys)
    names = model_names(keys, plan)
    if config is None or all(name.loaded for name in names.values()):
        return names
    parameters = config_parameters(config)
    return model_names(keys, plan, parameters) if parameters is not None else names


def config_parameters(config: dict[str, Any]) -> tuple[str, ...] | None:
    """The state-dict names (layer numbers as ``*``) of the causal LM transformers builds from ``config``, or None
    when transformers is not installed or cannot build it (the plan's names are used then)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights
    except ImportError:
        return None
    try:
        with warnings.catch_warnings(), torch.device("meta"), no_init_weights():
            warnings.simplefilter("ignore")
            model_config = AutoConfig.for_model(**config)
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # a config transformers cannot build is refused later, at load, with its own message
        return None
    return tuple(sorted({generic_name(name) for name in model.state_dict()}))
