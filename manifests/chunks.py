"""Where a tensor's bytes are stored, as data: chunks of its row-major bytes, and the arithmetic on them.

A global tensor is seen as one run of bytes in row-major order, whatever its shape. A ``Chunk`` says where some
of those bytes lie in a file: ``count`` runs of ``length`` bytes, ``stride`` apart in the tensor and
``file_stride`` apart in the file (a checkpoint tensor is one run; a rank's slice of a rowwise weight is one run
per row of the weight). A ``StoredTensor`` is a tensor with the chunks that together hold all of its bytes.

Every transform of a checkpoint (renames, expert fusion, KV-head replication) is a change of these chunk lists
(``shifted``, ``remapped``), never of the bytes, and every reader locates bytes through ``locate``: no other module
computes a file offset. Pure: no I/O.

Example (a [4, 6] float32 tensor stored as two column halves, rows of 3 floats each, in two files):
    >>> left = Chunk("a", offset=0, start=0, length=12, count=4, stride=24, file_stride=12)
    >>> right = Chunk("b", offset=0, start=12, length=12, count=4, stride=24, file_stride=12)
    >>> [(p.file, p.offset, p.nbytes) for p in locate((left, right), 24, 48)]  # the second row
    [('a', 12, 12), ('b', 12, 12)]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from reshard.manifests.dtypes import nbytes as tensor_nbytes
from reshard.manifests.errors import FileFormatError

FileName = str | Path


@dataclass(frozen=True)
class Chunk:
    """Tensor bytes ``[start + k * stride, + length)`` stored at ``file`` offset ``offset + k * file_stride``, for
    ``k < count``. ``label`` names the stored tensor, for error messages."""

    file: FileName
    offset: int
    start: int
    length: int
    count: int = 1
    stride: int = 0
    file_stride: int = 0
    label: str = ""

    @property
    def stop(self) -> int:
        """One past the last tensor byte this chunk holds."""
        return self.start + (self.count - 1) * self.stride + self.length if self.count else self.start

    @property
    def nbytes(self) -> int:
        return self.count * self.length


@dataclass(frozen=True)
class Piece:
    """A contiguous run of tensor bytes ``[start, start + nbytes)`` at ``file`` offset ``offset``."""

    file: FileName
    offset: int
    start: int
    nbytes: int
    label: str = ""


@dataclass(frozen=True)
class StoredTensor:
    """A global tensor (name, safetensors dtype, shape) and the chunks holding its row-major bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor in its dtype (what its chunks together hold)."""
        return tensor_nbytes(self.dtype, self.shape)


def contiguous(file: FileName, offset: int, nbytes: int, label: str = "") -> tuple[Chunk, ...]:
    """A tensor stored whole and contiguous (a checkpoint tensor): one chunk, or none for an empty tensor."""
    return (Chunk(file, offset, 0, nbytes, label=label),) if nbytes else ()


def row_major_chunks(
    file: FileName, offset: int, shape: tuple[int, ...], row: int, dim: int,
    ranges: Iterable[tuple[int, int]], label: str = "",
) -> tuple[Chunk, ...]:  # fmt: skip
    """The chunks of a slice stored row-major: global ``ranges`` of ``dim`` concatenated along ``dim`` (a rank's
    slice in a rank file). Each range is one run per index of the dims before ``dim``; ``row`` is the bytes per
    index of ``dim`` (``dtypes.row_bytes``), so this needs no dtype."""
    outer, length = math.prod(shape[:dim]), shape[dim]
    ranges = [(a, b) for a, b in ranges if b > a]
    local = sum(b - a for a, b in ranges)
    if local == length and ranges == sorted(ranges):  # the whole tensor, in its own order
        return contiguous(file, offset, outer * length * row, label)
    chunks, position = [], 0
    for a, b in ranges:
        if outer == 1:
            chunks.append(Chunk(file, offset + position * row, a * row, (b - a) * row, label=label))
        else:
            chunks.append(
                Chunk(file, offset + position * row, a * row, (b - a) * row, outer, length * row, local * row, label)
            )
        position += b - a
    return tuple(chunks)


def shifted(chunks: Iterable[Chunk], delta: int) -> tuple[Chunk, ...]:
    """The same chunks ``delta`` bytes further in the tensor (a part placed inside a fused tensor)."""
    return tuple(replace(c, start=c.start + delta) for c in chunks)


def clip(chunk: Chunk, lo: int, hi: int) -> list[Chunk]:
    """The parts of ``chunk`` holding tensor bytes ``[lo, hi)``: a partial first run, the whole runs between (one
    strided chunk) and a partial last run."""
    if chunk.count == 1 or chunk.stride == 0:
        a, b = max(lo, chunk.start), min(hi, chunk.start + chunk.length)
        return [replace(chunk, offset=chunk.offset + a - chunk.start, start=a, length=b - a, count=1)] if a < b else []
    first = max(0, (lo - chunk.start) // chunk.stride)
    last = min(chunk.count - 1, (hi - 1 - chunk.start) // chunk.stride) if hi > chunk.start else -1
    parts: list[Chunk] = []
    k = first
    while k <= last:
        run_start = chunk.start + k * chunk.stride
        a, b = max(lo, run_start), min(hi, run_start + chunk.length)
        whole = a == run_start and b == run_start + chunk.length
        if whole:  # every run from k on that lies whole inside [lo, hi) is one strided chunk
            end = k
            while end + 1 <= last and chunk.start + (end + 1) * chunk.stride + chunk.length <= hi:
                end += 1
            parts.append(
                replace(chunk, offset=chunk.offset + k * chunk.file_stride, start=run_start, count=end - k + 1)
                if end > k
                else replace(chunk, offset=chunk.offset + k * chunk.file_stride, start=run_start, count=1)
            )
            k = end + 1
            continue
        if a < b:
            offset = chunk.offset + k * chunk.file_stride + a - run_start
            parts.append(replace(chunk, offset=offset, start=a, length=b - a, count=1))
        k += 1
    return parts


def remapped(chunks: Iterable[Chunk], moves: Iterable[tuple[int, int, int]]) -> tuple[Chunk, ...]:
    """A new tensor whose bytes ``[to, to + n)`` are bytes ``[source, source + n)`` of the old one, for each
    ``(to, source, n)`` move: heads duplicated or folded, one expert's part taken out of a fused tensor."""
    chunks = tuple(chunks)
    out: list[Chunk] = []
    for to, source, nbytes in moves:
        for chunk in chunks:
            out.extend(replace(part, start=part.start + to - source) for part in clip(chunk, source, source + nbytes))
    return tuple(sorted(out, key=lambda c: c.start))


