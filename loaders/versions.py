"""Whether the installed transformers builds the model an artifact was made for: same placements, same conversions.

An artifact follows the built-in plan and load-time key conversions of one transformers release (the manifest's
``transformers_version``). Another release may place a parameter differently (5.24 shards lfm2's embeddings, which
5.23 keeps whole) or convert the checkpoint's keys differently (5.24 renames inkling2's attention modules). Loading
such an artifact would give another model than the installed transformers' ``from_pretrained`` (a tied lfm2 made for
5.23 and loaded under 5.24 computes other logits), so ``check_release`` refuses it with one line: the first
difference and the command that converts again. Where the two releases' plans and conversions agree, the artifact
loads under either.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from reshard.manifests.errors import PlanError
from reshard.manifests.plans import UNRECORDED_VERSION, conversions_of, expert_rule_matcher, plan_sets

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from reshard.manifests import Manifest


def check_release(model: PreTrainedModel, manifest: Manifest, origin: str, *, tp: bool, ep: bool) -> None:
    """Raise ``PlanError`` unless the installed transformers, given the artifact's mesh (``tp``: a tensor-parallel
    mesh; ``ep``: an expert-parallel one), places every parameter of ``model`` (its meta model) as the artifact does
    and converts the checkpoint's keys as the release the artifact follows did."""
    import transformers

    installed, sets = transformers.__version__, plan_sets()
    recorded = manifest.transformers_version or UNRECORDED_VERSION
    if not sets.known(installed):
        raise PlanError(
            f"{origin}: transformers {installed} is installed, but this reshard knows the plans and key conversions "
            f"of transformers {', '.join(sets.versions)} only, so it cannot tell whether {installed} builds the model "
            f"this artifact holds (made for {recorded}); install transformers {recorded}"
        )
    again = f"convert again under the installed release: {reconvert_command(manifest)}"
    if difference := _placement_difference(model, manifest, tp=tp, ep=ep):
        name, theirs, ours = difference
        raise PlanError(
            f"{origin}: transformers {installed} (installed) makes {name} {theirs}, but this artifact, made for "
            f"transformers {recorded}, holds it {ours}; {again}"
        )
    model_type = manifest.model_type
    if model_type is not None:
        made, now = (conversions_of(sets.plan(model_type, version)) for version in (recorded, installed))
        if made != now:
            which = ("key renamings", "weight converters", "base-model prefix")[
                next(i for i in range(3) if made[i] != now[i])
            ]
            raise PlanError(
                f"{origin}: transformers {installed} (installed) converts {model_type} checkpoints with other "
                f"{which} than transformers {recorded}, which this artifact follows; {again}"
            )


def _placement_difference(
    model: PreTrainedModel, manifest: Manifest, *, tp: bool, ep: bool
) -> tuple[str, str, str] | None:
    """The first module or parameter (by name) whose style differs between the installed transformers' resolution
    of the model's plans, as ``_resolve_parallel_plans`` makes it for this artifact's ``DistributedConfig``, and the
    artifact's plans; ``(name, installed style, artifact style)``."""
    own_ep = dict(model.ep_plan) if ep else {}
    own_tp = dict(model.tp_plan) if tp else {}
    if tp and manifest.plan_overrides is not None:  # DistributedConfig(tp_plan=rules) merges, an empty dict clears
        own_tp = own_tp | manifest.plan_overrides if manifest.plan_overrides else {}
    is_expert = expert_rule_matcher(own_ep)
    own_tp = {rule: style for rule, style in own_tp.items() if not is_expert(rule)}
    ours_ep = dict(manifest.ep_plan) if ep else {}
    is_ours = expert_rule_matcher(ours_ep)
    ours_tp = {rule: style for rule, style in manifest.plan.items() if not is_ours(rule)} if tp else {}
    if (own_tp, own_ep) == (ours_tp, ours_ep):
        return None
    for theirs_plan, ours_plan in ((own_tp, ours_tp), (own_ep, ours_ep)):
        theirs, ours = model._expand_parallel_plan(theirs_plan), model._expand_parallel_plan(ours_plan)
        for name in sorted(set(theirs) | set(ours)):
            if theirs.get(name) != ours.get(name):
                return name, _shown(theirs.get(name)), _shown(ours.get(name))
    return None


def _shown(style: str | None) -> str:
    return style if style is not None else "unsharded (no rule)"


def reconvert_command(manifest: Manifest) -> str:
    """The ``reshard`` command that converts the artifact's source again with its options (``CHECKPOINT`` where the
    source was a local folder, which the manifest does not name)."""
    source = manifest.source
    words = ["reshard", "--tp", str(manifest.tp)]
    words += ["--pp", str(manifest.pp)] if manifest.pp > 1 else []
    words += ["--ep", str(manifest.expert_mesh["ep"])] if manifest.expert_mesh else []
    words += ["--replicate-kv"] if manifest.options.replicate_kv else []
    overrides = manifest.plan_overrides
    words += ["--plan", shlex.quote(json.dumps(overrides, sort_keys=True))] if overrides is not None else []
    words.append(source.repo_id or "CHECKPOINT")
    revision = source.commit or source.revision
    words += ["--revision", revision] if source.repo_id and revision else []
    return " ".join(words)
