"""Pipeline stages (``reshard --tp T --pp P``): each (stage, tp rank) file holds exactly that stage's tensors, as
transformers' own pipeline split places them, and loads to transformers' model.

Offline: the stage files against transformers' ``PipelineStage`` (its split, not a re-reading of it), their bytes
against a tp-only conversion's, consolidation and re-sharding back to the checkpoint's bytes, the validator on
lying manifests, and refusals. Runtime, under torchrun: pp alone against ``DistributedConfig(pp_size=2)`` (parameters
and logits equal), tp x pp (which transformers cannot load: ``KeyError``) against the unsharded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests import MANIFEST_NAME, read_manifest
from reshard.manifests.errors import ManifestError, ShardabilityError
from reshard.manifests.manifest import manifest_digest
from tests.test_runtime_tp import check_identical_to_transformers, run, strip_to_rank

LAYERS = 5  # uneven over 2 and 3 stages: the last stage takes the remainder


def checkpoint(tiny, tied: bool = False, dtype: str = "bfloat16") -> Path:
    return tiny.checkpoint("llama", num_hidden_layers=LAYERS, tie_word_embeddings=tied, dtype=dtype)


def convert(tiny, out: Path, tp: int, pp: int, tied: bool = False, dtype: str = "bfloat16") -> Path:
    if not out.exists():
        reshard.convert(checkpoint(tiny, tied, dtype), out, tp=tp, pp=pp, progress=False)
    return out


def transformers_stage(pp: int, stage: int):
    from transformers.distributed.pipeline_parallel import PipelineStage

    owner = object.__new__(PipelineStage)
    owner.pp_size, owner.pp_rank = pp, stage
    return owner


def expected_names(source: Path, pp: int, stage: int, tied: bool) -> set[str]:
    """The source's tensors transformers' split puts on ``stage`` (the tied embeddings on the last one too)."""
    names = set()
    for path in source.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names |= set(f.keys())
    owner = transformers_stage(pp, stage)
    held = set()
    for name in names:
        rank = owner.find_rank_for_key(name, LAYERS, "model")
        if rank is None or rank == stage or (tied and stage == pp - 1 and name.startswith("model.embed_tokens.")):
            held.add(name)
    return held


def file_tensors(artifact: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(artifact / read_manifest(artifact).rank_file(rank).path)


@pytest.mark.parametrize(("tp", "pp", "tied"), [(1, 2, False), (2, 2, False), (2, 2, True), (1, 3, True)])
def test_stage_files_hold_transformers_split_with_the_tp_bytes(tiny, tmp_path: Path, tp: int, pp: int, tied: bool):
    artifact = convert(tiny, tmp_path / "art", tp, pp, tied)
    plain = tiny.artifact("llama", tp=tp, num_hidden_layers=LAYERS, tie_word_embeddings=tied, dtype="bfloat16")
    manifest = read_manifest(artifact)
    assert manifest.mesh == {"pp": pp, "tp": tp} and len([f for f in manifest.files if f.rank is not None]) == pp * tp
    for stage in range(pp):
        for tp_rank in range(tp):
            tensors = file_tensors(artifact, stage * tp + tp_rank)
            assert set(tensors) == expected_names(checkpoint(tiny, tied), pp, stage, tied), (stage, tp_rank)
            reference = file_tensors(plain, tp_rank)  # the same slices as the tp-only artifact's, bit for bit
            for name, tensor in tensors.items():
                assert torch.equal(tensor, reference[name]), name


def test_consolidated_and_resharded_pipeline_artifacts_give_the_checkpoint_bytes(tiny, tmp_path: Path):
    source = checkpoint(tiny, tied=True)
    artifact = convert(tiny, tmp_path / "art", 2, 2, tied=True)
    original = {k: v for p in source.glob("*.safetensors") for k, v in load_file(p).items()}
    out = consolidate(artifact, tmp_path / "ckpt", progress=False)
    back = {k: v for p in Path(out).glob("*.safetensors") for k, v in load_file(p).items()}
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    for tp, pp, name in ((2, 1, "tp2"), (1, 3, "tp1pp3"), (2, None, "same-pp")):
        resharded = tmp_path / name
        reshard.convert(artifact, resharded, tp=tp, pp=pp, progress=False)
        direct = tmp_path / f"direct-{name}"
        reshard.convert(source, direct, tp=tp, pp=pp or 2, progress=False)
        new, ref = read_manifest(resharded), read_manifest(direct)
        assert new.mesh == ref.mesh and new.lineage["resharded_from"]["mesh"] == {"pp": 2, "tp": 2}
        assert [t.to_json() for t in new.tensors] == [t.to_json() for t in ref.tensors]  # slices and hashes


def test_workers_split_stage_files_like_one_process(tiny, tmp_path: Path):
    source, out = checkpoint(tiny), tmp_path / "workers"
    command = [sys.executable, "-m", "reshard", "--tp", "2", "--pp", "2", str(source), "-o", str(out), "-q"]
    result = subprocess.run([*command, "--workers", "2"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    single = convert(tiny, tmp_path / "single", 2, 2)
    for entry in read_manifest(single).files:
        assert (out / entry.path).read_bytes() == (single / entry.path).read_bytes(), entry.path


def edited(artifact: Path, target: Path, change) -> Path:
    """A copy of the manifest with ``change`` applied and the digest recomputed: a lie that is self-consistent."""
    target.mkdir()
    data = json.loads((artifact / MANIFEST_NAME).read_text())
    change(data)
    data["manifest_xxh3"] = manifest_digest(data)
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    for entry in read_manifest(artifact).files:
        os.link(artifact / entry.path, target / entry.path)
    return target


def _set(path: list[Any], value: Any):
    def change(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


def _layer(data: dict[str, Any], name: str) -> int:
    return next(i for i, t in enumerate(data["tensors"]) if t["name"] == name)


LIES = {
    "stage moved": (["tensors", "LAYER", "stages"], [0], "tensors[LAYER].stages: [0], but the pipeline split puts"),
    "stages dropped": (["tensors", "LAYER", "stages"], KeyError, "tensors[LAYER].stages: null"),
    "layers a string": (["pipeline", "layers"], "5", 'pipeline.layers: expected an integer, got "5"'),
    "layers changed": (["pipeline", "layers"], 4, "is in layer 4, but pipeline.layers is 4"),
    "layers more": (["pipeline", "layers"], 6, "stages: [1], but the pipeline split puts 'model.layers.2."),
    "tied a number": (["pipeline", "tied"], 1, "pipeline.tied: expected true or false, got 1"),
    "prefix path": (["pipeline", "prefix"], "../x", "pipeline.prefix"),
    "unknown field": (["pipeline", "extra"], 1, "pipeline.extra: unknown field"),
    "pipeline dropped": (["pipeline"], KeyError, "pipeline: missing: the mesh has 2 pipeline stages"),
    "one stage": (["mesh", "pp"], 1, "mesh.pp: 1 pipeline stage"),
    "mesh order": (["mesh"], {"tp": 2, "pp": 2}, 'mesh: expected {"tp": T} or {"pp": P, "tp": T}'),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_pipeline_manifest_is_refused_naming_the_field(tiny, tmp_path: Path, lie: str):
    artifact = convert(tiny, tmp_path / "art", 2, 2)
    path, value, message = LIES[lie]
    data = json.loads((artifact / MANIFEST_NAME).read_text())
    index = _layer(data, "model.layers.3.mlp.up_proj.weight")  # stage 1 of 2 (layers 2-4)
    path = [index if key == "LAYER" else key for key in path]
    target = edited(artifact, tmp_path / "lie", _set(path, value))
    with pytest.raises(ManifestError) as caught:
        read_manifest(target)
    assert message.replace("LAYER", str(index)) in str(caught.value)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--pp", "6"], 5, "5 decoder layers cannot fill 6 pipeline stages"),
        (["--pp", "2", "--tp", "3"], 5, "not divisible by tp=3"),
    ],
)
def test_what_cannot_be_split_is_refused_in_one_line(tiny, tmp_path: Path, args: list[str], code: int, message: str):
    tp = [] if "--tp" in args else ["--tp", "2"]
    command = [sys.executable, "-m", "reshard", *tp, *args, str(checkpoint(tiny)), "-o", str(tmp_path / "out"), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == code and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pipeline_needs_transformers_module_names(tiny, tmp_path: Path):
    """gpt_neox names its modules embed_in / layers / final_layer_norm: transformers' split would keep them all."""
    source = tiny.checkpoint("family_gpt_neox")
    with pytest.raises(ShardabilityError, match=r"no gpt_neox\.embed_tokens"):
        reshard.convert(source, tmp_path / "out", tp=1, pp=2, progress=False)


