"""Stream tensor bytes into per-rank safetensors files, hashing as they pass.

Every rank file's header is computed from the layout before any byte is read and written first; then each tensor
is taken from its source in blocks of at most ``buffer_bytes`` and each rank's ranges are appended to its file.
Source bytes are written straight from the mapped checkpoint (no copy into this process) and hashed while they
are still in the CPU cache; only a rowwise tensor's columns are gathered through a fixed buffer. The ranks are
split into contiguous groups, one thread each: rank files are independent, and file writes and xxh3 release
the GIL, so the groups run in parallel. Memory stays bounded by the buffers, whatever the model's size.
Knows nothing of plans or styles: it executes the ``TensorLayout`` values it is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from reshard.layout import TensorLayout
from reshard.loaders.safetensors_file import encode_header, itemsize
from reshard.readers import Geometry, TensorReader

DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
PIECE_BYTES = 512 * 1024  # written, then hashed twice while still in the CPU cache
WRITEBACK_BYTES = 64 * 1024 * 1024  # start a file's disk writes every this many bytes, not all at the final fsync


@dataclass
class RankSink:
    """One rank file being written: its descriptor, the running file hash, and each tensor's hash."""

    path: Path
    fd: int
    file_hash: xxhash.xxh3_128 = field(default_factory=xxhash.xxh3_128)
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    size: int = 0
    flushed: int = 0  # bytes whose write-back to disk has been started
    tensor_hash: xxhash.xxh3_128 | None = None  # of the tensor being written, if any

    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` and hash it, piece by piece so that the hashes read what the write just read."""
        with memoryview(data) as view:
            for start in range(0, len(view), PIECE_BYTES):
                with view[start : start + PIECE_BYTES] as piece:
                    _write_all(self.fd, piece)
                    self.file_hash.update(piece)
                    if self.tensor_hash is not None:
                        self.tensor_hash.update(piece)
            self.size += len(view)
        if self.size - self.flushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.flushed, self.size - self.flushed)
            self.flushed = self.size

    def begin_tensor(self) -> None:
        self.tensor_hash = xxhash.xxh3_128()

    def end_tensor(self, name: str) -> None:
        assert self.tensor_hash is not None
        self.tensor_hashes[name] = self.tensor_hash.hexdigest()
        self.tensor_hash = None


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to disk without waiting, so the
    disk works while later tensors are copied and the final fsync has little left to do. ``None`` elsewhere."""
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "O_DIRECT"):  # O_DIRECT: a stand-in for "this is Linux"
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, write)  # advisory: a failure only means the final fsync does the work

    return start


start_writeback = _sync_file_range() or (lambda fd, offset, nbytes: None)


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records of a rank file once it is closed."""

    path: Path
    size: int
    xxh3: str
    tensor_hashes: dict[str, str]


def rank_bytes(layouts: list[TensorLayout], ranks: list[int]) -> int:
    """Tensor bytes the rank files of ``ranks`` hold together (what a progress bar counts)."""
    return sum(math.prod(t.local_shapes[r]) * itemsize(t.dtype) for t in layouts for r in ranks)


def default_threads(ranks: int) -> int:
    """One writer thread per CPU this process may use, at most one per rank file."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(ranks, cpus))


def write_rank_files(
    layouts: list[TensorLayout],
    readers: dict[str, TensorReader],
    paths: dict[int, Path],
    *,
    metadata: dict[str, str],
    buffer_bytes: int | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    rank_metadata: bool = True,
    threads: int | None = None,
) -> dict[int, WrittenFile]:
    """Write ``paths[r]`` for the ranks given: header, then each layout's rank-r bytes in order.

    Each file is written as ``NAME.tmp``, fsynced and renamed, so a file under its final name is always whole.
    ``readers`` gives each tensor's global bytes; only the rows these ranks hold are read. ``on_bytes`` is called
    with the number of bytes written (from the writer threads; calls are serialised). ``rank_metadata`` records
    each file's rank in its header metadata. ``threads`` (default: one per CPU) split the ranks between them.
    """
    sinks: dict[int, RankSink] = {}
    try:
        for rank, path in paths.items():
            sinks[rank] = RankSink(path, os.open(_temporary(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            header = [(t.name, t.dtype, t.local_shapes[rank]) for t in layouts]
            file_metadata = {**metadata, "rank": str(rank)} if rank_metadata else metadata
            sinks[rank].write(encode_header(header, file_metadata, align=64))
        lock = threading.Lock()

        def progress(nbytes: int) -> None:
            with lock:
                on_bytes(nbytes)

        ranks = list(sinks)
        count = threads or default_threads(len(ranks))
        groups = [ranks[i * len(ranks) // count : (i + 1) * len(ranks) // count] for i in range(count)]
        stop = threading.Event()
        size = buffer_bytes or DEFAULT_BUFFER_BYTES
        streamers = [_Streamer({r: sinks[r] for r in group}, size, progress, stop) for group in groups if group]
        _run_together([functools.partial(s.copy_all, layouts, readers) for s in streamers], stop)
        written = {}
        for rank, sink in sinks.items():
            os.fsync(sink.fd)
            os.close(sink.fd)
            sink.fd = -1
            os.replace(_temporary(sink.path), sink.path)
            written[rank] = WrittenFile(sink.path, sink.size, sink.file_hash.hexdigest(), sink.tensor_hashes)
        return written
    finally:
        for sink in sinks.values():
            if sink.fd >= 0:
                os.close(sink.fd)
            _temporary(sink.path).unlink(missing_ok=True)


def _run_together(tasks: list[Callable[[], None]], stop: threading.Event) -> None:
    """Run ``tasks`` on threads of their own (the first on this one); the first error sets ``stop``, which the
    others check at every tensor, and is raised here once all have stopped."""
    errors: list[BaseException] = []

    def run(task: Callable[[], None]) -> None:
        try:
            task()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(task,), name="reshard-writer", daemon=True) for task in tasks[1:]]
    for thread in threads:
        thread.start()
    if tasks:
        run(tasks[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class _Streamer:
    """Copies every tensor's bytes for a group of ranks: views of the mapped source written as they are, rowwise
    columns gathered through a fixed buffer, other sources read into a fixed buffer."""

    def __init__(
        self, sinks: dict[int, RankSink], buffer_bytes: int, on_bytes: Callable[[int], None], stop: threading.Event
    ) -> None:
        self.sinks, self.on_bytes, self.stop = sinks, on_bytes, stop
        self.size = buffer_bytes
        self.buffer = bytearray(buffer_bytes)  # bytes read from a source that cannot lend a view
        self.gather = bytearray(buffer_bytes)  # one rank's columns of a block, gathered

    def copy_all(self, layouts: list[TensorLayout], readers: dict[str, TensorReader]) -> None:
        for layout in layouts:
            if self.stop.is_set():
                return
            self.copy(readers[layout.name], layout)

    def copy(self, reader: TensorReader, layout: TensorLayout) -> None:
        """View the tensor as ``[outer, length, row]`` around its placement dim and cut each rank's ranges."""
        for sink in self.sinks.values():
            sink.begin_tensor()
        g = Geometry.of(layout)
        block = g.length * g.row
        if block and g.outer:
            if block <= self.size and g.outer > 1:
                self._whole_blocks(reader, layout, g)
            else:
                self._row_runs(reader, layout, g)
        for sink in self.sinks.values():
            sink.end_tensor(layout.name)

    @contextlib.contextmanager
    def _source(
        self, reader: TensorReader, first: int, count: int, lo: int, hi: int, nbytes: int
    ) -> Iterator[memoryview]:
        """The global bytes of rows ``[lo, hi)`` of outer indices ``[first, first + count)``: lent by the reader
        as a view where it can, else read into this streamer's buffer."""
        mapped = reader.mapped(first, count, lo, hi)
        if mapped is not None:
            with mapped as view:
                yield view
            return
        buffer = self.buffer if nbytes <= self.size else bytearray(nbytes)
        with memoryview(buffer)[:nbytes] as view:
            reader.read(first, count, lo, hi, view)
            yield view

    def _row_runs(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Each rank's rows, run by run inside each outer index: contiguous in the source, nothing is gathered."""
        rows_per_read = max(1, self.size // g.row)
        for index in range(g.outer):
            for rank, sink in self.sinks.items():
                for start, stop in layout.ranges[rank]:
                    for first in range(start, stop, rows_per_read):
                        last = min(first + rows_per_read, stop)
                        nbytes = (last - first) * g.row
                        with self._source(reader, index, 1, first, last, nbytes) as view:
                            sink.write(view)
                        self.on_bytes(nbytes)

    def _whole_blocks(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Several whole outer indices at once, each rank's ranges gathered from them (a rowwise weight's columns)."""
        block = g.length * g.row
        per_read = max(1, self.size // block)
        for first in range(0, g.outer, per_read):
            count = min(per_read, g.outer - first)
            with self._source(reader, first, count, 0, g.length, count * block) as view:
                for rank, sink in self.sinks.items():
                    ranges = layout.ranges[rank]
                    if not any(stop > start for start, stop in ranges):
                        continue
                    if ranges == ((0, g.length),):  # the whole tensor (replicated): the block as it is
                        sink.write(view)
                        self.on_bytes(len(view))
                        continue
                    gathered, position = memoryview(self.gather), 0
                    for index in range(count):  # one slice copy per outer index and range
                        base = index * block
                        for start, stop in ranges:
                            size = (stop - start) * g.row
                            gathered[position : position + size] = view[base + start * g.row : base + stop * g.row]
                            position += size
                    sink.write(gathered[:position])
                    self.on_bytes(position)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
