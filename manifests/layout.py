"""The layout: which bytes of each tensor every rank holds. Pure functions, no I/O.

Each sharding style is defined here once, as data (``STYLES``), mirroring what transformers 5.x's
``ParallelStyle.shard_param`` does to a parameter; the writer, the manifest, the verifier and the resharder all
read the ``RankSlice`` values computed here and never re-derive them.

Example:
    >>> placement = placement_for("colwise", "lm_head.weight", ndim=2)
    >>> [rank_ranges(placement, (1001, 64), tp=4, rank=r) for r in range(4)]
    [[(0, 251)], [(251, 502)], [(502, 753)], [(753, 1001)]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reshard.manifests.dtypes import DTYPES, nbytes, row_bytes
from reshard.manifests.errors import PlanError
from reshard.manifests.manifest import Placement, TensorEntry

PLAIN = Placement("plain")
REPLICATE = Placement("replicate")


@dataclass(frozen=True)
class StyleRule:
    """How one plan style places a parameter of its module, by the parameter's rank (ndim) and leaf name.

    ``matrix``/``vector`` give the placement for ndim >= 2 / ndim == 1 parameters, with negative dims counted
    from the end (resolved per tensor); ``bias`` overrides ``vector`` for a parameter named ``bias``.
    ``None`` leaves the parameter plain (the style only hooks the module's forward).
    """

    matrix: Placement | None
    vector: Placement | None
    bias: Placement | None = None


def _shard(dim: int) -> Placement:
    return Placement("shard", dim)


def _strided(dim: int) -> Placement:
    return Placement("strided_shard", dim, 2)


# transformers/distributed/tensor_parallel.py, style by style (shard_param of each registered ParallelStyle).
STYLES: dict[str, StyleRule] = {
    # ColwiseParallel: Shard(ndim - 2): dim -2 of a weight (dim 1 of a 3-D expert weight), dim 0 of a bias.
    "colwise": StyleRule(_shard(-2), _shard(-1)),
    "colwise_gather_output": StyleRule(_shard(-2), _shard(-1)),
    "colwise_rep": StyleRule(_shard(-2), _shard(-1)),
    # RowwiseParallel: the weight's input dim; the bias is added once after the all-reduce, so replicated.
    "rowwise": StyleRule(_shard(-1), _shard(-1), bias=REPLICATE),
    "rowwise_split_input": StyleRule(_shard(-1), _shard(-1), bias=REPLICATE),
    "rowwise_rep": StyleRule(_shard(-1), _shard(-1), bias=REPLICATE),
    # EmbeddingParallel(shard_dim): the vocabulary (rowwise) or the hidden dim (colwise).
    "embedding_rowwise": StyleRule(_shard(0), _shard(0)),
    "embedding_colwise": StyleRule(_shard(1), _shard(1)),
    # Packed [gate; up] weights: each half chunked, rank r holds [gate_r; up_r].
    "packed_colwise": StyleRule(_strided(-2), _shard(-1)),
    "packed_rowwise": StyleRule(_strided(-1), REPLICATE),
    # Styles that only hook a module's forward or keep the full parameter on every rank.
    "replicate": StyleRule(None, None),
    "replicated_with_grad_allreduce": StyleRule(None, None),
    "moe_tp_experts": StyleRule(None, None),
    "moe_identity_expert": StyleRule(None, None),
    "all_reduce": StyleRule(None, None),
    "local_params": StyleRule(None, None),
    "mla_kv_a_proj": StyleRule(None, None),
    # Expert parallelism (expert_parallel.py): whole experts per rank, Shard(0) on the ep mesh.
    "grouped_gemm": StyleRule(Placement("shard", 0, mesh="ep"), Placement("shard", 0, mesh="ep")),
    "ep_dispatch_experts": StyleRule(None, None),
}


def placement_for(style: str | None, name: str, ndim: int) -> Placement:
    """The placement of tensor ``name`` (``ndim`` dims) under plan ``style``, with its dim made non-negative."""
    if style is None:
        return PLAIN
    rule = STYLES.get(style)
    if rule is None:
        raise PlanError(f"tensor {name!r}: unknown tensor-parallel style {style!r}; known styles: {sorted(STYLES)}")
    if ndim == 0:
        return PLAIN
    if ndim == 1:
        placement = rule.bias if (rule.bias is not None and name.endswith(".bias")) else rule.vector
    else:
        placement = rule.matrix
    if placement is None:
        return PLAIN
    if placement.dim is None:
        return placement
    return Placement(placement.kind, placement.dim % ndim, placement.split_factor, placement.mesh)


def chunk_range(length: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``length`` is cut like ``torch.chunk`` into ``parts``.

    Every chunk has ``ceil(length / parts)`` items except the last non-empty one; trailing chunks may be empty
    (a vocabulary of 1001 over 4 ranks: 251/251/251/248; 5 over 4: 2/2/1/0), as DTensor's ``Shard`` does.
    """
    size = math.ceil(length / parts) if parts else 0
    start = min(index * size, length)
    return start, min(start + size, length)


def rank_ranges(placement: Placement, shape: tuple[int, ...], tp: int, rank: int) -> list[tuple[int, int]]:
    """The ranges of ``placement.dim`` that ``rank`` holds, in the order they are concatenated locally.

    A plain or replicated tensor is held whole: one range over its first dim (none for a scalar).
    """
    if not placement.is_sharded:
        return [(0, shape[0])] if shape else []
    assert placement.dim is not None
    length = shape[placement.dim]
    if placement.kind == "shard":
        return [chunk_range(length, tp, rank)]
    # _StridedShard: cut the dim into split_factor groups of ceil(n / sf), chunk each group over the ranks.
    factor = placement.split_factor or 1
    width = math.ceil(length / factor)
    ranges = []
    for group in range(factor):
        group_start = group * width
        group_len = max(0, min(group_start + width, length) - group_start)
        start, stop = chunk_range(group_len, tp, rank)
        if stop > start:
            ranges.append((group_start + start, group_start + stop))
    return ranges


def local_shape(placement: Placement, shape: tuple[int, ...], ranges: list[tuple[int, int]]) -> tuple[int, ...]:
    """The shape of a rank's piece: the global shape with the placement's dim cut to the ranges' total length."""
    if not placement.is_sharded:
        return shape
    assert placement.dim is not None
    out = list(shape)
    out[placement.dim] = sum(stop - start for start, stop in ranges)
    return tuple(out)


@dataclass(frozen=True)
class TensorLayout:
    """The planned placement of one tensor: per rank, its ranges along the placement dim and its local shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    style: str | None
    placement: Placement
    ranges: tuple[tuple[tuple[int, int], ...], ...]
    local_shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return nbytes(self.dtype, self.shape)

    def local_nbytes(self, rank: int) -> int:
        """Bytes of ``rank``'s piece."""
        return nbytes(self.dtype, self.local_shapes[rank])


def tensor_layout(name: str, dtype: str, shape: tuple[int, ...], style: str | None, tp: int) -> TensorLayout:
    """Compute where every byte of tensor ``name`` goes under ``style`` at ``tp``.

    A sub-byte tensor (F4) cut where a rank's share would split bytes is refused here, before any byte is read.
    """
    placement = placement_for(style, name, len(shape))
    if placement.is_sharded:
        assert placement.dim is not None
        row_bytes(dtype, shape, placement.dim, name)
    ranges = tuple(tuple(rank_ranges(placement, shape, tp, rank)) for rank in range(tp))
    shapes = tuple(local_shape(placement, shape, list(r)) for r in ranges)
    return TensorLayout(name, dtype, shape, style, placement, ranges, shapes)


def file_order(layouts: list[TensorLayout]) -> list[TensorLayout]:
    """The order tensors take in every rank file: widest dtype first (keeps each tensor aligned), then by name.

    safetensors forbids gaps between tensors, so alignment comes from ordering, as safetensors' own writer does.
    """
    return sorted(layouts, key=file_order_key)


def file_order_key(tensor: TensorLayout | TensorEntry) -> tuple[int, str]:
    """A tensor's place in a rank file: widest dtype (most bits per element) first, then by name."""
    return -DTYPES[tensor.dtype].bits, tensor.name


@dataclass(frozen=True)
class Geometry:
    """A tensor seen as ``[outer, length, row]`` around its placement dim: ``row`` is bytes per index of the dim."""

    outer: int
    length: int
    row: int

    @classmethod
    def of(cls, layout: TensorLayout) -> Geometry:
        dim = layout.placement.dim if layout.placement.is_sharded else 0
        shape = layout.shape or (1,)  # a scalar is one row of one element
        assert dim is not None
        return cls(math.prod(shape[:dim]), shape[dim], row_bytes(layout.dtype, shape, dim, layout.name))


def regrid_parts(
    old_ranges: tuple[tuple[tuple[int, int], ...], ...], new_ranges: tuple[tuple[int, int], ...]
) -> list[tuple[int, int, int]]:
    """Where one rank's slice at another tp lies in the old ranks' slices: ``(old rank, start, length)`` along the
    placement dim, local to that old rank's slice, in the order the new slice concatenates them.

    Example (8 rows over 4 old ranks, new rank 1 of 2 holds rows 4..8):
        >>> regrid_parts((((0, 2),), ((2, 4),), ((4, 6),), ((6, 8),)), ((4, 8),))
        [(2, 0, 2), (3, 0, 2)]
    """
    held = []  # (global start, global stop, old rank, local start) of every old range
    for rank, ranges in enumerate(old_ranges):
        position = 0
        for start, stop in ranges:
            if stop > start:
                held.append((start, stop, rank, position))
            position += stop - start
    held.sort()
    parts = []
    for a, b in new_ranges:
        for start, stop, rank, position in held:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                parts.append((rank, position + lo - start, hi - lo))
    return parts
