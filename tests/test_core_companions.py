"""Tensors cut together (``manifests/companions.py``): a scale's layout derived from its weight's. Whole blocks at
tp 2/4/8 follow the weight rank by rank; a rank whose share is not whole blocks (DeepSeek-V3's 576-row
``kv_a_proj_with_mqa``, an intermediate size of 384 at tp 2) or holds none of a blocked weight is refused in one line
naming both tensors, the block and the tp; the derived layout is the one ``tensor_layout`` gives the companion under
the weight's style, so the validator and the runtime re-derive it like any tensor's."""

from __future__ import annotations

import math

import pytest

from reshard.manifests.companions import Companion, companion_layout
from reshard.manifests.errors import ShardabilityError, SourceError
from reshard.manifests.layout import PLAIN, REPLICATE, TensorLayout, tensor_layout
from reshard.manifests.manifest import Placement


def scale_of(
    name: str, style: str | None, shape: tuple[int, ...], tp: int, block: int | None, scale: tuple[int, ...]
) -> tuple[TensorLayout, TensorLayout]:
    """A weight's layout at ``tp`` and its ``weight_scale_inv``'s derived from it."""
    weight = tensor_layout(f"{name}.weight", "F8_E4M3", shape, style, tp)
    companion = Companion(f"{name}.weight_scale_inv", f"{name}.weight", block)
    return weight, companion_layout(weight, companion, "F32", scale)


def covered(ranges: tuple[tuple[int, int], ...], block: int, length: int) -> list[tuple[int, int]]:
    """The weight rows a scale slice's block rows cover."""
    return [(a * block, min(b * block, length)) for a, b in ranges]


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize(("style", "dim"), [("colwise", 0), ("rowwise", 1)])
def test_whole_blocks_follow_the_weight(tp: int, style: str, dim: int) -> None:
    shape = (2048, 1024)
    weight, scale = scale_of("mlp.proj", style, shape, tp, 128, (16, 8))
    assert scale.placement == weight.placement == Placement("shard", dim)
    for rank in range(tp):
        assert covered(scale.ranges[rank], 128, shape[dim]) == list(weight.ranges[rank])
        expected = [16, 8]
        expected[dim] //= tp
        assert scale.local_shapes[rank] == tuple(expected)
    assert scale == tensor_layout("mlp.proj.weight_scale_inv", "F32", (16, 8), style, tp)  # what the validator derives


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_deepseek_kv_a_proj_refused(tp: int) -> None:
    with pytest.raises(ShardabilityError) as refusal:
        scale_of("self_attn.kv_a_proj_with_mqa", "colwise", (576, 7168), tp, 128, (5, 56))
    message = str(refusal.value)
    assert "'self_attn.kv_a_proj_with_mqa.weight_scale_inv'" in message
    assert "'self_attn.kv_a_proj_with_mqa.weight'" in message
    assert "blocks of 128" in message and f"at tp {tp} " in message and "\n" not in message


def test_deepseek_kv_a_proj_whole_at_tp1() -> None:
    """The padded last block (576 = 4.5 blocks) is fine where one rank holds the end of the weight."""
    _, scale = scale_of("kv", "colwise", (576, 7168), 1, 128, (5, 56))
    assert scale.ranges == (((0, 5),),) and scale.local_shapes == ((5, 56),)


@pytest.mark.parametrize(("name", "style", "shape", "scale"), [
    ("mlp.down_proj", "rowwise", (1024, 384), (8, 3)),
    ("mlp.up_proj", "colwise", (384, 1024), (3, 8)),
])  # fmt: skip
def test_intermediate_384_at_tp2_refused(name: str, style: str, shape: tuple[int, int], scale: tuple[int, int]) -> None:
    with pytest.raises(ShardabilityError, match=r"blocks of 128 .* at tp 2 rank 0 holds 0\.\.192 of its 384"):
        scale_of(name, style, shape, 2, 128, scale)
    _, at_tp3 = scale_of(name, style, shape, 3, 128, scale)  # 128 rows a rank: whole blocks
    assert list(at_tp3.ranges) == [((0, 1),), ((1, 2),), ((2, 3),)]


