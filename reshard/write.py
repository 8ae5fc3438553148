"""Stream tensor bytes into per-rank safetensors files, hashing as they pass.

Every rank file's header is computed from the layout before any byte is read and written first; then each tensor
is read once from its source in blocks of at most ``buffer_bytes`` and each rank's ranges are appended to its
file. Memory stays bounded by the buffers, whatever the model's size. Knows nothing of plans or styles: it
executes the ``TensorLayout`` values it is given.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
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
        self._hash(data)

    def copy_range(self, source_fd: int, offset: int, data: memoryview) -> None:
        """Append ``data``, which is also at ``offset`` in ``source_fd``: copied in the kernel, hashed from memory.

        ``copy_file_range`` costs a fraction of ``write`` here (no copy out of this process's memory); where the
        file systems cannot do it, this falls back to ``write``.
        """
        done, fd = 0, self.handle.fileno()
        try:
            while done < len(data):
                copied = os.copy_file_range(source_fd, fd, len(data) - done, offset + done)
                if copied == 0:
                    break
                done += copied
        except OSError:
            pass
        if done < len(data):
            self.handle.write(data[done:])
        self._hash(data)

    def _hash(self, data: memoryview | bytes) -> None:
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
            # unbuffered, so that kernel copies (copy_range) and writes land in order at the file position
            handle = open(_temporary(path), "wb", buffering=0)  # noqa: SIM115 - closed in finally, many at once
            handles.append(handle)
            sinks[rank] = RankSink(path, handle)
            header = [(t.name, t.dtype, t.local_shapes[rank]) for t in layouts]
            file_metadata = {**metadata, "rank": str(rank)} if rank_metadata else metadata
            sinks[rank].write(encode_header(header, file_metadata, align=64))
        with _Streamer(sinks, buffer_bytes or DEFAULT_BUFFER_BYTES, on_bytes) as streamer:
            for layout in layouts:
                streamer.copy(readers[layout.name], layout)
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


class _WriteThread:
    """Performs sink operations in order on a second thread, so that writing and hashing one block overlap reading
    and gathering the next (file writes and xxh3 release the GIL). The first error is raised on the next ``wait``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | threading.Event | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reshard-writer", daemon=True)
        self._thread.start()

    def submit(self, operation: Callable[[], None]) -> None:
        self._queue.put(operation)

    def marker(self) -> threading.Event:
        """An event set once everything submitted so far is done (or has been skipped after an error)."""
        done = threading.Event()
        self._queue.put(done)
        return done

    def wait(self, done: threading.Event) -> None:
        done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif self._error is None:  # after a failure the rest is skipped; markers still wake the reader
                try:
                    item()
                except BaseException as exc:
                    self._error = exc


class _Buffers:
    """Two read buffers (each with its gather buffer), used in turn: one is filled while the other is written."""

    def __init__(self, size: int, writer: _WriteThread) -> None:
        self.pairs = [(bytearray(size), bytearray(size)) for _ in range(2)]
        self.released: list[threading.Event | None] = [None, None]
        self.turn = 0
        self.writer = writer

    def take(self) -> tuple[bytearray, bytearray]:
        """The next buffer pair, once the writes that used it last are done."""
        self.turn ^= 1
        if (pending := self.released[self.turn]) is not None:
            self.writer.wait(pending)
        return self.pairs[self.turn]

    def give_back(self) -> None:
        """The current pair may be reused once everything submitted so far has been written."""
        self.released[self.turn] = self.writer.marker()


class _Streamer:
    """Copies tensors into the rank files through fixed buffers (bounded memory): this thread reads and gathers,
    a second one writes and hashes."""

    def __init__(self, sinks: dict[int, RankSink], buffer_bytes: int, on_bytes: Callable[[int], None]) -> None:
        self.sinks, self.on_bytes = sinks, on_bytes
        self.writer = _WriteThread()
        self.buffers = _Buffers(buffer_bytes, self.writer)
        self.size = buffer_bytes

    def __enter__(self) -> _Streamer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.writer.close()

    def _write(self, sink: RankSink, data: memoryview, source: tuple[int, int] | None = None) -> None:
        """Queue ``data`` for ``sink``; with ``source`` (descriptor, offset) of the same bytes, copy in the kernel."""
        if source is None:
            self.writer.submit(functools.partial(sink.write, data))
        else:
            self.writer.submit(functools.partial(sink.copy_range, source[0], source[1], data))

    def copy(self, reader: TensorReader, layout: TensorLayout) -> None:
        """View the tensor as ``[outer, length, row]`` around its placement dim and cut each rank's ranges."""
        for sink in self.sinks.values():
            self.writer.submit(sink.begin_tensor)
        g = Geometry.of(layout)
        block = g.length * g.row
        if block and g.outer:
            if block <= self.size and g.outer > 1:
                self._whole_blocks(reader, layout, g)
            else:
                self._row_runs(reader, layout, g)
        for sink in self.sinks.values():
            self.writer.submit(functools.partial(sink.end_tensor, layout.name))

    def _row_runs(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Runs of rows inside each outer index: every rank's piece of a run is contiguous, nothing is gathered.

        Only the rows these ranks hold are read (a worker writing some of the ranks reads only their share).
        """
        held = [r for rank in self.sinks for r in layout.ranges[rank]]
        if not held:
            return
        lowest, highest = min(start for start, _ in held), max(stop for _, stop in held)
        rows_per_read = max(1, self.size // g.row)
        for index in range(g.outer):
            for first in range(lowest, highest, rows_per_read):
                last = min(first + rows_per_read, highest)
                nbytes = (last - first) * g.row
                buffer, _ = self.buffers.take()
                chunk = memoryview(buffer)[:nbytes] if nbytes <= self.size else memoryview(bytearray(nbytes))
                reader.read(index, 1, first, last, chunk)
                self.on_bytes(nbytes)
                span = reader.source_span(index, first) if hasattr(reader, "source_span") else None
                for rank, sink in self.sinks.items():
                    for start, stop in layout.ranges[rank]:
                        lo, hi = max(start, first), min(stop, last)
                        if lo < hi:
                            source = (span[0], span[1] + (lo - first) * g.row) if span else None
                            self._write(sink, chunk[(lo - first) * g.row : (hi - first) * g.row], source)
                self.buffers.give_back()

    def _whole_blocks(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Read several whole outer indices at once and gather each rank's ranges (e.g. a rowwise weight's columns).

        The gather buffer holds every rank's gathered piece of the block at once (together they are at most the
        block), so all of them can be handed to the writer before the buffers are reused.
        """
        block = g.length * g.row
        per_read = max(1, self.size // block)
        for first in range(0, g.outer, per_read):
            count = min(per_read, g.outer - first)
            nbytes = count * block
            buffer, gather = self.buffers.take()
            mv, gathered = memoryview(buffer), memoryview(gather)
            reader.read(first, count, 0, g.length, mv[:nbytes])
            self.on_bytes(nbytes)
            span = reader.source_span(first, 0) if hasattr(reader, "source_span") else None
            position = 0
            for rank, sink in self.sinks.items():
                ranges = layout.ranges[rank]
                if not any(stop > start for start, stop in ranges):
                    continue
                if ranges == ((0, g.length),):  # the whole tensor (replicated): the buffer as read
                    self._write(sink, mv[:nbytes], span)
                elif count == 1 and len(ranges) == 1:  # one contiguous run: no gather needed
                    start, stop = ranges[0]
                    self._write(sink, mv[start * g.row : stop * g.row])
                else:  # one slice copy per outer index and range: memoryview copies, no tensor library needed
                    begin = position
                    for index in range(count):
                        base = index * block
                        for start, stop in ranges:
                            size = (stop - start) * g.row
                            gathered[position : position + size] = mv[base + start * g.row : base + stop * g.row]
                            position += size
                    self._write(sink, gathered[begin:position])
            self.buffers.give_back()
