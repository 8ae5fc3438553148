"""Generate the built-in tensor/expert-parallel plans of the installed transformers in ``manifests/plans/<minor>``.

For every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the causal-LM class is built on the meta device from
its default config, and the resolved plans are read from ``model._tp_plan`` / ``model._ep_plan``: this is what
``PreTrainedModel.post_init -> init_parallel_plans`` computes and what ``from_pretrained`` shards with when the
plan is ``"auto"`` (only a dict given in ``DistributedConfig`` overrides it).

The oldest release's folder holds every model type and ``INDEX.json``; a newer release's folder holds only the types
whose record differs from the release below it (ignoring ``transformers_version``) or is new, and ``CHANGES.json``
saying which changed, are new, or lost their plan (``manifests/plans.py`` resolves a type through the folders).
Adding a release is one run under it; after a change to what is extracted, run it under each release, oldest first.

Usage::

    python scripts/generate_plans.py            # (re)write manifests/plans/<installed minor>/
    python scripts/generate_plans.py --check    # exit 1 if that folder is stale
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from reshard.manifests.plans import CHANGES_NAME, INDEX_NAME, BuiltinPlan, ConverterRecord, PlanSets, minor_version

PLANS_DIR = Path(__file__).resolve().parent.parent / "manifests" / "plans"


def build_plan(model_type: str) -> BuiltinPlan:
    """Build the causal LM of ``model_type`` on the meta device and return its resolved TP/EP plans."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    try:  # every optional tower present: its rules are in the plan of any checkpoint that has it
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(with_every_sub_config(config))
    except Exception:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    plans = {"tp_plan": dict(model._tp_plan or {}), "ep_plan": dict(model._ep_plan or {})}
    for name, plan in plans.items():
        bad = {k: v for k, v in plan.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"non-string {name} entries: {bad}")
    renamings, converters = _key_conversions(model)
    parameters = sorted({re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name) for name in model.state_dict()})
    return BuiltinPlan(
        model_type,
        type(model).__name__,
        transformers.__version__,
        **plans,
        renamings=tuple(ConverterRecord.from_json(r) for r in renamings),
        key_converters=tuple(ConverterRecord.from_json(c) for c in converters),
        parameters=tuple(parameters),
        base_model_prefix=str(model.base_model_prefix or ""),
    )


def with_every_sub_config(config: Any) -> Any:
    """``config`` with each optional sub-config it leaves ``None`` by default (gemma4's ``vision_config`` and
    ``audio_config``) set to that sub-config's defaults. transformers adds a tower's ``base_model_tp_plan`` to the
    model's plan when the checkpoint's config has the tower (``init_parallel_plans``), so a plan recorded from the
    bare default config would miss the rules transformers applies to a Hub checkpoint's towers."""
    import copy

    from transformers import AutoConfig

    config = copy.deepcopy(config)
    for name, sub_class in (getattr(config, "sub_configs", None) or {}).items():
        if getattr(config, name, None) is None and sub_class is not AutoConfig:
            setattr(config, name, sub_class())
    return config


def _key_conversions(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The checkpoint-key renamings and weight converters transformers' loader applies for this model, each list in
    the loader's order: ``get_model_conversion_mapping`` as ``from_pretrained`` calls it (the sub-models'
    transforms scoped to their prefix, the legacy renamings last), as data reshard can replay."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renamings: list[dict[str, Any]] = []
    converters: list[dict[str, Any]] = []
    for transform in get_model_conversion_mapping(model):
        operations = [
            [type(op).__name__, {k: v for k, v in sorted(vars(op).items()) if isinstance(v, (int, str)) or v is None}]
            for op in getattr(transform, "operations", [])
        ]
        if isinstance(offset := getattr(transform, "offset", None), int):  # Inkling2IndexOffsetWeightRename's
            operations.append(["IndexOffset", {"offset": offset}])
        record = {
            "kind": type(transform).__name__,
            "sources": list(transform.source_patterns),
            "targets": list(transform.target_patterns),
            "operations": operations,
            "pattern": transform.compiled_sources.pattern,
            "scope_prefix": transform.scope_prefix,
            "base_model_prefix": transform.base_model_prefix,
        }
        if isinstance(transform, WeightRenaming):
            renamings.append(record)
        elif isinstance(transform, WeightConverter):
            converters.append(record)
        else:
            raise TypeError(f"{type(transform).__name__}: neither a renaming nor a converter")
    return renamings, converters


