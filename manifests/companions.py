"""Tensors cut together: a companion's layout derived from its owner's, with the alignment checked. Pure.

A companion is a tensor whose indices along its owner's placement dim each cover ``block`` of the owner's: a block
scale (FP8's ``weight_scale_inv``, one per 128 x 128 block of ``weight``), a per-channel scale (``block`` 1), the
scales of packed sub-byte data. Each rank must hold exactly the scales of the rows it holds, so the companion is cut
where its owner is and only there: a rank whose share of the owner is not whole blocks is refused, since its
scales would cover rows of another rank (transformers infers the block from local shapes there and loads another
model, or divides by zero). The companion's own placement is the owner's, on the companion's grid, and its ranges
are also what ``layout.rank_ranges`` gives that placement, so the validator and the runtime re-derive them as for
any tensor. torch DCP's quantized Hugging Face reader pairs ``.weight`` with ``.weight_scale_inv`` the same way.

Example (a [256, 512] colwise weight and its [2, 4] block scale at tp 2: one block row each):
    >>> from reshard.manifests.layout import tensor_layout
    >>> weight = tensor_layout("w.weight", "F8_E4M3", (256, 512), "colwise", 2)
    >>> companion_layout(weight, Companion("w.weight_scale_inv", "w.weight", 128), "F32", (2, 4)).ranges
    (((0, 1),), ((1, 2),))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import ShardabilityError, SourceError
from reshard.manifests.layout import REPLICATE, TensorLayout, local_shape, rank_ranges
from reshard.manifests.manifest import Placement


@dataclass(frozen=True)
class Companion:
    """Tensor ``name`` cut with tensor ``owner``: each of its indices along the owner's placement dim covers ``block``
    of the owner's (the last one possibly fewer, a zero-padded block); ``block=None``: it is constant along that dim
    (a per-output-channel scale of a rowwise weight, a per-tensor scale), so every rank holds it whole.

    A rank holding none of a blocked owner is refused too (transformers divides by its zero rows); with ``block`` 1
    an empty rank is as allowed as for the owner itself (a vocabulary of 5 at tp 4)."""

    name: str
    owner: str
    block: int | None


def companion_layout(owner: TensorLayout, companion: Companion, dtype: str, shape: tuple[int, ...]) -> TensorLayout:
    """The companion's layout under ``owner``'s: same placement (kind, dim, mesh), each owner range mapped to the
    blocks it covers. ``ShardabilityError`` when a rank's share of the owner is not whole blocks (or is empty);
    ``SourceError`` when the companion's shape does not tile the owner's dim in ``block``s.

    Example (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` and its 5 block rows, cut colwise at tp 2):
        >>> from reshard.manifests.layout import tensor_layout
        >>> weight = tensor_layout("kv.weight", "F8_E4M3", (576, 7168), "colwise", 2)
        >>> companion_layout(weight, Companion("kv.weight_scale_inv", "kv.weight", 128), "F32", (5, 56))
        Traceback (most recent call last):
        ...
        reshard.manifests.errors.ShardabilityError: tensor 'kv.weight_scale_inv' covers 'kv.weight' in blocks of 128 along dim 0, but at tp 2 rank 0 holds 0..288 of its 576: not whole blocks
    """  # noqa: E501
    tp, placement = len(owner.ranges), owner.placement
    if companion.owner != owner.name:
        raise ValueError(f"companion {companion.name!r} has owner {companion.owner!r}, not {owner.name!r}")
    if not placement.is_sharded or companion.block is None:
        whole = placement if not placement.is_sharded else REPLICATE
        return _layout(companion.name, dtype, shape, owner.style, whole, tp)
    assert placement.dim is not None
    dim, block = placement.dim, companion.block
    length = owner.shape[dim]
    groups = (placement.split_factor or 1) if placement.kind == "strided_shard" else 1
    width = math.ceil(length / groups)  # a packed owner's halves each start a new block grid
    per_group = math.ceil(width / block)
    where = f"tensor {companion.name!r} covers {owner.name!r} in blocks of {block} along dim {dim}"
    if block < 1 or not dim < len(shape) <= len(owner.shape) or shape[dim] != groups * per_group:
        raise SourceError(
            f"{where}, but its shape {list(shape)} is not {owner.name!r}'s {list(owner.shape)} in such blocks"
        )
    ranges = []
    for rank, owner_ranges in enumerate(owner.ranges):
        if block > 1 and length and not sum(stop - start for start, stop in owner_ranges):
            raise ShardabilityError(f"{where}, but at tp {tp} rank {rank} holds none of its {length}")
        mapped = []
        for start, stop in owner_ranges:
            group = start // width if width else 0
            low, high = start - group * width, stop - group * width
            group_end = min(width, length - group * width)
            if low % block or (high % block and high != group_end):
                raise ShardabilityError(
                    f"{where}, but at tp {tp} rank {rank} holds {start}..{stop} of its {length}: not whole blocks"
                )
            mapped.append((group * per_group + low // block, group * per_group + math.ceil(high / block)))
        ranges.append(tuple(mapped))
    derived = _layout(companion.name, dtype, shape, owner.style, placement, tp)
    if tuple(ranges) != derived.ranges:  # the companion would not be the DTensor its placement describes
        raise ShardabilityError(
            f"{where}, but at tp {tp} its blocks {list(ranges)} are not the {placement.kind} ranges of its own "
            f"{shape[dim]} ({list(derived.ranges)})"
        )
    return derived


def _layout(
    name: str, dtype: str, shape: tuple[int, ...], style: str | None, placement: Placement, tp: int
) -> TensorLayout:
    """``placement`` laid out over ``tp`` ranks (every rank whole for a plain or replicated one)."""
    if placement.is_sharded:
        assert placement.dim is not None
        row_bytes(dtype, shape, placement.dim, name)  # a sub-byte companion is cut at whole bytes only
    ranges = tuple(tuple(rank_ranges(placement, shape, tp, rank)) for rank in range(tp))
    shapes = tuple(local_shape(placement, shape, list(r)) for r in ranges)
    return TensorLayout(name, dtype, shape, style, placement, ranges, shapes)
