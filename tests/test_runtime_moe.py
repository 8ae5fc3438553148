"""The runtime on mixture-of-experts models and beyond transformers' own reach, under torchrun (gloo, CPU).

- Tensor parallel: qwen3_moe and mixtral artifacts at 2 and 4 ranks (qwen2_moe, olmoe, deepseek_v3 at 2) load
  identically to
  ``from_pretrained(source, tp_plan="auto")``: names, types, placements, local values, logits, ``generate``.
- Expert parallel (``convert(..., ep=tp)``): identical to ``from_pretrained(source,
  distributed_config=DistributedConfig(tp_size=N, ep_size=N))``, experts ``Shard(0)`` on an ``ep`` mesh over the tp
  ranks; a caller's own ``ep`` dimension is used, one on other ranks refused.
- Replicated KV heads (2 KV heads at tp 4, which transformers cannot shard): the same logits and tokens as the
  unsharded original.

The tiny MoE configs have an expert intermediate size of 42: rows of 168 bytes (84 at tp 2, 44/36 at tp 4) that
the default ``grouped_mm`` experts kernel refuses on CPU ("strides should be multiple of 16 bytes") even unsharded,
so both sides run ``experts_implementation="eager"``. One torchrun job per world size runs every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import reshard
from reshard.manifests import read_manifest
from reshard.manifests.safetensors import read_header
from tests.test_runtime_tp import check_identical_to_transformers, check_state_dict, run, strip_to_rank

pytest.importorskip("transformers")

EAGER = {"experts_implementation": "eager"}
FAMILIES = ("qwen3_moe", "mixtral")
MORE_FAMILIES = ("qwen2_moe", "olmoe", "deepseek_v3")  # at 2 ranks only, to keep the suite short
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# 4 KV heads divide tp 4 (the tiny default, 2, only divides tp 2)
KV = {2: {}, 4: {"num_key_value_heads": 4}}
# on 4 ranks, an 'ep' dimension across the 'tp' groups: tp {0, 2}, {1, 3}; ep {0, 1}, {2, 3}
TP_EP_2X2 = {"shape": [2, 2], "names": ["tp", "ep"]}


def ep_artifact(tiny, kind: str, tp: int, root: Path) -> Path:
    """``kind`` converted with expert parallelism over the tp ranks (``ep == tp``)."""
    out = root / f"{kind}-tp{tp}-ep{tp}"
    if not out.exists():
        reshard.convert(tiny.checkpoint(kind, **KV[tp]), out, tp=tp, ep=tp, progress=False)
    return out


def compare_case(tiny, name: str, kind: str, artifact: Path, tp: int, root: Path, ep: bool) -> dict[str, Any]:
    stripped = [str(strip_to_rank(artifact, rank, root / f"{name}-only{rank}")) for rank in range(tp)]
    source = str(tiny.checkpoint(kind, **KV[tp]))
    case = {"name": name, "kind": "compare", "source": source, "artifact": str(artifact), "stripped": stripped}
    return case | EAGER | ({"ep": True} if ep else {})


def moe_cases(
    tiny, tp: int, root: Path, ep_root: Path, ep_families: tuple[str, ...], families: tuple[str, ...] = FAMILIES
) -> list[dict[str, Any]]:
    """TP cases for ``families`` and EP cases for ``ep_families``; EP artifacts in ``ep_root``, stripped copies in
    ``root``."""
    cases = []
    for family in families:
        kind = f"family_{family}"
        cases.append(compare_case(tiny, family, kind, tiny.artifact(kind, tp=tp, **KV[tp]), tp, root, ep=False))
    for family in ep_families:
        kind = f"family_{family}"
        artifact = ep_artifact(tiny, kind, tp, ep_root)
        cases.append(compare_case(tiny, f"{family}_ep", kind, artifact, tp, root, ep=True))
    return cases


@pytest.fixture(scope="module")
def ep_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ep")


@pytest.fixture(scope="module")
def two_ranks(tiny, ep_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    root = tmp_path_factory.mktemp("moe2")
    cases = moe_cases(tiny, 2, root, ep_root, FAMILIES, FAMILIES + MORE_FAMILIES)
    return run(cases, 2, root / "out"), root / "out"


@pytest.fixture(scope="module")
def four_ranks(tiny, ep_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    root = tmp_path_factory.mktemp("moe4")
    ep2 = str(ep_artifact(tiny, "family_qwen3_moe", 2, ep_root))
    gqa = {"num_key_value_heads": 2, "dtype": "float32"}
    replicated = root / "gqa8-kv2-tp4-replicated"
    reshard.convert(tiny.checkpoint("llama_gqa8", **gqa), replicated, tp=4, replicate_kv=True, progress=False)
    spec = [
        # the failure first: if agreeing on it left a collective pending, everything after would hang or mismatch
        {"name": "ep_on_other_ranks", "kind": "error", "artifact": ep2, "mesh": TP_EP_2X2},
        *moe_cases(tiny, 4, root, ep_root, ("qwen3_moe",)),
        {"name": "caller_ep", "kind": "caller_ep_mesh", "shape": [2, 2], "artifact": ep2} | EAGER,
        {
            "name": "replicated_kv",
            "kind": "unsharded",
            "source": str(tiny.checkpoint("llama_gqa8", **gqa)),
            "artifact": str(replicated),
        },
    ]
    return run(spec, 4, root / "out", timeout=300), root / "out"


def results_for(fixture: tuple[list[dict[str, Any]], Path], name: str) -> list[dict[str, Any]]:
    results, _ = fixture
    return [result[name] for result in results]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])
def test_moe_tensor_parallel_identical_to_transformers(request, ranks: str, family: str) -> None:
    for result in results_for(request.getfixturevalue(ranks), family):
        check_identical_to_transformers(result)
        check_state_dict(result, tied=False)
        assert {tuple(mesh) for mesh in result["meshes"].values() if mesh} == {("tp",)}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_moe_families_identical_to_transformers_at_two_ranks(two_ranks, family: str) -> None:
    for result in results_for(two_ranks, family):
        check_identical_to_transformers(result)
        check_state_dict(result, tied=False)


@pytest.mark.parametrize(
    ("ranks", "family"), [("two_ranks", "qwen3_moe"), ("two_ranks", "mixtral"), ("four_ranks", "qwen3_moe")]
)
def test_expert_parallel_identical_to_transformers(request, ranks: str, family: str) -> None:
    """Same names, types, placements (mesh dim names included), local values, plans, logits and tokens."""
    for result in results_for(request.getfixturevalue(ranks), f"{family}_ep"):
        check_identical_to_transformers(result)
        check_state_dict(result, tied=False)
        assert result["attributes"]["ep_plan"]
        on_ep = {name for name, mesh in result["meshes"].items() if mesh == ["ep"]}
        assert on_ep == {f"model.layers.{i}.{weight}" for i in range(2) for weight in EXPERT_WEIGHTS}


def test_rank_file_data_is_64_byte_aligned(tiny, ep_root: Path) -> None:
    """Mapped weights as aligned as fresh allocations: with an 8-byte offset qwen3_moe's logits drift by ~2e-7."""
    for artifact in (tiny.artifact("family_qwen3_moe", tp=2), ep_artifact(tiny, "family_qwen3_moe", 2, ep_root)):
        for entry in read_manifest(artifact).files:
            if entry.rank is not None:
                assert read_header(artifact / entry.path).data_start % 64 == 0, entry.path