@dataclass(frozen=True)
class StridedMove:
    """Bytes ``[to + k * to_stride, + length)`` of a new tensor are bytes ``[source + k * source_stride, + length)``
    of the old one, for ``k < count``: rows gathered from every other row (an interleave undone) or spread back."""

    to: int
    source: int
    length: int
    count: int
    to_stride: int
    source_stride: int


def strided_moved(chunks: Iterable[Chunk], moves: Iterable[StridedMove]) -> tuple[Chunk, ...]:
    """The chunks of a new tensor made by ``moves`` from the old one's ``chunks``, each run of the old chunks that
    holds whole units of a move becoming one strided chunk (not one chunk per row).

    Example (4 rows of 8 bytes stored in order; the new tensor holds the even rows, then the odd ones):
        >>> old = contiguous("f", 100, 32)
        >>> moves = [StridedMove(to=h * 16, source=h * 8, length=8, count=2, to_stride=8, source_stride=16)
        ...          for h in (0, 1)]
        >>> [(c.offset, c.start, c.count, c.stride, c.file_stride) for c in strided_moved(old, moves)]
        [(100, 0, 2, 8, 16), (108, 16, 2, 8, 16)]
    """
    chunks = tuple(chunks)
    out: list[Chunk] = []
    for move in moves:
        if move.count < 1 or move.length < 1:
            continue
        lo, hi = move.source, move.source + (move.count - 1) * move.source_stride + move.length
        for chunk in chunks:
            for part in clip(chunk, lo, hi):
                for k in range(part.count):  # a checkpoint tensor has one run, an old rank's slice one per outer index
                    run = replace(part, offset=part.offset + k * part.file_stride, start=part.start + k * part.stride,
                                  count=1, stride=0, file_stride=0)  # fmt: skip
                    out.extend(_moved_run(run, move))
    return tuple(sorted(out, key=lambda c: c.start))