def dumps(document: dict[str, Any]) -> str:
    """Serialize deterministically: 2-space indent, sorted keys, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> tuple[dict[str, str], dict[str, str]]:
    """Return ``({file name: content}, {skipped model type: reason})`` for every causal-LM model type (every file,
    as the oldest release's folder holds them; ``differences`` keeps a newer release's own)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    files: dict[str, str] = {}
    index: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = build_plan(model_type)
        except Exception as exc:  # any build failure is reported and skipped
            first_line = (str(exc).strip().splitlines() or [""])[0]
            skipped[model_type] = f"build failed: {type(exc).__name__}: {first_line}"[:200]
            continue
        if not plan.tp_plan and not plan.ep_plan:
            skipped[model_type] = "empty tp_plan and ep_plan"
            continue
        document = plan.to_json()
        files[f"{model_type}.json"] = dumps(document)
        index[model_type] = {"architecture": document["architecture"], "styles": document["styles"]}
    files[INDEX_NAME] = dumps(index)
    return files, skipped


def differences(files: dict[str, str], version: str, plans: PlanSets) -> dict[str, str]:
    """The files of ``version``'s folder: all of ``files`` when no older release has a folder, else the records that
    differ from (or are absent in) the plans the older releases resolve to, and ``CHANGES.json``."""
    minor = minor_version(version)
    assert minor is not None, version
    below = [v for v in plans.versions if tuple(map(int, v.split("."))) < tuple(map(int, minor.split(".")))]
    if not below:
        return files
    base = below[-1]
    records = {name[: -len(".json")]: json.loads(text) for name, text in files.items() if name != INDEX_NAME}
    changes: dict[str, Any] = {"base": base, "transformers_version": version, "changed": [], "new": [], "removed": []}
    kept: dict[str, str] = {}
    for model_type, document in sorted(records.items()):
        previous = plans.plan(model_type, base)
        if previous is None:
            changes["new"].append(model_type)
        elif _without_version(previous.to_json()) != _without_version(document):
            changes["changed"].append(model_type)
        else:
            continue
        kept[f"{model_type}.json"] = files[f"{model_type}.json"]
    changes["removed"] = sorted(set(plans.names(base)) - set(records))
    kept[CHANGES_NAME] = dumps(changes)
    return kept


def _without_version(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "transformers_version"}


def summary(files: dict[str, str]) -> str:
    """One line: what the folder's release changes (or that it is the base, with every type)."""
    if CHANGES_NAME not in files:
        return f"{len(files) - 1} model types (the oldest release: every type)"
    changes = json.loads(files[CHANGES_NAME])
    parts = [f"{len(changes[key])} {key}" for key in ("changed", "new", "removed")]
    return f"{', '.join(parts)} vs transformers {changes['base']}"


def diff(files: dict[str, str], out_dir: Path) -> list[str]:
    """List the files that are missing, different or stale in ``out_dir``."""
    problems = []
    for name, content in files.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"missing: {name}")
        elif path.read_bytes() != content.encode("utf-8"):
            problems.append(f"differs: {name}")
    if out_dir.is_dir():
        problems += [f"stale: {p.name}" for p in sorted(out_dir.glob("*.json")) if p.name not in files]
    return problems


def write(files: dict[str, str], out_dir: Path) -> None:
    """Write ``files`` into ``out_dir`` and delete JSON files that are no longer generated."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for name, content in files.items():
        (out_dir / name).write_bytes(content.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    import transformers

    version = transformers.__version__
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: manifests/plans/<minor>)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ, write nothing")
    args = parser.parse_args(argv)
    out = args.out or PLANS_DIR / str(minor_version(version))

    files, skipped = generate()
    print(f"{len(files) - 1} plans generated, {len(skipped)} model types skipped:")
    for model_type, reason in sorted(skipped.items()):
        print(f"  {model_type}: {reason}")
    files = differences(files, version, PlanSets(PLANS_DIR))
    print(f"transformers {version}: {summary(files)}")

    if args.check:
        problems = diff(files, out)
        for problem in problems:
            print(problem, file=sys.stderr)
        print("plans are stale" if problems else "plans are up to date", file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    write(files, out)
    print(f"wrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
