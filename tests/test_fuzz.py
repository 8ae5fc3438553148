"""Seeded fuzz of manifests and rank-file headers (``scripts/fuzz.py``): several hundred mutants, forged records in
re-digested manifests among them, each refused with a documented exit code or accepted only when its parsed
content is the original's or it is provably harmless; no traceback, no hang."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import reshard
from tests.helpers.checkpoints import make_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"


def load_fuzz():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("reshard_fuzz", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("seed", "pp"), [(0, None), (1, None), (2, 2)])
def test_no_mutant_crashes_hangs_or_passes_changed(tmp_path: Path, seed: int, pp: int | None) -> None:
    """Seed 2 mutates an artifact with pipeline stages (the stage split, each tensor's stages, 4 rank files)."""
    fuzz = load_fuzz()
    original = tmp_path / "art"
    source = make_checkpoint("llama", tmp_path / "src", num_hidden_layers=3)
    reshard.convert(source, original, tp=2, pp=pp, progress=False)
    outcomes = fuzz.run(original, 200, seed, tmp_path / "mutants")
    findings = {key: count for key, count in outcomes.items() if key.startswith("FINDING")}
    assert not findings, findings
    assert sum(outcomes.values()) == 200
    forged = sum(count for key, count in outcomes.items() if key.startswith("forged"))
    refused = sum(count for key, count in outcomes.items() if key.startswith("forged") and key.endswith("exit 6"))
    assert forged > 30 and refused > 25, outcomes  # the re-sealed forgeries are there, and refused
