"""``reshard check``: can a model be split at these tp sizes and into these pipeline stages? From config.json, and
for a local checkpoint folder from its safetensors headers too (no weight is read): would transformers load every
parameter from it, and which tensors would it ignore (the conversion's load report)."""

from __future__ import annotations

from pathlib import Path

from reshard.manifests.plans import plans_version
from reshard.manifests.preflight import Verdict, check_shardability, pipeline_verdict
from reshard.planning.conversions import model_table
from reshard.planning.tp_plan import load_plan, merged_plan
from reshard.planning.unused import load_check
from reshard.source.checkpoint import read_model_config
from reshard.source.distributed_checkpoint import checkpoint_table


def check_report(
    model: str,
    tps: tuple[int, ...],
    pps: tuple[int, ...],
    plan: str,
    revision: str | None,
    replicate_kv: bool,
    transformers_version: str | None = None,
) -> tuple[list[str], bool]:
    """The lines ``reshard check`` prints (a verdict per tp, then per pp, then the load report of a local
    checkpoint) and whether anything would not work.

    A custom plan is judged merged into the model's own, as a conversion applies it; the built-in plans are those
    of ``transformers_version`` (a release), as for a conversion (``plans_version``). The pipeline split is judged
    on the tensors the conversion would put into stages: the checkpoint's, without those the model does not use."""
    version = plans_version(transformers_version)
    config = read_model_config(model, revision)
    rules = load_plan(plan, config, version)
    resolved = merged_plan(rules, config, version) if plan != "auto" else rules
    names, load = None, None
    if Path(model).expanduser().is_dir():
        _, stored = checkpoint_table(model, revision)
        table = model_table(stored, config, version)
        check = load_check(table, config, read_bytes=False)
        load = Verdict(0, check.problems, check.report.summary())
        names = [name for name in table if name not in check.unused]
    verdicts = [("tp", check_shardability(config, resolved, tp, replicate_kv)) for tp in tps]
    verdicts += [("pp", pipeline_verdict(config, pp, version, names)) for pp in pps]
    lines = []
    for dim, verdict in verdicts:
        lines += _lines(f"{dim}={verdict.tp}", verdict)
    if load is not None:
        lines += _lines("load", load)
        verdicts.append(("load", load))
    return lines, not all(verdict.ok for _, verdict in verdicts)


def _lines(size: str, verdict: Verdict) -> list[str]:
    lines = [f"{size:<6} {'ok' if verdict.ok else 'NO'}"]
    lines += [f"        ✗ {problem}" for problem in verdict.problems]
    lines += [f"        · {note}" for note in verdict.notes]
    return lines
