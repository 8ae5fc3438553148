"""Hub key layouts against transformers itself, under torchrun on 2 ranks: a composite model's checkpoint in its
Hub format (gemma3: ``language_model.model.*``, ``vision_tower.vision_model.*``) and a base model's checkpoint
(``AutoModel.save_pretrained``: no ``model.`` prefix) load through reshard as ``from_pretrained(..., tp_plan="auto")``
loads them: parameter names, placements and values, logits ``torch.equal``, greedy generate. The conversion records
each renamed key, and consolidation gives the checkpoint's own keys and bytes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests import read_manifest
from tests.helpers.hub_layouts import LAYOUTS, make_layout
from tests.test_runtime_tp import check_identical_to_transformers, run, strip_to_rank

pytest.importorskip("transformers")


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for layout in LAYOUTS:
        source = make_layout(layout, root / layout)
        artifact = root / f"{layout}-tp2"
        reshard.convert(source, artifact, tp=2, progress=False)
        out[layout] = (source, artifact)
    return out


@pytest.fixture(scope="module")
def two_ranks(layouts, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub-run")
    spec = []
    for layout, (source, artifact) in layouts.items():
        stripped = [str(strip_to_rank(artifact, rank, root / f"{layout}-only{rank}")) for rank in range(2)]
        spec.append(
            {"name": layout, "kind": "compare", "source": str(source), "artifact": str(artifact), "stripped": stripped}
        )
    return run(spec, 2, root / "out")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_layout_loads_as_transformers_loads_it(two_ranks, layout: str) -> None:
    for result in (r[layout] for r in two_ranks):
        check_identical_to_transformers(result)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_renamed_keys_are_recorded_and_consolidate_back(layouts, layout: str, tmp_path: Path) -> None:
    source, artifact = layouts[layout]
    manifest = read_manifest(artifact)
    original = tensors_of(source)
    renamed = manifest.options.renamed or {}
    assert sorted(renamed.values()) == sorted(original)  # every key of these layouts is renamed at load
    assert all(name.startswith("model.") for name in renamed)
    resharded = tmp_path / "tp1"  # re-sharding keeps the record: the re-sharded artifact consolidates back as well
    assert reshard.convert(artifact, resharded, tp=1, progress=False).options.renamed == renamed
    for folder in (artifact, resharded):
        consolidate(folder, tmp_path / f"back-{folder.name}", progress=False)
        back = tensors_of(tmp_path / f"back-{folder.name}")
        assert sorted(back) == sorted(original)
        assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in original.items())
