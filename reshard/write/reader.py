"""The one reader of source bytes: a stored tensor's chunks, read as the copy engine asks for them.

The engine asks for rows ``[lo, hi)`` of some outer indices of a tensor seen as ``[outer, length, row]`` around its
placement dim (``Geometry``). The reader turns each request into tensor bytes and asks ``manifests.chunks`` where
they lie; where they lie contiguous in one file it lends them as a ``Span`` (a view of the mapped file, or a
scattering ``preadv``), otherwise it ``pread``s the pieces into the engine's buffer. It computes no file offsets of
its own, whatever the source: a checkpoint, fused experts, another artifact's rank files, remapped KV heads.
A ``CastReader`` serves a tensor stored in another dtype than the source's (``reshard --dtype``): read, converted.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from reshard.manifests.chunks import StoredTensor, column_runs, locate, merged
from reshard.manifests.dtypes import DTYPES
from reshard.manifests.errors import FileFormatError
from reshard.manifests.layout import Geometry

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


@dataclass(frozen=True)
class ChunkReader:
    """Rows of a stored tensor in the geometry of the layout being written."""

    files: OpenFiles
    tensor: StoredTensor
    geometry: Geometry

    def _bytes(self, first: int, count: int, lo: int, hi: int) -> tuple[int, int] | None:
        """The tensor bytes of the request when they are one contiguous run (whole blocks, or rows of one block)."""
        g = self.geometry
        if not ((lo == 0 and hi == g.length) or count == 1):
            return None
        start = (first * g.length + lo) * g.row
        return start, start + ((count - 1) * g.length + hi - lo) * g.row

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        """The bytes as one span of one file, if they lie that way."""
        run = self._bytes(first, count, lo, hi)
        if run is None:
            return None
        pieces = merged(locate(self.tensor.chunks, *run, self.tensor.name))
        if len(pieces) != 1:
            return None
        piece = pieces[0]
        return Span(self.files, Path(piece.file), piece.label or self.tensor.name, piece.offset, piece.nbytes)

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        """Fill ``out`` with global rows ``[lo, hi)`` of outer indices ``[first, first + count)``, row-major."""
        g = self.geometry
        run = self._bytes(first, count, lo, hi)
        runs = (
            [run]
            if run
            else [((k * g.length + lo) * g.row, (k * g.length + hi) * g.row) for k in range(first, first + count)]
        )
        position = 0
        for start, stop in runs:
            for piece in merged(locate(self.tensor.chunks, start, stop, self.tensor.name)):
                view = out[position : position + piece.nbytes]
                self.files.read(Path(piece.file), piece.label or self.tensor.name, view, piece.offset)
                position += piece.nbytes

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        """Rows strictly inside ``(lo, hi)`` of outer index ``index`` where the bytes move to another file or place
        (an old rank's boundary, an expert's segment, a head): the engine asks for a span on each side. A piece
        that begins inside a row leaves that row to ``read``."""
        g = self.geometry
        base = index * g.length * g.row
        pieces = merged(locate(self.tensor.chunks, base + lo * g.row, base + hi * g.row, self.tensor.name))
        rows = [(p.start - base) // g.row for p in pieces[1:] if (p.start - base) % g.row == 0]
        return [row for row in rows if lo < row < hi]

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        """Whole outer indices ``[first, first + count)`` as spans that each hold, row after row, some of the
        columns, together all of them; ``None`` where the source is not stored that way."""
        g = self.geometry
        runs = column_runs(self.tensor.chunks, first, count, g.length, g.row)
        if runs is None:
            return None
        return [
            (Span(self.files, Path(r.file), r.label or self.tensor.name, r.offset, r.nbytes), r.columns) for r in runs
        ]


@dataclass(frozen=True)
class CastReader(ChunkReader):
    """Rows of a stored tensor converted to ``dtype`` (``reshard --dtype``): ``geometry`` is the written one.

    Each run is read in the source's dtype into ``scratch(nbytes)`` and converted by torch's own cast (what ``.to``
    does: round to nearest even), so the bytes are the ones transformers makes when it casts at load. Nothing is
    lent as a span: the engine always reads into its buffer, and the source's pieces are ``read``'s to gather.
    """

    dtype: str
    scratch: Callable[[int], bytearray]

    @property
    def _source(self) -> ChunkReader:
        g = self.geometry
        row = g.row * DTYPES[self.tensor.dtype].bits // DTYPES[self.dtype].bits
        return ChunkReader(self.files, self.tensor, replace(g, row=row))

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        return None

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        return None

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        return []

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        import torch

        nbytes = len(out) * DTYPES[self.tensor.dtype].bits // DTYPES[self.dtype].bits
        if not nbytes:
            return
        with memoryview(self.scratch(nbytes))[:nbytes] as raw:
            self._source.read(first, count, lo, hi, raw)
            source = torch.frombuffer(raw, dtype=getattr(torch, DTYPES[self.tensor.dtype].torch))
            torch.frombuffer(out, dtype=getattr(torch, DTYPES[self.dtype].torch)).copy_(source)
            del source  # releases its export of raw before raw is released


def tensor_xxh3(tensor: StoredTensor, block: int = 8 * 1024 * 1024) -> str:
    """xxh3-128 of a stored tensor's row-major bytes, read piece by piece (to compare two tensors' bytes)."""
    import xxhash

    digest = xxhash.xxh3_128()
    nbytes = tensor.nbytes
    files = OpenFiles()
    try:
        for lo in range(0, nbytes, block):
            for piece in locate(tensor.chunks, lo, min(lo + block, nbytes), tensor.name):
                buffer = bytearray(piece.nbytes)
                files.read(Path(piece.file), tensor.name, memoryview(buffer), piece.offset)
                digest.update(buffer)
    finally:
        files.close()
    return digest.hexdigest()
