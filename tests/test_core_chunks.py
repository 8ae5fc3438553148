"""``chunks`` checked on real bytes: a tensor cut into rank slices (each stored row-major in its own "file"), then
any run of its global bytes located through the slices' chunks and read back must be exactly those bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reshard.manifests.chunks import Chunk, column_runs, locate, merged, row_major_chunks, shifted
from reshard.manifests.layout import tensor_layout

ITEMSIZE = 2


def sliced(shape: tuple[int, int, int], style: str, tp: int, seed: int) -> tuple[bytes, dict[str, bytes], tuple]:
    """A random [outer, length, inner] tensor, each rank's slice along dim 1 stored row-major in file ``rank{r}``."""
    rng = np.random.default_rng(seed)
    tensor = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    layout = tensor_layout("t.weight", "BF16", shape, style, tp)
    assert layout.placement.dim == 1
    files, chunks = {}, []
    for rank, ranges in enumerate(layout.ranges):
        local = np.concatenate([tensor[:, a:b, :] for a, b in ranges], axis=1) if ranges else tensor[:, :0, :]
        files[f"rank{rank}"] = local.tobytes()
        chunks += row_major_chunks(f"rank{rank}", 0, shape, shape[2] * ITEMSIZE, 1, ranges)
    return tensor.tobytes(), files, tuple(chunks)


def read(pieces, files: dict[str, bytes]) -> bytes:
    return b"".join(files[p.file][p.offset : p.offset + p.nbytes] for p in pieces)


@pytest.mark.parametrize("style", ["colwise", "packed_colwise"])  # dim 1 of a 3-D tensor
@pytest.mark.parametrize("shape", [(1, 7, 3), (3, 10, 1), (4, 9, 5), (2, 1, 2)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_any_byte_run_is_located_in_the_rank_slices(style: str, shape: tuple[int, int, int], tp: int):
    whole, files, chunks = sliced(shape, style, tp, seed=hash((style, shape, tp)) % 2**32)
    rng = random.Random(0)
    runs = [(0, len(whole))] + [tuple(sorted(rng.sample(range(len(whole) + 1), 2))) for _ in range(50)]
    for lo, hi in runs:
        pieces = locate(chunks, lo, hi, "t.weight")
        assert read(pieces, files) == whole[lo:hi], (lo, hi)
        assert read(merged(pieces), files) == whole[lo:hi]


def test_a_byte_no_chunk_holds_is_an_error():
    whole, _, chunks = sliced((2, 6, 2), "colwise", 2, seed=1)
    missing_rank1 = tuple(c for c in chunks if c.file != "rank1")
    from reshard.manifests.errors import FileFormatError

    with pytest.raises(FileFormatError, match="are held by no stored chunk"):
        locate(missing_rank1, 0, len(whole), "t.weight")


def test_shifted_chunks_place_a_part_inside_a_fused_tensor():
    gate, up = bytes(range(0, 12)), bytes(range(100, 112))
    files = {"g": gate, "u": up}
    chunks = (Chunk("g", 0, 0, 12), *shifted((Chunk("u", 0, 0, 12),), 12))
    assert read(locate(chunks, 0, 24), files) == gate + up
    assert read(locate(chunks, 10, 14), files) == gate[10:] + up[:2]


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_column_runs_cover_every_column_of_each_block(tp: int):
    """Blocks of a tensor sliced along its middle dim (a rowwise weight's columns), as column runs of the rank
    files: each run holds its columns of every block, so scattering them rebuilds the blocks."""
    outer, length, inner = 4, 10, 3
    whole, files, chunks = sliced((outer, length, inner), "colwise", tp, seed=tp)
    row = inner * ITEMSIZE
    tensor = np.frombuffer(whole, dtype=np.uint16).reshape(outer, length, inner)
    runs = column_runs(chunks, 1, 2, length, row)
    assert runs is not None
    rebuilt = np.zeros((2, length, inner), dtype=np.uint16)
    for run in runs:
        data = np.frombuffer(files[str(run.file)][run.offset : run.offset + run.nbytes], dtype=np.uint16)
        width = sum(b - a for a, b in run.columns)
        data = data.reshape(2, width, inner)
        position = 0
        for a, b in run.columns:
            rebuilt[:, a:b, :] = data[:, position : position + b - a, :]
            position += b - a
    assert np.array_equal(rebuilt, tensor[1:3])
