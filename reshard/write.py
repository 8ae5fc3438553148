"""Stream tensor bytes into per-rank safetensors files, hashing as they pass.

Every rank file's header is computed from the layout before any byte is read and written first; then each tensor
is read once from its source in blocks of at most ``buffer_bytes`` and each rank's ranges are appended to its
file. Memory stays bounded by the buffers, whatever the model's size. Knows nothing of plans or styles: it
executes the ``TensorLayout`` values it is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash

from reshard.layout import TensorLayout
from reshard.loaders.safetensors_file import encode_header
from reshard.readers import Geometry, TensorReader

DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024


@dataclass
class RankSink:
    """One rank file being written: the open handle, the running file hash, and each tensor's hash."""

    path: Path
    handle: BinaryIO
    file_hash: xxhash.xxh3_128 = field(default_factory=xxhash.xxh3_128)
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    size: int = 0
    tensor_hash: xxhash.xxh3_128 | None = None  # of the tensor being written, if any

    def write(self, data: memoryview | bytes) -> None:
        self.handle.write(data)
        self.file_hash.update(data)
        if self.tensor_hash is not None:
            self.tensor_hash.update(data)
        self.size += len(data)

    def begin_tensor(self) -> None:
        self.tensor_hash = xxhash.xxh3_128()

    def end_tensor(self, name: str) -> None:
        assert self.tensor_hash is not None
        self.tensor_hashes[name] = self.tensor_hash.hexdigest()
        self.tensor_hash = None


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records of a rank file once it is closed."""

    path: Path
    size: int
    xxh3: str
    tensor_hashes: dict[str, str]


def write_rank_files(
    layouts: list[TensorLayout],
    readers: dict[str, TensorReader],
    paths: dict[int, Path],
    *,
    metadata: dict[str, str],
    buffer_bytes: int | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    rank_metadata: bool = True,
) -> dict[int, WrittenFile]:
    """Write ``paths[r]`` for the ranks given: header, then each layout's rank-r bytes in order.

    Each file is written as ``NAME.tmp``, fsynced and renamed, so a file under its final name is always whole.
    ``readers`` gives each tensor's global bytes; only the rows these ranks hold are read where the layout allows.
    ``on_bytes`` is called with the number of global bytes consumed (for a progress bar). ``rank_metadata``
    records each file's rank in its header metadata.
    """
    handles: list[BinaryIO] = []
    sinks: dict[int, RankSink] = {}
    try:
        for rank, path in paths.items():
            handle = open(_temporary(path), "wb")  # noqa: SIM115 - closed in finally, many at once
            handles.append(handle)
            sinks[rank] = RankSink(path, handle)
            header = [(t.name, t.dtype, t.local_shapes[rank]) for t in layouts]
            file_metadata = {**metadata, "rank": str(rank)} if rank_metadata else metadata
            sinks[rank].write(encode_header(header, file_metadata, align=64))
        streamer = _Streamer(sinks, bytearray(buffer_bytes or DEFAULT_BUFFER_BYTES), on_bytes)
        for layout in layouts:
            for sink in sinks.values():
                sink.begin_tensor()
            streamer.copy(readers[layout.name], layout)
            for sink in sinks.values():
                sink.end_tensor(layout.name)
        written = {}
        for rank, sink in sinks.items():
            sink.handle.flush()
            os.fsync(sink.handle.fileno())
            sink.handle.close()
            os.replace(_temporary(sink.path), sink.path)
            written[rank] = WrittenFile(sink.path, sink.size, sink.file_hash.hexdigest(), sink.tensor_hashes)
        return written
    finally:
        for handle in handles:
            handle.close()
        for sink in sinks.values():
            _temporary(sink.path).unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class _Streamer:
    """Copies tensors into the rank files through two fixed buffers (one read, one gather): bounded memory."""

    def __init__(self, sinks: dict[int, RankSink], buffer: bytearray, on_bytes: Callable[[int], None]) -> None:
        self.sinks, self.buffer, self.gather, self.on_bytes = sinks, buffer, bytearray(len(buffer)), on_bytes

    def copy(self, reader: TensorReader, layout: TensorLayout) -> None:
        """View the tensor as ``[outer, length, row]`` around its placement dim and cut each rank's ranges."""
        g = Geometry.of(layout)
        block = g.length * g.row
        if block == 0 or g.outer == 0:
            return
        if block <= len(self.buffer) and g.outer > 1:
            self._whole_blocks(reader, layout, g)
        else:
            self._row_runs(reader, layout, g)

    def _row_runs(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Runs of rows inside each outer index: every rank's piece of a run is contiguous, nothing is gathered.

        Only the rows these ranks hold are read (a worker writing some of the ranks reads only their share).
        """
        held = [r for rank in self.sinks for r in layout.ranges[rank]]
        if not held:
            return
        lowest, highest = min(start for start, _ in held), max(stop for _, stop in held)
        rows_per_read = max(1, len(self.buffer) // g.row)
        mv = memoryview(self.buffer)
        for index in range(g.outer):
            for first in range(lowest, highest, rows_per_read):
                last = min(first + rows_per_read, highest)
                nbytes = (last - first) * g.row
                chunk = mv[:nbytes] if nbytes <= len(self.buffer) else memoryview(bytearray(nbytes))  # a huge row
                reader.read(index, 1, first, last, chunk)
                self.on_bytes(nbytes)
                for rank, sink in self.sinks.items():
                    for start, stop in layout.ranges[rank]:
                        lo, hi = max(start, first), min(stop, last)
                        if lo < hi:
                            sink.write(chunk[(lo - first) * g.row : (hi - first) * g.row])

    def _whole_blocks(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Read several whole outer indices at once and gather each rank's ranges (e.g. a rowwise weight's columns)."""
        block = g.length * g.row
        per_read = max(1, len(self.buffer) // block)
        mv, gathered = memoryview(self.buffer), memoryview(self.gather)
        for first in range(0, g.outer, per_read):
            count = min(per_read, g.outer - first)
            nbytes = count * block
            reader.read(first, count, 0, g.length, mv[:nbytes])
            self.on_bytes(nbytes)
            for rank, sink in self.sinks.items():
                ranges = layout.ranges[rank]
                if not any(stop > start for start, stop in ranges):
                    continue
                if ranges == ((0, g.length),):  # the whole tensor (replicated): the buffer as read
                    sink.write(mv[:nbytes])
                elif count == 1 and len(ranges) == 1:  # one contiguous run: no gather needed
                    start, stop = ranges[0]
                    sink.write(mv[start * g.row : stop * g.row])
                else:  # one slice copy per outer index and range: memoryview copies, no tensor library needed
                    position = 0
                    for index in range(count):
                        base = index * block
                        for start, stop in ranges:
                            size = (stop - start) * g.row
                            gathered[position : position + size] = mv[base + start * g.row : base + stop * g.row]
                            position += size
                    sink.write(gathered[:position])