def _moved_run(run: Chunk, move: StridedMove) -> list[Chunk]:
    """One contiguous run's share of a strided move: the whole units in it as one strided chunk, a unit the run holds
    only part of (at either end) as a chunk of its own."""
    out: list[Chunk] = []
    a, b = run.start, run.start + run.length
    first = max(0, (a - move.source) // move.source_stride)
    last = min(move.count - 1, (b - 1 - move.source) // move.source_stride)
    k = first
    while k <= last:
        unit = move.source + k * move.source_stride
        lo, hi = max(a, unit), min(b, unit + move.length)
        if lo >= hi:
            k += 1
            continue
        if lo == unit and hi == unit + move.length:  # every following unit wholly in the run joins this chunk
            n = min(last, (b - move.length - move.source) // move.source_stride) - k + 1
            out.append(
                replace(run, offset=run.offset + unit - a, start=move.to + k * move.to_stride, length=move.length,
                        count=n, stride=move.to_stride if n > 1 else 0, file_stride=move.source_stride if n > 1 else 0)
            )  # fmt: skip
            k += n
            continue
        out.append(replace(run, offset=run.offset + lo - a, start=move.to + k * move.to_stride + lo - unit,
                           length=hi - lo, count=1))  # fmt: skip
        k += 1
    return out


def locate(chunks: tuple[Chunk, ...], lo: int, hi: int, name: str = "") -> list[Piece]:
    """The file pieces holding tensor bytes ``[lo, hi)``, in order; raise if any byte is held by no chunk."""
    pieces: list[Piece] = []
    for chunk in _candidates(chunks, lo, hi):
        for part in clip(chunk, lo, hi):
            for k in range(part.count):
                start = part.start + k * part.stride
                pieces.append(Piece(part.file, part.offset + k * part.file_stride, start, part.length, part.label))
    pieces.sort(key=lambda p: p.start)
    position = lo
    for piece in pieces:
        if piece.start != position:
            break
        position += piece.nbytes
    if position != hi:
        raise FileFormatError(f"tensor {name!r}: bytes {position}..{hi} are held by no stored chunk")
    return pieces


def _candidates(chunks: tuple[Chunk, ...], lo: int, hi: int) -> tuple[Chunk, ...]:
    """The chunks that may overlap ``[lo, hi)``: found by bisection when the chunks are single runs in order
    (fused experts' many segments), else all of them."""
    if len(chunks) < 8 or any(c.count != 1 for c in chunks):
        return chunks
    starts = [c.start for c in chunks]
    first = max(0, bisect.bisect_right(starts, lo) - 1)
    last = bisect.bisect_left(starts, hi)
    return chunks[first:last]


def merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces that continue each other in the same file, joined."""
    out: list[Piece] = []
    for piece in pieces:
        prev = out[-1] if out else None
        if prev is not None and prev.file == piece.file and prev.offset + prev.nbytes == piece.offset:
            out[-1] = replace(prev, nbytes=prev.nbytes + piece.nbytes)
        else:
            out.append(piece)
    return out


@dataclass(frozen=True)
class ColumnRun:
    """``count`` consecutive blocks of a ``[outer, length, row]`` view whose bytes, block after block, lie
    contiguous in ``file`` from ``offset``; each block holds the global ``columns`` (ranges of the length dim)."""

    file: FileName
    offset: int
    nbytes: int
    columns: tuple[tuple[int, int], ...]
    label: str = ""


def column_runs(chunks: tuple[Chunk, ...], first: int, count: int, length: int, row: int) -> list[ColumnRun] | None:
    """Blocks ``[first, first + count)`` (each ``length * row`` bytes) as file runs that each hold some columns of
    every block, together all of them (a rowwise weight stored whole, or as old ranks' column slices); ``None``
    where the chunks do not store the blocks that way (the caller then reads the bytes piece by piece)."""
    block = length * row
    lo, hi = first * block, (first + count) * block
    parts = [part for chunk in chunks for part in clip(chunk, lo, hi)]
    if hi == lo or sum(p.count * p.length for p in parts) != hi - lo:
        return None
    if len(parts) == 1 and parts[0].count == 1:  # stored whole: every column of every block, in order
        return [ColumnRun(parts[0].file, parts[0].offset, hi - lo, ((0, length),), parts[0].label)]
    groups: dict[FileName, list[Chunk]] = {}
    for part in parts:  # each part must hold the same columns of every block, one run per block
        if part.count != count or (count > 1 and part.stride != block):
            return None
        if (part.start - lo) % row or part.length % row or part.start - lo + part.length > block:
            return None
        groups.setdefault(part.file, []).append(part)
    runs = []
    for file, group in groups.items():
        group.sort(key=lambda p: p.offset)
        width = sum(p.length for p in group)
        position = group[0].offset
        for part in group:  # one file's parts must lie back to back within a block, blocks one after another
            if part.offset != position or (count > 1 and part.file_stride != width):
                return None
            position += part.length
        columns = tuple(((p.start - lo) // row, (p.start - lo + p.length) // row) for p in group)
        runs.append(ColumnRun(file, group[0].offset, count * width, columns, group[0].label))
    return runs
