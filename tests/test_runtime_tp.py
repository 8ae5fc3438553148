"""The runtime under torchrun (gloo, CPU): identical to transformers' own TP load at 2 and 4 ranks, a (dp, tp) mesh,
each rank reading only its own file, and bad files failing on every rank instead of hanging.

Each run is one torchrun job of ``tests/helpers/runtime_worker.py`` over several cases; every rank writes what it
saw to JSON and the assertions run here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import reshard
from reshard.manifests import MANIFEST_NAME, read_manifest
from reshard.manifests.safetensors import read_header
from tests.helpers.distributed import run_torchrun

pytest.importorskip("transformers")

WORKER = Path(__file__).parent / "helpers" / "runtime_worker.py"
# GQA with 4 KV heads (shardable at tp 2 and 4), vocab 1001 (uneven at both), tied or not; qwen2 adds biases
MODELS = {
    "llama": ("llama_gqa8", {}),
    "llama_tied": ("llama_gqa8", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"num_attention_heads": 8, "num_key_value_heads": 4}),
}
CORRUPT_TENSOR = "model.layers.1.mlp.down_proj.weight"


def strip_to_rank(artifact: Path, rank: int, target: Path) -> Path:
    """A copy of the artifact holding only ``rank``'s file: what a node that downloaded just its slice has."""
    manifest = read_manifest(artifact)
    target.mkdir(parents=True)
    for entry in manifest.files:
        if entry.rank in (None, rank):
            os.link(artifact / entry.path, target / entry.path)
    os.link(artifact / MANIFEST_NAME, target / MANIFEST_NAME)
    return target


def damaged_copy(artifact: Path, rank: int, target: Path, how: str) -> Path:
    """A copy whose ``rank`` file has one byte flipped inside ``CORRUPT_TENSOR`` or has lost its last bytes."""
    shutil.copytree(artifact, target)
    path = target / read_manifest(target).rank_file(rank).path
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[read_header(path).tensors[CORRUPT_TENSOR].offset + 5] ^= 0x10
    else:
        del data[-64:]
    path.write_bytes(bytes(data))
    return target


def run(spec: list[dict[str, Any]], nproc: int, out: Path, timeout: float = 240) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    run_torchrun(WORKER, str(out / "spec.json"), str(out), nproc=nproc, timeout=timeout)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def compare_cases(tiny, tp: int, root: Path) -> list[dict[str, Any]]:
    cases = []
    for name, (kind, overrides) in MODELS.items():
        artifact = tiny.artifact(kind, tp=tp, **overrides)
        stripped = [str(strip_to_rank(artifact, rank, root / f"{name}-only{rank}")) for rank in range(tp)]
        source = str(tiny.checkpoint(kind, **overrides))
        case = {"name": name, "kind": "compare", "source": source, "artifact": str(artifact), "stripped": stripped}
        cases.append(case)
    return cases


# Custom plans users copy: the CLI's --help example and transformers' documented 7-rule plan. transformers merges a
# plan dict into the model's own (embed_tokens and lm_head keep their rules); reshard must give the same model.
CUSTOM_PLANS = {
    "help_example": {"model.layers.*.self_attn.q_proj": "colwise"},
    "seven_rules": {
        **{f"model.layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"},
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
    },
}


def custom_plan_cases(tiny, root: Path) -> list[dict[str, Any]]:
    kind, overrides = MODELS["llama"]
    source = tiny.checkpoint(kind, **overrides)
    cases = []
    for name, plan in CUSTOM_PLANS.items():
        artifact = root / f"plan-{name}"
        reshard.convert(source, artifact, tp=2, plan=plan, progress=False)
        stripped = [str(strip_to_rank(artifact, rank, root / f"plan-{name}-only{rank}")) for rank in range(2)]
        cases.append(
            {"name": f"plan_{name}", "kind": "compare", "source": str(source), "artifact": str(artifact),
             "stripped": stripped, "tp_plan": plan}
        )  # fmt: skip
    return cases


def other_world_cases(tiny, old_tp: int, new_tp: int) -> list[dict[str, Any]]:
    """Artifacts converted for ``old_tp``, loaded on ``new_tp`` ranks (every rank sees every rank file)."""
    cases = []
    for name, (kind, overrides) in MODELS.items():
        artifact = str(tiny.artifact(kind, tp=old_tp, **overrides))
        source = str(tiny.checkpoint(kind, **overrides))
        case = {"name": f"{name}_tp{old_tp}_on_{new_tp}", "kind": "compare", "source": source, "artifact": artifact}
        cases.append({**case, "stripped": [artifact] * new_tp})
    return cases


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path, Path]:
    root = tmp_path_factory.mktemp("tp2")
    kind, overrides = MODELS["llama"]
    corrupt = damaged_copy(tiny.artifact(kind, tp=2, **overrides), 1, root / "corrupt", "flip")
    replicated = root / "replicated-tp4"  # KV heads 2 -> 4 for tp 4: cannot be cut for tp 2 at load
    reshard.convert(
        tiny.checkpoint("llama_gqa8", num_key_value_heads=2), replicated, tp=4, replicate_kv=True, progress=False
    )
    spec = [
        # failures first: if agreeing on them left a collective pending, everything after would hang or mismatch
        {"name": "replicated_on_2", "kind": "error", "artifact": str(replicated)},
        {"name": "corrupt_verified", "kind": "error", "artifact": str(corrupt), "kwargs": {"verify": True}},
        {"name": "corrupt_unverified", "kind": "error", "artifact": str(corrupt)},
        *compare_cases(tiny, 2, root),
        *custom_plan_cases(tiny, root),
        *other_world_cases(tiny, 4, 2),
    ]
    return run(spec, 2, root / "out"), root / "out", corrupt


