"""A checkpoint's tensors as the model's: the conversions transformers' loader applies to their keys (renamings,
then converters) replayed on the tensor table, with the records of what was done, and refused where the replay would
not give the tensors transformers fills. Names, shapes and chunks only: no byte is read."""

from __future__ import annotations

import re
from typing import Any

from reshard.manifests import keymap
from reshard.manifests.errors import PlanError
from reshard.manifests.plans import UNRECORDED_VERSION, BuiltinPlan, plan_for_config
from reshard.manifests.transforms import Transforms
from reshard.planning.meta_names import names_for
from reshard.planning.tp_plan import style_of
from reshard.transforms import Context, Table, chain


def converted(
    stored: Table,
    builtin: BuiltinPlan | None,
    plan: dict[str, str],
    tp: int,
    origin: str,
    config: dict[str, Any] | None = None,
    version: str = UNRECORDED_VERSION,
    *,
    tp_plan: dict[str, str] | None = None,
    replicate_kv: bool = False,
) -> tuple[Table, Transforms]:
    """The checkpoint's tensors as the model's, by the conversions transformers' loader applies to their keys
    (renamings, then converters) and the KV heads replicated if ``replicate_kv`` and the tp needs it (along
    ``tp_plan``, the plan without its expert-parallel rules; ``plan`` by default): every transform of the chain
    applied, with the records of what was done. Refused when the replay does not give the tensors transformers
    fills."""
    converters = builtin.key_converters if builtin else ()
    names = names_for(stored, builtin, config) if builtin else {}
    context = Context(
        tp=tp,
        plan=plan if tp_plan is None else tp_plan,
        style=lambda name: style_of(name, plan),
        config=config or {},
        converters=converters,
        names=names,
        replicate_kv=replicate_kv,
    )
    table, records = chain.forward(stored, context)
    refuse_unreplayed(table, converters, origin, version)
    keymap.require_same(table, names, origin)
    return table, records


def refuse_unreplayed(table: Table, converters: tuple[Any, ...], origin: str, version: str) -> None:
    """A tensor that one of transformers' load-time converters reshard does not replay (a ``Split`` of a fused
    projection, a layer collapse, vocabulary unpadding) would reach the runtime unconverted, and transformers' model
    would initialise the parameters it expects from it at random: refused, naming the tensor and the converter."""
    from reshard.transforms.converters import replayable

    for converter in converters:
        if replayable(converter):
            continue
        for source in converter.sources:
            try:
                pattern = re.compile(source)  # transformers' sources are regexes, searched in each key
            except re.error:
                pattern = re.compile(re.escape(source))
            if hit := next((name for name in table if pattern.search(name)), None):
                operations = ", ".join(name for name, _ in converter.operations) or converter.kind
                raise PlanError(
                    f"{origin}: tensor {hit!r}: transformers {version} converts it at load ({operations}), which "
                    "reshard does not replay; the artifact would be another model"
                )


def model_table(stored: Table, config: dict[str, Any], version: str) -> Table:
    """A checkpoint's tensors under the model's names, as transformers' load-time conversions make them (for
    ``reshard check``: names and shapes only, no byte read)."""
    table, _ = converted(stored, plan_for_config(config, version), {}, 1, "checkpoint", config, version)
    return table
