"""Generate the README's architecture table from the built-in plans and the test suite's coverage.

For every model type with a transformers TP or EP plan (``manifests/plans``): which styles and key conversions it
uses, whether reshard converts it (every style and converter is one reshard reproduces), and which tests cover it:
``slices`` (rank files equal transformers' own TP shards, tests/test_transformers_slices.py) and ``runtime``
(``load_model`` equals ``from_pretrained(tp_plan="auto")``, logits included, tests/test_runtime*.py).

Usage::

    python scripts/architectures_table.py           # rewrite the table in README.md
    python scripts/architectures_table.py --check   # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reshard.experts import SUPPORTED_OPERATIONS  # noqa: E402
from reshard.layout import STYLES  # noqa: E402
from tests.helpers.checkpoints import FAMILIES, MOE_FAMILIES, RUNTIME_PARITY_FAMILIES  # noqa: E402

START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"
EP_SLICE_FAMILIES = {"qwen3_moe", "mixtral"}


def blockers(plan: dict) -> list[str]:
    """Why reshard cannot convert this model type (empty: it can)."""
    reasons = [f"style {s}" for s in plan["styles"] if s not in STYLES]
    for converter in plan.get("key_converters", []):
        operations = {name for name, _ in converter["operations"]}
        if operations not in SUPPORTED_OPERATIONS or converter["kind"] != "WeightConverter":
            reasons.append(f"converter {converter['kind']}({', '.join(sorted(operations))})")
    return reasons


def table() -> str:
    """The Markdown table, one row per model type."""
    rows = [
        "| model_type | architecture | TP styles | EP | styles & conversions supported | tested |",
        "|---|---|---|---|---|---|",
    ]
    counts = {"types": 0, "supported": 0, "tested": 0}
    for path in sorted((ROOT / "manifests" / "plans").glob("*.json")):
        if path.name == "INDEX.json":
            continue
        plan = json.loads(path.read_text())
        model_type = plan["model_type"]
        reasons = blockers(plan)
        tests = []
        if model_type in FAMILIES or model_type in MOE_FAMILIES:
            tests.append("slices")
        if model_type in EP_SLICE_FAMILIES:
            tests.append("EP slices")
        if model_type in RUNTIME_PARITY_FAMILIES:
            tests.append("runtime parity")
        fused = " + fused experts" if plan.get("key_converters") else ""
        counts["types"] += 1
        counts["supported"] += not reasons
        counts["tested"] += bool(tests)
        rows.append(
            f"| {model_type} | {plan['architecture']} | {', '.join(plan['styles']) or '—'}{fused} | "
            f"{'yes' if plan['ep_plan'] else '—'} | {'yes' if not reasons else 'no: ' + '; '.join(reasons)} | "
            f"{', '.join(tests) or '—'} |"
        )
    summary = (
        f"{counts['types']} model types have a TP or EP plan in transformers 5.23; reshard supports every style "
        f"and key conversion of {counts['supported']} of them; {counts['tested']} are covered by tests."
    )
    return "\n".join([summary, "", *rows])


def render(readme: str) -> str:
    """README text with the table between the markers replaced."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale, write nothing")
    args = parser.parse_args(argv)
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    updated = render(readme)
    if args.check:
        if updated != readme:
            print("README.md's architecture table is stale: run python scripts/architectures_table.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