@pytest.fixture(scope="module")
def four_ranks(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    root = tmp_path_factory.mktemp("tp4")
    kind, overrides = MODELS["llama"]
    mesh2d = {
        "name": "dp2_tp2",
        "kind": "mesh2d",
        "shape": [2, 2],
        "source": str(tiny.checkpoint(kind, **overrides)),
        "artifact": str(tiny.artifact(kind, tp=2, **overrides)),
    }
    kv2 = {
        "name": "kv2_tp2_on_4",
        "kind": "error",
        "artifact": str(tiny.artifact("llama_gqa8", tp=2, num_key_value_heads=2)),
    }
    spec = [kv2, *compare_cases(tiny, 4, root), mesh2d, *other_world_cases(tiny, 2, 4)]
    return run(spec, 4, root / "out", timeout=300), root / "out"


def check_identical_to_transformers(result: dict[str, Any]) -> None:
    assert result["param_names"][0] == result["param_names"][1]
    for name, same in result["params"].items():
        assert same == {"layout": True, "values": True, "dtype": True, "requires_grad": True}, name
    assert result["buffer_names"][0] == result["buffer_names"][1] and all(result["buffers"].values())
    attributes = result["attributes"]
    assert attributes["tp_plan"] and attributes["distributed_config"] and attributes["generation_config"]
    assert attributes["tp_size"][0] == attributes["tp_size"][1] and attributes["training"] == [False, False]
    assert attributes["extra"] == [] and attributes["lacking"] == ["_mesh_manager"]
    assert result["logits_equal"], result["logits_max_diff"]
    assert result["tokens"][0] == result["tokens"][1]


def check_state_dict(result: dict[str, Any], tied: bool) -> None:
    """load_state_dict from a folder without the other ranks' files: the model's tensors, as views of this file."""
    buffers = set(result["buffer_names"][1])  # persistent buffers (deepseek's e_score_correction_bias) are saved too
    assert set(result["state"]) - buffers == set(result["params"]) - ({"lm_head.weight"} if tied else set())
    for name, same in result["state"].items():
        assert same["layout"] and same["values"] and same["dtype"], name
        assert same["file"].startswith(str(Path(result["rank_file"]))), (name, same["file"])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_two_ranks_identical_to_transformers(two_ranks, model: str) -> None:
    results, _, _ = two_ranks
    for result in (r[model] for r in results):
        check_identical_to_transformers(result)
        check_state_dict(result, tied=model == "llama_tied")
        assert result["tied"] == [model == "llama_tied"] * 2


@pytest.mark.parametrize("plan", sorted(CUSTOM_PLANS))
def test_custom_plan_loads_as_transformers_merges_it(two_ranks, plan: str) -> None:
    """reshard --plan with a dict gives the model of DistributedConfig(tp_size=2, tp_plan=dict): merged rules."""
    results, _, _ = two_ranks
    for result in (r[f"plan_{plan}"] for r in results):
        check_identical_to_transformers(result)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_four_ranks_identical_to_transformers(four_ranks, model: str) -> None:
    results, _ = four_ranks
    for result in (r[model] for r in results):
        check_identical_to_transformers(result)
        check_state_dict(result, tied=model == "llama_tied")
        assert result["attributes"]["device_mesh"] == "DeviceMesh((tp=4), 'cpu', stride=(1,))"


def test_dp_tp_mesh_is_honoured(four_ranks, two_ranks) -> None:
    """A (dp=2, tp=2) mesh on 4 ranks: both replicas load the tp=2 files and compute what a plain tp=2 run does."""
    results, out = four_ranks
    assert [r["dp2_tp2"]["tp_coordinate"] for r in results] == [0, 1, 0, 1]
    for rank, result in enumerate(results):
        case = result["dp2_tp2"]
        assert case["device_mesh"] == "DeviceMesh((dp=2, tp=2), 'cpu', stride=(2, 1))"
        assert case["replicas_equal"]
        for name, param in case["params"].items():
            assert param["equal"], name
            if param["mesh"] is not None:  # the DTensors live on this rank's tp group
                assert param["mesh"] == [rank - rank % 2, rank - rank % 2 + 1], name
    _, two_out, _ = two_ranks
    # same tp=2 computation, same gloo all-reduces: bit-identical to the 2-rank load's logits
    logits = load_file(out / "dp2_tp2.logits.safetensors")["logits"]
    assert torch.equal(logits, load_file(two_out / "llama.logits.safetensors")["logits"])


def test_what_cannot_be_cut_at_another_world_size_raises_on_every_rank(two_ranks, four_ranks) -> None:
    """Refused from the manifest and config alone, the same error on every rank: replicated KV heads at another tp,
    KV heads that the new tp does not divide."""
    for result in two_ranks[0]:
        error = result["replicated_on_2"]
        assert error["type"] == "MeshError" and "converted for tp=4" in error["message"], error
        assert "KV heads were replicated" in error["message"], error
        assert error["message"].startswith("all 2 ranks: ") and "\n" not in error["message"], error
        assert "it loads on 4 ranks (or re-shard it offline: reshard --tp 2 " in error["message"], error
    for result in four_ranks[0]:
        error = result["kv2_tp2_on_4"]
        assert error["type"] == "MeshError" and "num_key_value_heads=2 is not divisible by tp=4" in error["message"]
        assert error["message"].startswith("all 4 ranks: ") and "\n" not in error["message"], error
        assert "it loads on 1, 2 ranks" in error["message"], error


def test_a_world_the_artifact_cannot_split_into_lists_the_sizes_it_can(tiny) -> None:
    """tp 4 on 3 ranks (heads 8 and KV heads 4 divide by none of 3): the sizes that work, from config and manifest."""
    from reshard.loaders.regrid import regrid_refusal

    artifact = tiny.artifact("llama_gqa8", tp=4)
    refusal = regrid_refusal(artifact, read_manifest(artifact), 3)
    assert refusal is not None and "not divisible by tp=3" in refusal, refusal
    assert f"it loads on 1, 2, 4 ranks (or re-shard it offline: reshard --tp 3 {artifact})" in refusal, refusal
    assert regrid_refusal(artifact, read_manifest(artifact), 2) is None


def test_ranks_failing_alike_share_one_line() -> None:
    from reshard.loaders.consensus import _combined
    from reshard.manifests.errors import MeshError

    same = [(rank, "MeshError", "converted for tp=4, it cannot load at tp=3") for rank in range(3)]
    error = _combined(same, 3)
    assert isinstance(error, MeshError) and str(error) == "all 3 ranks: converted for tp=4, it cannot load at tp=3"
    mixed = [
        (0, "IntegrityError", "file a: bad"),
        (2, "IntegrityError", "file c: bad"),
        (3, "ValueError", "file a: bad"),
    ]
    assert str(_combined(mixed, 4)).splitlines() == [
        "rank 0 of 4: file a: bad",
        "rank 2 of 4: file c: bad",
        "rank 3 of 4: ValueError: file a: bad",
    ]


@pytest.mark.parametrize(("fixture", "case"), [("two_ranks", "tp4_on_2"), ("four_ranks", "tp2_on_4")])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_another_world_size_loads_as_transformers_at_that_size(request, fixture: str, case: str, model: str) -> None:
    """An artifact converted for tp 4 loaded on 2 ranks, one for tp 2 on 4: the model of from_pretrained at the
    size it runs at (parameters, placements, logits, generate)."""
    results = request.getfixturevalue(fixture)[0]
    for result in (r[f"{model}_{case}"] for r in results):
        check_identical_to_transformers(result)


def test_corrupt_byte_on_one_rank_raises_on_every_rank(two_ranks) -> None:
    results, _, corrupt = two_ranks
    path = corrupt / read_manifest(corrupt).rank_file(1).path
    for result in results:
        error = result["corrupt_verified"]
        assert error["type"] == "IntegrityError"
        assert error["message"].startswith(f"rank 1 of 2: {path.resolve()}: tensor '{CORRUPT_TENSOR}' has xxh3")
        assert result["corrupt_unverified"]["type"] is None


def test_truncated_file_on_one_rank_exits_every_rank_without_hanging(tiny, tmp_path: Path) -> None:
    kind, overrides = MODELS["qwen2"]
    artifact = damaged_copy(tiny.artifact(kind, tp=2, **overrides), 1, tmp_path / "truncated", "truncate")
    (tmp_path / "spec.json").write_text(json.dumps([{"name": "t", "kind": "raise", "artifact": str(artifact)}]))
    started = time.monotonic()
    result = run_torchrun(WORKER, str(tmp_path / "spec.json"), str(tmp_path), nproc=2, timeout=90, check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    for rank in range(2):
        assert f"rank {rank} raised IntegrityError: rank 1 of 2: " in result.stderr, result.stderr[-3000:]
    assert "rank-00001-of-00002.safetensors" in result.stderr and "truncated" in result.stderr


def test_example_prints_a_greedy_completion(tiny) -> None:
    artifact = tiny.artifact("llama_gqa8", tp=2, tokenizer=True)
    example = Path(__file__).parent.parent / "examples" / "serve_tp.py"
    result = run_torchrun(example, str(artifact), "--prompt", "w5 w77 w900", "--max-new-tokens", "4", nproc=2)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("loaded in ") and lines[0].endswith("on 2 rank(s)")
    assert lines[1].startswith("w5 w77 w900 w") and len(lines[1].split()) == 7