def test_check_explains_the_split(tiny):
    command = [sys.executable, "-m", "reshard", "check", "--pp", "2", "--pp", "6", str(checkpoint(tiny, tied=True))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stderr
    both = subprocess.run([*command[:4], "--tp", "2", *command[4:]], capture_output=True, text=True, timeout=120)
    assert both.stdout.startswith("tp=2   ok\n") and "pp=2   ok" in both.stdout and both.returncode == 5
    assert "stage 0: layers 0-1 (2), stage 1: layers 2-4 (3)" in result.stdout
    assert "the last stage takes the remaining 1" in result.stdout and "both hold embed_tokens" in result.stdout
    assert "pp=6   NO" in result.stdout and "tp=" not in result.stdout


@pytest.fixture(scope="module")
def two_ranks_pp(tiny, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """pp 2 alone, each rank holding only its own file, against transformers' DistributedConfig(pp_size=2)."""
    root = tmp_path_factory.mktemp("pp2")
    spec = []
    for tied in (False, True):
        artifact = convert(tiny, root / f"art-{tied}", 1, 2, tied)
        stripped = [str(strip_to_rank(artifact, rank, root / f"only{rank}-{tied}")) for rank in range(2)]
        source = str(checkpoint(tiny, tied))
        case = {"kind": "compare", "source": source, "artifact": str(artifact), "stripped": stripped, "pp": 2}
        spec.append({"name": f"tied_{tied}", **case})
    plain = str(tiny.artifact("llama", tp=2, num_hidden_layers=LAYERS, dtype="bfloat16"))
    spec.append({"name": "world_too_small", "kind": "error", "artifact": str(convert(tiny, root / "a22", 2, 2))})
    one_dim = {"shape": [2], "names": ["tp"]}  # a caller's mesh without a pp dimension, for a pipeline artifact
    spec.append({"name": "mesh_without_pp", "kind": "error", "artifact": str(root / "art-False"), "mesh": one_dim})
    spec.append(
        {"name": "stages_for_tp", "kind": "error", "artifact": plain, "mesh": {"shape": [2, 1], "names": ["pp", "tp"]}}
    )
    return run(spec, 2, root / "out")


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_alone_is_transformers_pipeline_model(two_ranks_pp, tied: bool):
    for rank, result in enumerate(r[f"tied_{tied}"] for r in two_ranks_pp):
        check_identical_to_transformers(result)
        # each stage holds its layers only: stage 0 the embeddings and layers 0-1, stage 1 layers 2-4, norm, head
        names = result["param_names"][1]
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == ({0, 1} if rank == 0 else {2, 3, 4})
        assert ("model.embed_tokens.weight" in names) == (rank == 0 or tied)
        assert ("model.norm.weight" in names) == (rank == 1)
        assert set(result["state"]) == set(names) - ({"lm_head.weight"} if tied else set())


def test_wrong_mesh_for_stages_is_refused_on_every_rank(two_ranks_pp):
    for result in two_ranks_pp:
        assert result["world_too_small"]["type"] == "MeshError"
        assert (
            "pp=2 x tp=2" in result["world_too_small"]["message"] and "4 ranks" in result["world_too_small"]["message"]
        )
        assert result["mesh_without_pp"]["type"] == "MeshError"
        assert "needs dimensions named 'pp' and 'tp'" in result["mesh_without_pp"]["message"]
        assert result["stages_for_tp"]["type"] == "MeshError"
        assert "the artifact has none" in result["stages_for_tp"]["message"]


@pytest.fixture(scope="module")
def four_ranks_pp(tiny, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """tp 2 x pp 2 on 4 ranks, where transformers' own load raises: against the unsharded model."""
    root = tmp_path_factory.mktemp("pp2tp2")
    spec = []
    for tied in (False, True):
        artifact = convert(tiny, root / f"art-{tied}", 2, 2, tied, dtype="float32")
        stripped = {str(rank): str(strip_to_rank(artifact, rank, root / f"only{rank}-{tied}")) for rank in range(4)}
        source = str(checkpoint(tiny, tied, dtype="float32"))
        case = {"kind": "unsharded", "source": source, "artifact": str(artifact)}
        spec.append({"name": f"tied_{tied}", **case, "stripped": stripped})
        mesh = {"shape": [2, 2], "names": ["pp", "tp"]}
        spec.append({"name": f"mesh_tied_{tied}", **case, "mesh": mesh})
    moe = tiny.checkpoint("family_qwen3_moe", num_hidden_layers=3)  # fused experts, split into stages
    moe_artifact = root / "moe"
    reshard.convert(moe, moe_artifact, tp=2, pp=2, progress=False)
    eager = {"experts_implementation": "eager"}  # grouped_mm needs 16-byte strides the tiny experts lack
    spec.append({"name": "moe", "kind": "unsharded", "source": str(moe), "artifact": str(moe_artifact), **eager})
    return run(spec, 4, root / "out", timeout=300)


@pytest.mark.parametrize("case", ["tied_False", "tied_True", "mesh_tied_False", "mesh_tied_True", "moe"])
def test_tp_times_pp_matches_the_unsharded_model(four_ranks_pp, case: str):
    layers_of_stage = [{0}, {1, 2}] if case == "moe" else [{0, 1}, {2, 3, 4}]  # 3 layers (moe) or 5 over 2 stages
    for rank, result in enumerate(r[case] for r in four_ranks_pp):
        assert result["logits_max_diff"] < 1e-4, result["logits_max_diff"]
        assert result["tokens"][0] == result["tokens"][1]
        assert "pp=2, tp=2" in result["device_mesh"]
        layers = {int(n.split(".")[2]) for n in result["state"] if n.startswith("model.layers.")}
        assert layers == layers_of_stage[rank // 2]


def test_verify_names_the_damaged_tensor_of_a_stage_file(tiny, tmp_path: Path):
    import shutil

    from reshard.commands.verify import verify_artifact

    artifact = tmp_path / "art"
    shutil.copytree(convert(tiny, tmp_path / "clean", 2, 2), artifact)
    assert verify_artifact(artifact, lambda n: None) == []
    manifest = read_manifest(artifact)
    path = artifact / manifest.rank_file(3).path  # stage 1, tp rank 1
    with safe_open(path, "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" not in names  # stage 0's layer is not in stage 1's file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last tensor of the file: the last in file order the stage holds
    path.write_bytes(bytes(data))
    problems = verify_artifact(artifact, lambda n: None)
    last = manifest.held_by(3)[-1].name
    assert any(last in p and "do not match the manifest's xxh3" in p for p in problems), problems


def test_default_output_names_the_stages(tiny, tmp_path: Path):
    """``reshard --tp 1 ART`` of a pp 2 artifact keeps its stages, and the default folder says so."""
    artifact = convert(tiny, tmp_path / "art", 2, 2)
    command = [sys.executable, "-m", "reshard", "--tp", "1", str(artifact), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "art-tp1-pp2").mesh == {"pp": 2, "tp": 1}
