"""transformers' ``PrefixChange(prefix_to_remove=...)`` (qwen3_5_text, qwen3_5_moe_text, gemma3n_text: a text model
read from its multimodal checkpoint, ``model.language_model.`` → ``model.``) is replayed as transformers' loader
applies it, recorded only for the keys it renamed; consolidation gives the checkpoint's own keys back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests.keymap import model_names
from reshard.manifests.plans import ConverterRecord, builtin_plan
from reshard.transforms.converters import replayable

pytest.importorskip("transformers")

PREFIX = "model.language_model."


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_prefix_change_is_a_replayed_renaming_and_one_without_its_pattern_is_not():
    plan = builtin_plan("qwen3_5_text", "5.23")
    change = next(c for c in plan.renamings if c.kind == "PrefixChange")
    assert replayable(change) and change not in plan.key_converters
    names = model_names(["model.language_model.layers.0.mlp.up_proj.weight", "model.norm.weight"], plan)
    assert [n.final for n in names.values()] == [("model.layers.0.mlp.up_proj.weight",), ("model.norm.weight",)]
    adding = ConverterRecord(
        "PrefixChange", (r"^model\.(?:(?!language_model\.))(.+)",), (r"model\.language_model\.\1",), ()
    )
    assert not replayable(adding)  # no compiled pattern recorded: nothing to replay it with


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """qwen3_5_text as a text-only checkpoint (``model.*``) and as in a multimodal one (``model.language_model.*``)."""
    from tests.helpers.tester_configs import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("prefix")
    plain = make_tiny_checkpoint("qwen3_5_text", root / "plain")
    prefixed = root / "prefixed"
    prefixed.mkdir()
    shutil.copy(plain / "config.json", prefixed / "config.json")
    renamed = {
        PREFIX + k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in tensors_of(plain).items()
    }
    save_file(renamed, prefixed / "model.safetensors", metadata={"format": "pt"})
    return plain, prefixed


def test_a_prefixed_checkpoint_is_renamed_and_consolidates_back(checkpoints, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    _, prefixed = checkpoints
    manifest = reshard.convert(prefixed, tmp_path / "art", tp=2, progress=False)
    renamed = manifest.options.renamed or {}
    assert renamed and all(key == PREFIX + name.removeprefix("model.") for name, key in renamed.items())
    assert not any(t.name.startswith(PREFIX) for t in manifest.tensors)
    reference = AutoModelForCausalLM.from_pretrained(prefixed, dtype=torch.float32).state_dict()
    ranks = [load_file(tmp_path / "art" / manifest.rank_file(rank).path) for rank in range(2)]
    for entry in manifest.tensors:  # every tensor, gathered, is the one transformers loads under that name
        assert entry.placement.kind in ("shard", "plain", "replicate"), entry
        parts = [r[entry.name] for r in ranks]
        whole = torch.cat(parts, dim=entry.placement.dim or 0) if entry.placement.kind == "shard" else parts[0]
        assert torch.equal(whole, reference[entry.name]), entry.name
    consolidate(tmp_path / "art", tmp_path / "back", progress=False)
    original, back = tensors_of(prefixed), tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in original.items())


def test_a_text_only_checkpoint_records_no_prefix(checkpoints, tmp_path: Path):
    plain, _ = checkpoints
    manifest = reshard.convert(plain, tmp_path / "art", tp=2, progress=False)
    assert manifest.options.key_renames == () and manifest.options.renamed is None
    consolidate(tmp_path / "art", tmp_path / "back", progress=False)
    assert sorted(tensors_of(tmp_path / "back")) == sorted(tensors_of(plain))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "qwen3_5_text"