def test_caller_ep_dimension_is_honoured(four_ranks, two_ranks) -> None:
    """A (dp=2, tp=2) mesh whose tp dimension is flattened into ep: experts on the caller's ep group, the rest on tp."""
    for rank, result in enumerate(results_for(four_ranks, "caller_ep")):
        assert result["ep_ranks"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert result["ep_group"] != result["tp_group"]
        for name, group in result["groups"].items():
            expected = result["ep_group"] if name.endswith(EXPERT_WEIGHTS) else result["tp_group"]
            assert group == expected, name
    _, four_out = four_ranks
    _, two_out = two_ranks
    # the same tp=2 computation on other process groups: bit-identical to the plain 2-rank load
    logits = load_file(four_out / "caller_ep.logits.safetensors")["logits"]
    assert torch.equal(logits, load_file(two_out / "qwen3_moe_ep.logits.safetensors")["logits"])


def test_ep_dimension_on_other_ranks_is_refused_on_every_rank(four_ranks) -> None:
    for result in results_for(four_ranks, "ep_on_other_ranks"):
        assert result["type"] == "MeshError"
        assert result["message"].count("its 'ep' dimension spans ranks") == 4
        assert "rank 1 of 4: " in result["message"] and "'tp' group spans [1, 3]" in result["message"]


def test_replicated_kv_heads_compute_what_the_unsharded_model_does(four_ranks) -> None:
    """2 KV heads at tp 4 (transformers' own TP crashes): each rank holds one whole copy of a KV head."""
    _, out = four_ranks
    for result in results_for(four_ranks, "replicated_kv"):
        assert result["kv_heads"] == [2, 4]
        assert result["k_proj"] == [[8, 64]]  # one head of width 8 per rank
        assert result["tokens"][0] == result["tokens"][1]
    logits = load_file(out / "replicated_kv.logits.safetensors")
    torch.testing.assert_close(logits["ours"], logits["original"], rtol=1e-5, atol=1e-5)