def test_per_channel_scale_follows_colwise_weight() -> None:
    weight, scale = scale_of("q_proj", "colwise", (12, 32), 4, 1, (12,))
    assert scale.placement == Placement("shard", 0)
    assert scale.ranges == weight.ranges and [s[0] for s in scale.local_shapes] == [3, 3, 3, 3]
    _, uneven = scale_of("lm_head", "colwise", (5, 32), 4, 1, (5,))  # 2/2/1/0, as the weight itself
    assert uneven.ranges == (((0, 2),), ((2, 4),), ((4, 5),), ((5, 5),))


def test_empty_rank_of_blocked_weight_refused() -> None:
    """Whole blocks of 2 everywhere, but tp 4 leaves rank 3 none of the 5 rows."""
    with pytest.raises(ShardabilityError, match="rank 3 holds none of its 5"):
        scale_of("w", "colwise", (5, 8), 4, 2, (3, 8))


def test_constant_along_the_dim_is_replicated() -> None:
    _, rowwise = scale_of("o_proj", "rowwise", (64, 256), 2, None, (64, 1))
    assert rowwise.placement == REPLICATE and rowwise.local_shapes == ((64, 1), (64, 1))
    _, unplanned = scale_of("router", None, (8, 64), 2, 128, (1, 1))
    assert unplanned.placement == PLAIN and unplanned.ranges == (((0, 1),), ((0, 1),))


def test_packed_halves_each_start_a_block_grid() -> None:
    """A fused [gate; up] weight (packed_colwise): each half's blocks, padded at its own end, are cut separately."""
    weight, scale = scale_of("gate_up", "packed_colwise", (512, 256), 2, 128, (4, 2))
    assert scale.placement == Placement("strided_shard", 0, 2)
    assert scale.ranges == (((0, 1), (2, 3)), ((1, 2), (3, 4)))
    assert weight.ranges == (((0, 128), (256, 384)), ((128, 256), (384, 512)))
    _, padded = scale_of("gate_up", "packed_colwise", (384, 256), 1, 128, (4, 2))  # halves of 192: 2 blocks each
    assert padded.ranges == (((0, 2), (2, 4)),)
    with pytest.raises(ShardabilityError, match=r"at tp 2 rank 0 holds 0\.\.96"):
        scale_of("gate_up", "packed_colwise", (384, 256), 2, 128, (4, 2))


def test_experts_on_the_ep_mesh() -> None:
    weight, scale = scale_of("experts.gate_up_proj", "grouped_gemm", (8, 512, 256), 4, 1, (8, 4, 2))
    assert scale.placement == weight.placement == Placement("shard", 0, mesh="ep")
    assert scale.ranges == weight.ranges


@pytest.mark.parametrize("scale", [(3, 8), (2, 8, 1), (2,)])
def test_scale_shape_not_tiling_the_weight_refused(scale: tuple[int, ...]) -> None:
    with pytest.raises(SourceError, match=r"'w\.weight_scale_inv'.*'w\.weight'.*blocks of 128"):
        scale_of("w", "rowwise" if len(scale) == 1 else "colwise", (256, 1024), 2, 128, scale)


def test_any_length_block_and_tp() -> None:
    """Accepted exactly when every rank's rows start on a block and end on one (or at the weight's end), none empty;
    then each rank's scale rows are the blocks of its weight rows."""
    for length in range(1, 70):
        for block in (1, 2, 3, 8):
            for tp in range(1, 9):
                weight = tensor_layout("w", "BF16", (length, 4), "colwise", tp)
                owner = [r[0] for r in weight.ranges]
                aligned = all(a % block == 0 and (b % block == 0 or b == length) for a, b in owner)
                fits = aligned and (block == 1 or all(b > a for a, b in owner))
                try:
                    scale = companion_layout(weight, Companion("s", "w", block), "F32", (math.ceil(length / block), 1))
                except ShardabilityError:
                    assert not fits, (length, block, tp)
                    continue
                assert fits, (length, block, tp)
                for rank, (a, b) in enumerate(owner):
                    assert scale.ranges[rank] == ((a // block, math.ceil(b / block)),), (length, block, tp)
