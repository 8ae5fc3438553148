"""Where a tensor's global bytes come from, read in row blocks: a checkpoint file, fused pieces, an artifact.

The writer asks a ``TensorReader`` for rows ``[lo, hi)`` of some outer indices of a tensor seen as
``[outer, length, row]`` around its placement dim; each reader turns that into ``pread`` calls on its files.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reshard.errors import FileFormatError
from reshard.layout import TensorLayout
from reshard.loaders.safetensors_file import HeaderEntry, itemsize


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
        row = math.prod(shape[dim + 1 :]) * itemsize(layout.dtype)
        return cls(math.prod(shape[:dim]), shape[dim], row)


class TensorReader(Protocol):
    """Where a global tensor's bytes come from: a checkpoint file, or the rank files of another artifact."""

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        """Fill ``out`` with global rows ``[lo, hi)`` of outer indices ``[first, first + count)``, row-major."""
        ...


class OpenFiles:
    """Read-only descriptors opened once per file and closed together."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_exact(fd: int, file: Path, name: str, view: memoryview, offset: int) -> None:
    """``pread`` exactly ``len(view)`` bytes; a short read means the file was cut (or changed) under us."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FileFormatError(f"{file}: tensor {name!r} is cut short at byte {offset + done} (truncated file)")
        done += got


@dataclass
class CheckpointTensorReader:
    """A whole tensor stored contiguously in one safetensors file (a Hugging Face checkpoint)."""

    files: OpenFiles
    file: Path
    entry: HeaderEntry
    geometry: Geometry

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        g = self.geometry
        offset = self.entry.offset + (first * g.length + lo) * g.row
        # Contiguous in the file when whole outer blocks are read, or a run of rows inside one of them.
        assert (lo == 0 and hi == g.length) or count == 1
        read_exact(self.files.fd(self.file), self.file, self.entry.name, out, offset)


@dataclass(frozen=True)
class Segment:
    """A run of bytes in a source file, named after the tensor it belongs to (for error messages)."""

    file: Path
    offset: int
    nbytes: int
    name: str


@dataclass
class SegmentedTensorReader:
    """A tensor whose row-major bytes are the concatenation of segments of other files.

    Fused experts are exactly that: ``gate_up_proj [E, 2I, H]`` is ``gate_0, up_0, gate_1, up_1, ...`` one after
    the other, so the fused tensor is never built in memory; each read becomes a few ``pread`` calls.
    """

    files: OpenFiles
    segments: list[Segment]
    geometry: Geometry
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.starts = []
        position = 0
        for segment in self.segments:
            self.starts.append(position)
            position += segment.nbytes
        self.total = position

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        g = self.geometry
        if lo == 0 and hi == g.length:  # whole outer blocks are one run of the concatenation
            self._read_run(first * g.length * g.row, out[: count * g.length * g.row])
            return
        width = (hi - lo) * g.row
        for index in range(count):
            start = ((first + index) * g.length + lo) * g.row
            self._read_run(start, out[index * width : (index + 1) * width])

    def _read_run(self, start: int, out: memoryview) -> None:
        done = 0
        index = bisect.bisect_right(self.starts, start) - 1
        while done < len(out):
            segment, segment_start = self.segments[index], self.starts[index]
            skip = start + done - segment_start
            take = min(segment.nbytes - skip, len(out) - done)
            fd = self.files.fd(segment.file)
            read_exact(fd, segment.file, segment.name, out[done : done + take], segment.offset + skip)
            done += take
            index += 1
