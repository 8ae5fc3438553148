"""The pure core checked directly against torch and transformers: every rank's ranges (``rank_ranges``) against
DTensor's own split of ``Shard`` and ``_StridedShard``, loading at another tp (``regrid_parts``) against the
slices it must produce, and the pipeline split (``Pipeline``) against transformers' ``PipelineStage``."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard, _StridedShard

from reshard.manifests.layout import placement_for, rank_ranges, regrid_parts, tensor_layout
from reshard.manifests.pipeline import Pipeline

SIZES = [*range(0, 21), 37, 64, 99, 1001]
TPS = range(1, 9)


def held(values: torch.Tensor, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> list[int]:
    return [int(v) for start, stop in ranges for v in values[start:stop]]


@pytest.mark.parametrize("style", ["colwise", "rowwise", "embedding_rowwise", "packed_colwise"])
def test_rank_ranges_are_dtensors_own_split(style: str):
    """For every length and tp, a rank holds exactly the elements DTensor's placement gives it (torch.chunk's
    sizes for Shard, a chunk of each half for the packed [gate; up] _StridedShard)."""
    for n in SIZES:
        values = torch.arange(n)
        for tp in TPS:
            placement = placement_for(style, "w.weight", ndim=2)
            dim = 0 if placement.dim == 0 else 1
            torch_placement = _StridedShard(0, split_factor=2) if placement.kind == "strided_shard" else Shard(0)
            expected, _ = torch_placement._split_tensor(values, tp, with_padding=False)
            shape = (n, 3) if dim == 0 else (3, n)
            for rank in range(tp):
                ours = held(values, rank_ranges(placement, shape, tp, rank))
                assert ours == expected[rank].tolist(), (style, n, tp, rank)


def test_local_shapes_add_up_to_the_global_shape():
    for n in SIZES:
        for tp in TPS:
            layout = tensor_layout("model.layers.0.mlp.down_proj.weight", "BF16", (5, n), "rowwise", tp)
            assert sum(shape[1] for shape in layout.local_shapes) == n
            assert all(shape[0] == 5 for shape in layout.local_shapes)


@pytest.mark.parametrize("style", ["colwise", "packed_colwise"])
def test_regrid_parts_rebuild_every_slice_at_another_tp(style: str):
    """Cutting each new rank's slice out of the old ranks' local slices, as the parts say, gives the slice a direct
    conversion at the new tp would hold."""
    for n in SIZES:
        values = torch.arange(n)
        for old_tp in TPS:
            old = tensor_layout("w.weight", "F32", (n, 2), style, old_tp)
            old_local = [held(values, ranges) for ranges in old.ranges]
            for new_tp in TPS:
                new = tensor_layout("w.weight", "F32", (n, 2), style, new_tp)
                for rank in range(new_tp):
                    parts = regrid_parts(old.ranges, new.ranges[rank])
                    rebuilt = [v for r, start, length in parts for v in old_local[r][start : start + length]]
                    assert rebuilt == held(values, new.ranges[rank]), (style, n, old_tp, new_tp, rank)


def test_pipeline_split_is_transformers_pipeline_stage():
    from transformers.distributed.pipeline_parallel import PipelineStage

    for layers in range(1, 13):
        for stages in range(1, layers + 1):
            stage = PipelineStage.__new__(PipelineStage)  # its methods read pp_size only; no process group
            stage.pp_size = stages
            ours = Pipeline(stages, layers, "model")
            for rank in range(stages):
                assert ours.layer_range(rank) == stage.layer_range_for_rank(rank, layers)
            names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            names += [f"model.layers.{i}.mlp.up_proj.weight" for i in range(layers)]
            for name in names:
                theirs = stage.find_rank_for_key(name, layers, "model")
                assert ours.stages_of(name) == (theirs,), (layers, stages, name)
