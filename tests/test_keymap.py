"""Attacks on the key conversions: the manifest's record of renamed keys (wrong JSON types, two names giving back one
key, a name that is no tensor), a checkpoint whose keys collide after renaming, and a replay that does not make the
tensors transformers would fill. Each is refused in one line with its exit code; none converts into another model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reshard.manifests.chunks import StoredTensor, contiguous
from reshard.manifests.errors import ManifestError, PlanError
from reshard.manifests.keymap import model_names, require_same
from reshard.manifests.plans import builtin_plan, plans_version
from reshard.manifests.transforms import FusedTensor, Transforms

TENSORS = {"model.a.weight": ("F32", (2, 2)), "model.b.weight": ("F32", (2, 2))}


@pytest.mark.parametrize(
    "renamed",
    [
        [["model.a.weight", "a.weight"]],
        {"model.a.weight": 3},
        {"model.a.weight": ""},
        {"": "a.weight"},
        {"model.a.weight": "model.a.weight"},
        {},
        "a.weight",
    ],
)
def test_a_renamed_record_of_the_wrong_shape_is_refused(renamed: object) -> None:
    with pytest.raises(ManifestError, match=r"options\.renamed"):
        Transforms.from_json({"renamed": renamed})


@pytest.mark.parametrize(
    ("renamed", "message"),
    [
        ({"model.c.weight": "c.weight"}, "is not a tensor of this conversion"),
        ({"model.a.weight": "x.weight", "model.b.weight": "x.weight"}, "both give back checkpoint key"),
        ({"model.a.weight": "model.b.weight"}, "also the name of a tensor that is not renamed"),
    ],
)
def test_a_renamed_record_that_lies_about_the_tensors_is_a_problem(renamed: dict[str, str], message: str) -> None:
    problem = Transforms(renamed=renamed).problem(TENSORS)
    assert problem is not None and problem[0].startswith("options.renamed.") and message in problem[1]


def test_renamed_parts_of_a_fused_tensor_give_back_the_checkpoint_keys() -> None:
    options = Transforms(
        fused={"model.l.mlp.experts.down_proj": FusedTensor((("model.l.mlp.experts.0.down_proj.weight", 16),))},
        renamed={"model.l.mlp.experts.0.down_proj.weight": "l.mlp.experts.0.down_proj.weight"},
    )
    assert options.problem({"model.l.mlp.experts.down_proj": ("F32", (1, 2, 2))}) is None
    assert options.checkpoint_keys(["model.l.mlp.experts.down_proj"]) == ["l.mlp.experts.0.down_proj.weight"]
    assert Transforms.from_json(json.loads(json.dumps(options.to_json()))) == options


def test_a_base_model_key_gets_the_prefix_only_where_the_model_has_that_name() -> None:
    names = model_names(
        ["layers.0.mlp.up_proj.weight", "norm.weight", "rotary_emb.inv_freq"], builtin_plan("llama", plans_version())
    )
    assert [n.final[0] for n in names.values()] == [
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "rotary_emb.inv_freq",  # not the model's: left as it is, and reported as transformers reports it
    ]
    assert [n.loaded for n in names.values()] == [True, True, False]


def test_a_replay_that_does_not_make_transformers_tensors_is_refused() -> None:
    plan = builtin_plan("qwen3_moe", plans_version())
    keys = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(2) for p in ("gate", "up", "down")]
    names = model_names(keys, plan)
    table = {key: StoredTensor(key, "F32", (2, 2), contiguous("x", 0, 16)) for key in keys}  # nothing fused
    with pytest.raises(PlanError, match="cannot be converted exactly") as raised:
        require_same(table, names, "src")
    assert raised.value.exit_code == 4 and "\n" not in str(raised.value)


def test_two_keys_that_load_as_one_tensor_are_refused_in_one_line(tmp_path: Path) -> None:
    """gemma3's Hub key and the same tensor under the model's own name: transformers would keep one silently."""
    from tests.helpers.hub_layouts import make_layout

    source = make_layout("gemma3_saved", tmp_path / "src")
    save_file(
        {"model.language_model.norm.weight": torch.zeros(64)}, source / "extra.safetensors", metadata={"format": "pt"}
    )
    from safetensors import safe_open

    # a sharded checkpoint (an index beside model.safetensors would be ignored, as transformers ignores it)
    (source / "model.safetensors").rename(source / "main.safetensors")
    with safe_open(source / "main.safetensors", "pt") as f:
        weight_map = dict.fromkeys(f.keys(), "main.safetensors")
    weight_map["model.language_model.norm.weight"] = "extra.safetensors"
    index = {"metadata": {}, "weight_map": weight_map}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    result = subprocess.run(
        [sys.executable, "-m", "reshard", "convert", "--tp", "2", str(source), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "both load as 'model.language_model.norm.weight'" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
