"""The structure the design promises, checked from the source: offline → format ← runtime, small modules.

``reshard.manifests`` (the format core) imports nothing else of reshard; the runtime (``reshard.loaders``) imports
only the core; the offline stage never imports the runtime. No module grows past 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"manifests": "reshard.manifests", "loaders": "reshard.loaders", "reshard": "reshard"}


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def reshard_imports(path: Path) -> set[str]:
    """Every ``reshard...`` module a file imports (at any depth, type-checking imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "reshard":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "reshard")
    return found


def test_the_format_core_imports_nothing_else_of_reshard():
    for path in modules("manifests"):
        outside = {m for m in reshard_imports(path) if not m.startswith("reshard.manifests")}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_runtime_imports_only_the_format_core():
    for path in modules("loaders"):
        outside = {m for m in reshard_imports(path) if not m.startswith(("reshard.manifests", "reshard.loaders"))}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_offline_stage_never_imports_the_runtime():
    for path in modules("reshard"):
        runtime = {m for m in reshard_imports(path) if m.startswith("reshard.loaders")}
        assert not runtime, f"{path.relative_to(ROOT)} imports {sorted(runtime)}"


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for folder in PARTS
        for p in modules(folder)
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
