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

import torch
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

    def write(self, data: memoryview | bytes, tensor_hash: xxhash.xxh3_128 | None) -> None:
        self.handle.write(data)
        self.file_hash.update(data)
        if tensor_hash is not None:
            tensor_hash.update(data)
        self.size += len(data)


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
            sinks[rank].write(encode_header(header, file_metadata, align=64), None)
        buffer = bytearray(buffer_bytes or DEFAULT_BUFFER_BYTES)
        gather = bytearray(len(buffer))
        for layout in layouts:
            hashes = {rank: xxhash.xxh3_128() for rank in sinks}
            _stream_tensor(readers[layout.name], layout, sinks, hashes, buffer, gather, on_bytes)
            for rank, sink in sinks.items():
                sink.tensor_hashes[layout.name] = hashes[rank].hexdigest()
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


def _stream_tensor(
    reader: TensorReader,
    layout: TensorLayout,
    sinks: dict[int, RankSink],
    hashes: dict[int, xxhash.xxh3_128],
    buffer: bytearray,
    gather: bytearray,
    on_bytes: Callable[[int], None],
) -> None:
    """Copy one tensor: view it as ``[outer, length, row]`` around the placement's dim and cut ranges of ``length``."""
    g = Geometry.of(layout)
    block = g.length * g.row
    if block == 0 or g.outer == 0:
        return
    if block <= len(buffer) and g.outer > 1:
        _stream_whole_blocks(reader, layout, g, sinks, hashes, buffer, gather, on_bytes)
        return
    # Runs of rows inside each outer index; every rank's piece of a run is contiguous, so nothing is gathered.
    # Only the rows these ranks hold are read (a worker writing some of the ranks reads only their share).
    held = [r for rank in sinks for r in layout.ranges[rank]]
    if not held:
        return
    lowest, highest = min(start for start, _ in held), max(stop for _, stop in held)
    rows_per_read = max(1, len(buffer) // g.row)
    mv = memoryview(buffer)
    for index in range(g.outer):
        for first in range(lowest, highest, rows_per_read):
            last = min(first + rows_per_read, highest)
            nbytes = (last - first) * g.row
            chunk = mv[:nbytes] if nbytes <= len(buffer) else memoryview(bytearray(nbytes))
            reader.read(index, 1, first, last, chunk)
            on_bytes(nbytes)
            for rank, sink in sinks.items():
                for start, stop in layout.ranges[rank]:
                    lo, hi = max(start, first), min(stop, last)
                    if lo < hi:
                        sink.write(chunk[(lo - first) * g.row : (hi - first) * g.row], hashes[rank])


def _stream_whole_blocks(
    reader: TensorReader,
    layout: TensorLayout,
    g: Geometry,
    sinks: dict[int, RankSink],
    hashes: dict[int, xxhash.xxh3_128],
    buffer: bytearray,
    gather: bytearray,
    on_bytes: Callable[[int], None],
) -> None:
    """Read several whole outer indices at once and gather each rank's ranges (e.g. a rowwise weight's columns)."""
    block = g.length * g.row
    per_read = max(1, len(buffer) // block)
    source = torch.frombuffer(buffer, dtype=torch.uint8)
    target = torch.frombuffer(gather, dtype=torch.uint8)
    mv, gathered = memoryview(buffer), memoryview(gather)
    for first in range(0, g.outer, per_read):
        count = min(per_read, g.outer - first)
        nbytes = count * block
        reader.read(first, count, 0, g.length, mv[:nbytes])
        on_bytes(nbytes)
        blocks = source[:nbytes].view(count, g.length, g.row)
        for rank, sink in sinks.items():
            ranges = layout.ranges[rank]
            width = sum(stop - start for start, stop in ranges)
            if not width:
                continue
            if ranges == ((0, g.length),):  # the whole tensor (replicated): the buffer as read
                sink.write(mv[:nbytes], hashes[rank])
                continue
            if count == 1 and len(ranges) == 1:  # one contiguous run: no gather needed
                start, stop = ranges[0]
                sink.write(mv[start * g.row : stop * g.row], hashes[rank])
                continue
            out = target[: count * width * g.row].view(count, width, g.row)
            torch.cat([blocks[:, start:stop] for start, stop in ranges], dim=1, out=out)
            sink.write(gathered[: count * width * g.row], hashes[rank])
