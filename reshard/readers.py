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

import xxhash

from reshard.errors import FileFormatError
from reshard.layout import TensorLayout
from reshard.loaders.integrity import hash_file
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


class SequentialHashes:
    """xxh3-128 of whole source files, fed by the reads a conversion makes anyway.

    A file's hash advances while the reads arrive in file order (a Hugging Face checkpoint's tensors are stored
    sorted by dtype and name, the order rank files are written in), so the source is not read a second time
    just to be hashed; a file read out of order or only in part is hashed again at the end (``digest``).
    """

    def __init__(self, files: list[Path]) -> None:
        self._state = {path: (0, xxhash.xxh3_128()) for path in files}
        self._broken: set[Path] = set()

    def feed(self, path: Path, offset: int, data: memoryview) -> None:
        state = self._state.get(path)
        if state is None or path in self._broken:
            return
        cursor, digest = state
        if offset > cursor:
            self._fill(path, cursor, offset)  # a gap (a header, a tensor no rank needs): read it now
            cursor, digest = self._state[path]
        if offset < cursor < offset + len(data):
            data, offset = data[cursor - offset :], cursor
        if offset == cursor:
            digest.update(data)
            self._state[path] = (cursor + len(data), digest)
        elif offset + len(data) > cursor:
            self._broken.add(path)

    def _fill(self, path: Path, start: int, stop: int) -> None:
        if stop - start > 64 * 1024 * 1024:
            self._broken.add(path)  # a large gap: cheaper to hash the file once at the end
            return
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(stop - start)
        cursor, digest = self._state[path]
        digest.update(data)
        self._state[path] = (cursor + len(data), digest)

    def digest(self, path: Path) -> tuple[int, str]:
        """Size and xxh3-128 of ``path``: from the reads if they covered it in order, else by reading it."""
        size = path.stat().st_size
        state = self._state.get(path)
        if state is not None and path not in self._broken:
            self._fill(path, state[0], size)
            cursor, digest = self._state[path]
            if path not in self._broken and cursor == size:
                return size, digest.hexdigest()
        return hash_file(path)


class OpenFiles:
    """Read-only descriptors opened once per file and closed together; reads can feed ``SequentialHashes``."""

    def __init__(self, hashes: SequentialHashes | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self.hashes = hashes

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, path: Path, name: str, view: memoryview, offset: int) -> None:
        """Read exactly ``len(view)`` bytes of ``path`` at ``offset`` (``name``: the tensor, for errors)."""
        read_exact(self.fd(path), path, name, view, offset)
        if self.hashes is not None:
            self.hashes.feed(path, offset, view)

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
        self.files.read(self.file, self.entry.name, out, offset)

    def source_span(self, first: int, lo: int) -> tuple[int, int]:
        """Where global row ``lo`` of outer index ``first`` lies in the source: (descriptor, byte offset). The writer
        copies such runs file to file in the kernel (``copy_file_range``) instead of writing them from memory."""
        g = self.geometry
        return self.files.fd(self.file), self.entry.offset + (first * g.length + lo) * g.row


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
            self.files.read(segment.file, segment.name, out[done : done + take], segment.offset + skip)
            done += take
            index += 1
