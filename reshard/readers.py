"""Where a tensor's global bytes come from, read in row blocks: a checkpoint file, fused pieces, an artifact.

The writer asks a ``TensorReader`` for rows ``[lo, hi)`` of some outer indices of a tensor seen as
``[outer, length, row]`` around its placement dim. Where those bytes lie contiguous in one file, the reader lends
them as a ``Span`` (a view of the mapped file, or a scattering ``preadv``); otherwise it ``pread``s them into the
writer's buffer.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        """Where the same bytes lie contiguous in one file, else ``None`` (the writer then ``read``s them)."""
        ...

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        """Rows strictly inside ``(lo, hi)`` of outer index ``index`` where the bytes move to another file or
        place (an old rank's boundary, an expert's segment): the writer asks for a span on each side."""
        ...

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        """Whole outer indices ``[first, first + count)`` as spans that each hold, row after row, some of the
        columns (global ranges of the placement dim), together all of them; ``None`` if the reader cannot."""
        ...


ColumnSpan = tuple["Span", tuple[tuple[int, int], ...]]  # a span and the global columns each of its rows holds


@dataclass(frozen=True)
class Span:
    """A run of a source file holding some rows of a tensor, contiguous: lent as a view, or scattered by preadv."""

    files: OpenFiles
    path: Path
    name: str  # the tensor, for errors
    offset: int
    nbytes: int

    def mapped(self) -> contextlib.AbstractContextManager[memoryview]:
        """The bytes as a view into the page cache (no copy), dropped from this process once used."""
        return self.files.mapped(self.path, self.name, self.offset, self.nbytes)

    def scatter(self, reads: list[tuple[int, list[memoryview], int]]) -> None:
        """``preadv`` each ``(relative offset, buffers, their total bytes)``: one system call fills many buffers, the
        kernel copying each piece where it belongs (a rowwise weight's columns into each rank's buffer)."""
        fd = self.files.fd(self.path)
        for start, buffers, expected in reads:
            if os.preadv(fd, buffers, self.offset + start) != expected:  # a short read: the file was cut
                raise FileFormatError(
                    f"{self.path}: tensor {self.name!r} is cut short after byte {self.offset + start} (truncated file)"
                )


class SourceHashes:
    """xxh3-128 of whole source files, computed on a background thread while the rank files are written.

    The thread reads each file once, in order, from a read-only mapping (no copy out of the page cache), so on
    a cold cache it also reads the checkpoint ahead of the writers. ``digest`` waits for a file's hash, or
    hashes the file itself if the thread was never started (a worker that only writes some of the ranks).
    """

    def __init__(self, files: list[Path]) -> None:
        self._files = list(files)
        self._digests: dict[Path, tuple[int, str]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reshard-source-hashes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for path in self._files:
                self._digests[path] = hash_file(path)
        except BaseException as exc:  # raised again by digest(), in the caller's thread
            self._error = exc

    def digest(self, path: Path) -> tuple[int, str]:
        """Size and xxh3-128 of ``path``."""
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        if path not in self._digests:
            self._digests[path] = hash_file(path)
        return self._digests[path]


class OpenFiles:
    """Read-only descriptors and whole-file mappings, opened once per file, shared by the writer threads.

    ``mapped`` lends a view straight into the page cache (zero copy); the pages are dropped from this process's
    mapping once the view is returned, so resident memory stays bounded by the views in use, not by the model.
    Every view is checked against the file's size when mapped (and tensor offsets against it when the header is
    read); like safetensors' own loader, this relies on the source not being truncated while it is converted.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._mappings: dict[Path, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, path: Path, name: str, view: memoryview, offset: int) -> None:
        """Read exactly ``len(view)`` bytes of ``path`` at ``offset`` (``name``: the tensor, for errors)."""
        read_exact(self.fd(path), path, name, view, offset)

    @contextlib.contextmanager
    def mapped(self, path: Path, name: str, offset: int, nbytes: int) -> Iterator[memoryview]:
        """A read-only view of ``nbytes`` of ``path`` at ``offset``, dropped from this process once used."""
        mapping, whole = self._mapping(path)
        if offset + nbytes > len(mapping):
            raise FileFormatError(f"{path}: tensor {name!r} is cut short at byte {len(mapping)} (truncated file)")
        view = whole[offset : offset + nbytes]
        try:
            yield view
        finally:
            view.release()
            start = offset - offset % mmap.PAGESIZE
            if nbytes:
                mapping.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def _mapping(self, path: Path) -> tuple[mmap.mmap, memoryview]:
        fd = self.fd(path)
        with self._lock:
            if path not in self._mappings:
                if os.fstat(fd).st_size == 0:
                    raise FileFormatError(f"{path}: empty file")
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                self._mappings[path] = (mapping, memoryview(mapping))
            return self._mappings[path]

    def close(self) -> None:
        with self._lock:
            for mapping, whole in self._mappings.values():
                whole.release()
                with contextlib.suppress(BufferError):  # a view still referenced (a traceback): unmapped when freed
                    mapping.close()
            self._mappings.clear()
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


def whole_rows(span: Span | None, geometry: Geometry) -> list[ColumnSpan] | None:
    """A span of whole outer blocks as the one column span holding every column (``None`` stays ``None``)."""
    return None if span is None else [(span, ((0, geometry.length),))]


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

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        g = self.geometry
        if not ((lo == 0 and hi == g.length) or count == 1):
            return None
        offset = self.entry.offset + (first * g.length + lo) * g.row
        nbytes = ((count - 1) * g.length + hi - lo) * g.row
        return Span(self.files, self.file, self.entry.name, offset, nbytes)

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        return whole_rows(self.span(first, count, 0, self.geometry.length), self.geometry)

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        return []  # the whole tensor is one run of one file


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

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        """A span where the run lies inside one segment (one expert's tensor), else ``None``."""
        g = self.geometry
        if not ((lo == 0 and hi == g.length) or count == 1):
            return None
        start = (first * g.length + lo) * g.row
        nbytes = ((count - 1) * g.length + hi - lo) * g.row
        index = bisect.bisect_right(self.starts, start) - 1
        segment, skip = self.segments[index], start - self.starts[index]
        if skip + nbytes > segment.nbytes:
            return None
        return Span(self.files, segment.file, segment.name, segment.offset + skip, nbytes)

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        return whole_rows(self.span(first, count, 0, self.geometry.length), self.geometry)

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        """Rows where another segment (another expert's tensor, or the up half after the gate half) begins. A segment
        that begins inside a row leaves that row to ``read``."""
        g = self.geometry
        rows = [start // g.row - index * g.length for start in self.starts if start % g.row == 0]
        return [row for row in rows if lo < row < hi]

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
