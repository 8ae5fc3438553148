"""For every model type with a built-in plan: the names reshard's conversion gives a checkpoint's keys are the names
transformers' own loader gives them (its ``rename_source_key`` with ``get_model_conversion_mapping``, the base
model's prefix and the fallback to a name the model has, as ``convert_and_load_state_dict_in_model`` calls them).

Key lists per type, from the model built on the meta device (no weights): the checkpoint form (the state dict
through ``revert_weight_conversion``, what ``save_pretrained`` writes), the Hub form of a composite model (every
conversion reverted, a sub-model's prefix change included: gemma3's ``vision_tower.vision_model.*``), the base
model's checkpoint (``AutoModel.save_pretrained``: no ``model.`` prefix), and the model's own names.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from reshard.manifests.chunks import StoredTensor, contiguous
from reshard.manifests.plans import builtin_plan, builtin_plan_names, plans_version
from reshard.planning.job import converted
from reshard.planning.meta_names import names_for
from reshard.transforms.converters import replayable

pytest.importorskip("transformers")


def _meta_model(model_type: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers.tester_configs import tiny_config

    try:
        config = tiny_config(model_type)
    except Exception:  # a type the tester defaults do not fit: its default config
        config = AutoConfig.for_model(model_type)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def _transformers_names(model: Any, keys: list[str]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Each key's model names as transformers' loader derives them, and whether the model has them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta, prefix = model.state_dict(), model.base_model_prefix
    out = {}
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        targets = by_pattern[pattern].target_patterns if pattern is not None else [renamed]
        head, _, tail = renamed.partition(targets[0])
        out[key] = (tuple(head + target + tail for target in targets), renamed in meta)
    return out


def _key_lists(model: Any) -> dict[str, dict[str, Any]]:
    """Checkpoint keys (with meta tensors) as transformers writes them, in each form a Hub repo may have."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(model.state_dict())
    saved = revert_weight_conversion(model, dict(state))
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)  # as if loaded from the Hub
    hub = revert_weight_conversion(model, dict(state))
    del model._weight_conversions
    prefix = model.base_model_prefix + "."
    base = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
    return {"saved": saved, "hub": hub, "base": base, "model": state}


DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32", "bool": "BOOL"}


def _table(tensors: dict[str, Any]) -> dict[str, StoredTensor]:
    """A table of the keys as a checkpoint would hold them (the bytes are never read)."""
    table, offset = {}, 0
    for key, tensor in tensors.items():
        dtype = DTYPES.get(str(tensor.dtype).removeprefix("torch."), "F32")
        nbytes = tensor.numel() * tensor.element_size()
        table[key] = StoredTensor(key, dtype, tuple(tensor.shape), contiguous("x.safetensors", offset, nbytes))
        offset += nbytes
    return table


@pytest.mark.parametrize("model_type", builtin_plan_names(plans_version()))
def test_reshard_names_every_key_as_transformers_loader_does(model_type: str):
    plan = builtin_plan(model_type, plans_version())
    model = _meta_model(model_type)
    config = model.config.to_dict()
    for form, tensors in _key_lists(model).items():
        keys = list(tensors)
        theirs = _transformers_names(model, keys)
        ours = {key: (name.final, name.loaded) for key, name in names_for(keys, plan, config).items()}
        differ = [key for key in keys if ours[key] != theirs[key]]
        assert not differ, f"{form}: {differ[0]!r}: reshard {ours[differ[0]]}, transformers {theirs[differ[0]]}"
        if not all(replayable(c) for c in (*plan.renamings, *plan.key_converters)):
            continue  # a type reshard refuses at conversion (its converters are not replayed)
        table, _ = converted(_table(tensors), plan, dict(plan.tp_plan), 2, f"{model_type} ({form})", config)
        loaded = {name for names, has in theirs.values() if has for name in names}
        assert loaded <= set(table), f"{form}: {sorted(loaded - set(table))[:3]} not made by reshard's conversion"
