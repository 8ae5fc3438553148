"""``reshard check``: can a model be split at these tp sizes and into these pipeline stages? From config.json alone."""

from __future__ import annotations

from reshard.manifests.plans import plans_version
from reshard.manifests.preflight import Verdict, check_shardability, pipeline_verdict
from reshard.planning.tp_plan import load_plan, merged_plan
from reshard.source.checkpoint import read_model_config


def check_report(
    model: str,
    tps: tuple[int, ...],
    pps: tuple[int, ...],
    plan: str,
    revision: str | None,
    replicate_kv: bool,
    transformers_version: str | None = None,
) -> tuple[list[str], bool]:
    """The lines ``reshard check`` prints (a verdict per tp, then per pp) and whether any size would not work.

    A custom plan is judged merged into the model's own, as a conversion applies it; the built-in plans are those
    of ``transformers_version`` (a release), as for a conversion (``plans_version``)."""
    version = plans_version(transformers_version)
    config = read_model_config(model, revision)
    rules = load_plan(plan, config, version)
    resolved = merged_plan(rules, config, version) if plan != "auto" else rules
    verdicts = [("tp", check_shardability(config, resolved, tp, replicate_kv)) for tp in tps]
    verdicts += [("pp", pipeline_verdict(config, pp, version)) for pp in pps]
    lines = []
    for dim, verdict in verdicts:
        lines += _lines(dim, verdict)
    return lines, not all(verdict.ok for _, verdict in verdicts)


def _lines(dim: str, verdict: Verdict) -> list[str]:
    size = f"{dim}={verdict.tp}"
    lines = [f"{size:<6} {'ok' if verdict.ok else 'NO'}"]
    lines += [f"        ✗ {problem}" for problem in verdict.problems]
    lines += [f"        · {note}" for note in verdict.notes]
    return lines
