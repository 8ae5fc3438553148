"""Read a reshard artifact as a source: each global tensor is assembled from the old rank files' pieces.

Lets ``reshard --tp 4 ./model-tp8`` build a new artifact from the rank files alone, streaming with the same
bounded buffers as a conversion from a checkpoint, and without the original checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import FileFormatError
from reshard.loaders.integrity import hash_file
from reshard.loaders.safetensors_file import read_header
from reshard.manifests import MANIFEST_NAME, Manifest, TensorEntry, read_manifest, resolve_in
from reshard.readers import ColumnSpan, Geometry, OpenFiles, Span, read_exact


@dataclass(frozen=True)
class Piece:
    """One old rank's part of a tensor: where its local bytes start, its local length and global ranges."""

    path: Path
    offset: int
    length: int
    ranges: tuple[tuple[int, int], ...]


@dataclass
class ArtifactTensorReader:
    """Global rows of a tensor, read from the old ranks that hold them (one rank for a replicated tensor)."""

    files: OpenFiles
    name: str
    geometry: Geometry
    pieces: list[Piece]
    local: threading.local = field(default_factory=threading.local)  # each writer thread's scratch buffer

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        """A span when one old rank holds the rows contiguously (one outer index, or whole blocks of a tensor that
        rank holds whole), else ``None``."""
        g = self.geometry
        for piece in self.pieces:
            position = 0
            for start, stop in piece.ranges:
                if start <= lo and hi <= stop and (count == 1 or piece.length == g.length):
                    local = position + lo - start
                    offset = piece.offset + (first * piece.length + local) * g.row
                    nbytes = ((count - 1) * piece.length + hi - lo) * g.row
                    return Span(self.files, piece.path, self.name, offset, nbytes)
                position += stop - start
        return None

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        """Where one old rank's rows end and the next one's begin."""
        edges = {edge for piece in self.pieces if piece.length for r in piece.ranges for edge in r}
        return sorted(edge for edge in edges if lo < edge < hi)

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        """Each old rank's rows of the blocks: contiguous in its file, holding that rank's columns."""
        row = self.geometry.row
        return [
            (Span(self.files, p.path, self.name, p.offset + first * p.length * row, count * p.length * row), p.ranges)
            for p in self.pieces
            if p.length  # an old rank with no rows of this tensor holds none of its columns
        ]

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        row, width = self.geometry.row, hi - lo
        for piece in self.pieces:
            fd = self.files.fd(piece.path)
            position = 0  # where each global range starts in the old rank's local tensor
            for start, stop in piece.ranges:
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    local = position + a - start
                    base = piece.offset + (first * piece.length + local) * row
                    if count == 1:
                        read_exact(fd, piece.path, self.name, out[(a - lo) * row : (b - lo) * row], base)
                    else:
                        self._read_strided(fd, piece, base, count, b - a, (a - lo) * row, width * row, out)
                position += stop - start

    def _read_strided(
        self, fd: int, piece: Piece, base: int, count: int, rows: int, into: int, stride: int, out: memoryview
    ) -> None:
        """``count`` runs of ``rows`` rows, ``piece.length`` rows apart in the old file: read the span once, copy
        each run to ``into + k * stride`` in ``out``."""
        row = self.geometry.row
        span = ((count - 1) * piece.length + rows) * row
        if len(getattr(self.local, "scratch", b"")) < span:
            self.local.scratch = bytearray(span)
        scratch = memoryview(self.local.scratch)
        read_exact(fd, piece.path, self.name, scratch[:span], base)
        run, step = rows * row, piece.length * row
        for k in range(count):
            out[into + k * stride : into + k * stride + run] = scratch[k * step : k * step + run]


def manifest_and_digest(root: Path) -> tuple[Manifest, str]:
    """The artifact's manifest and the xxh3-128 of ``manifest.json`` (the new artifact's lineage points at it)."""
    manifest = read_manifest(root)
    _, digest = hash_file(root / MANIFEST_NAME)
    return manifest, digest


def artifact_readers(
    root: Path, manifest: Manifest, files: OpenFiles, geometries: dict[str, Geometry]
) -> dict[str, ArtifactTensorReader]:
    """A reader per tensor; every rank file's header is checked against the manifest first."""
    headers = {}
    for entry in manifest.files:
        if entry.rank is not None:
            headers[entry.rank] = read_header(resolve_in(root, entry.path))
    readers = {}
    for tensor in manifest.tensors:
        pieces = []
        ranks = tensor.slices if tensor.placement.is_sharded else tensor.slices[:1]
        for piece in ranks:
            header = headers[piece.rank]
            entry = header.tensors.get(tensor.name)
            _check_piece(header.path, tensor, entry, piece.shape)
            assert entry is not None
            length = piece.shape[tensor.placement.dim] if tensor.placement.is_sharded else (tensor.shape or (1,))[0]
            pieces.append(Piece(header.path, entry.offset, length, tuple(piece.ranges) or ((0, 1),)))
        readers[tensor.name] = ArtifactTensorReader(files, tensor.name, geometries[tensor.name], pieces)
    return readers


def _check_piece(path: Path, tensor: TensorEntry, entry: object, shape: tuple[int, ...]) -> None:
    if entry is None:
        raise FileFormatError(f"{path}: tensor {tensor.name!r} is missing from this rank file")
    if getattr(entry, "dtype", None) != tensor.dtype or tuple(getattr(entry, "shape", ())) != tuple(shape):
        raise FileFormatError(f"{path}: tensor {tensor.name!r} does not match the manifest's dtype/shape")
