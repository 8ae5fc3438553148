"""Stream tensor bytes into per-rank safetensors files, hashing as they pass.

Every rank file's header is computed from the layout before any byte is read and written first; then each tensor
is taken from its source in blocks of at most ``buffer_bytes`` and each rank's ranges are appended to its file.
Source bytes are written straight from the mapped checkpoint (no copy into this process) and hashed while they
are still in the CPU cache; a rowwise tensor's columns are scattered by the kernel (one ``preadv`` per block, its
buffer list planned once per shape) into a fixed gather buffer. The ranks are split into contiguous groups, one
thread each: rank files are independent, and file writes, ``preadv`` and xxh3 release the GIL, so the groups run
in parallel. Each rank file is preallocated at its final size before the first byte (``preallocate``), and a
further thread asks the kernel to start writing finished ranges to disk, so the final fsync finds little left to do.
Memory stays bounded by the buffers, whatever the model's size. Knows nothing of plans or styles: it executes the
``TensorLayout`` values it is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from reshard.errors import OutputError
from reshard.layout import TensorLayout
from reshard.loaders.safetensors_file import encode_header, itemsize
from reshard.readers import ColumnSpan, Geometry, TensorReader

DEFAULT_BUFFER_BYTES = 2 * 1024 * 1024  # per view, gather and read: small enough that bytes written are still cached
# when hashed (32 MiB buffers measured 10-15% slower end to end: the hashes then read from memory, not cache)
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
    writeback: WriteBack | None = None
    flushed: int = 0  # bytes whose write-back to disk has been asked for
    tensor_hash: xxhash.xxh3_128 | None = None  # of the tensor being written, if any

    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` and hash it, piece by piece so that the hashes read what the write just read."""
        with memoryview(data) as view:
            for start in range(0, len(view), PIECE_BYTES):
                with view[start : start + PIECE_BYTES] as piece:
                    _write_all(self.fd, piece, self.path)
                    self.file_hash.update(piece)
                    if self.tensor_hash is not None:
                        self.tensor_hash.update(piece)
            self.size += len(view)
        if self.writeback is not None and self.size - self.flushed >= WRITEBACK_BYTES:
            self.writeback.request(self.fd, self.flushed, self.size - self.flushed)
            self.flushed = self.size

    def begin_tensor(self) -> None:
        self.tensor_hash = xxhash.xxh3_128()

    def end_tensor(self, name: str) -> None:
        assert self.tensor_hash is not None
        self.tensor_hashes[name] = self.tensor_hash.hexdigest()
        self.tensor_hash = None


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as exc:  # a full disk, a quota, an I/O error: name the file
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """A function of the C library already loaded in this process (Linux only), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_fallocate = _libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve a rank file's blocks before writing it (Linux ``fallocate``).

    Measured on ext4 here: writing 3.4 GB into preallocated files takes 0.5 s of CPU, steadily; without, the
    per-page delayed-allocation work took 1.9 to 7.6 s from one run to the next. A full disk is also reported
    before anything is written. Where the file system cannot preallocate, the file is simply written as is.
    """
    if _fallocate is None or size == 0:
        return
    if _fallocate(fd, 0, 0, size) != 0:
        error = ctypes.get_errno()
        if error in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{path}: not enough disk space for this rank file ({size / 1e9:.2f} GB)")
        # EOPNOTSUPP, ENOSYS, EINVAL...: a file system without preallocation; write without it


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to disk, so that the disk works
    while later tensors are copied and the final fsync has little left to do. ``None`` elsewhere."""
    function = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if function is None:
        return None
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, write)  # advisory: a failure only leaves the work to the final fsync

    return start


class WriteBack:
    """Starts the disk writes of finished file ranges on a thread of its own while the writers go on.

    ``sync_file_range`` blocks for tens of milliseconds per call here (ext4 allocates the blocks as it submits
    them); called from a writer, that stalled the copy for over a second of a 2.5 s conversion.
    """

    start_range = staticmethod(_sync_file_range() or (lambda fd, offset, nbytes: None))

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="reshard-writeback", daemon=True)
        self._thread.start()

    def request(self, fd: int, offset: int, nbytes: int) -> None:
        self._requests.put((fd, offset, nbytes))

    def close(self) -> None:
        """Wait for the requests made so far (before their descriptors are closed)."""
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._requests.get()) is not None:
            self.start_range(*item)


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


MAX_THREADS = 4  # each has its own buffers; a few threads already saturate the page cache's copy bandwidth


def default_threads(ranks: int) -> int:
    """One writer thread per CPU this process may use, at most one per rank file and ``MAX_THREADS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(ranks, cpus, MAX_THREADS))


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
    durable: bool = True,
) -> dict[int, WrittenFile]:
    """Write ``paths[r]`` for the ranks given: header, then each layout's rank-r bytes in order.

    Each file is written as ``NAME.tmp``, fsynced (unless ``durable=False``) and renamed, so a file under its
    final name is always whole.
    ``readers`` gives each tensor's global bytes; only the rows these ranks hold are read. ``on_bytes`` is called
    with the number of bytes written (from the writer threads; calls are serialised). ``rank_metadata`` records
    each file's rank in its header metadata. ``threads`` (default: one per CPU, at most ``MAX_THREADS``) split the
    ranks between them. ``durable=False`` skips the write-back and fsync (files left in the page cache, like cp).
    """
    sinks: dict[int, RankSink] = {}
    writeback = WriteBack() if durable else None
    try:
        for rank, path in paths.items():
            fd = os.open(_temporary(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sinks[rank] = RankSink(path, fd, writeback=writeback)
            header = [(t.name, t.dtype, t.local_shapes[rank]) for t in layouts]
            file_metadata = {**metadata, "rank": str(rank)} if rank_metadata else metadata
            encoded = encode_header(header, file_metadata, align=64)
            preallocate(fd, len(encoded) + rank_bytes(layouts, [rank]), path)
            sinks[rank].write(encoded)
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
        if writeback is not None:
            writeback.close()
        written = {}
        for rank, sink in sinks.items():
            preallocated = os.fstat(sink.fd).st_size
            if sink.size != preallocated:  # the header and layouts disagree: a bug, never a file
                raise RuntimeError(f"{sink.path}: wrote {sink.size} bytes, expected {preallocated}")
            if durable:
                try:
                    os.fsync(sink.fd)
                except OSError as exc:
                    raise OutputError(f"{sink.path}: cannot be flushed to disk ({exc.strerror or exc})") from exc
            os.close(sink.fd)
            sink.fd = -1
            os.replace(_temporary(sink.path), sink.path)
            written[rank] = WrittenFile(sink.path, sink.size, sink.file_hash.hexdigest(), sink.tensor_hashes)
        return written
    finally:
        if writeback is not None:
            writeback.close()
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


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _ScatterPlan:
    """How ``preadv`` calls over whole outer blocks put each rank's columns in its own region of the gather buffer:
    ``reads[k]`` are source k's ``(offset in its span, buffers)`` calls; ``regions`` each rank's ``(start, stop)``.
    Columns of ranks another thread writes land in a scratch buffer, overwritten at will."""

    reads: list[list[tuple[int, list[memoryview], int]]]
    regions: dict[int, tuple[int, int]]


class _Streamer:
    """Copies every tensor's bytes for a group of ranks: views of the mapped source written as they are, rowwise
    columns scattered by the kernel into a fixed gather buffer, other sources read into a fixed buffer."""

    def __init__(
        self, sinks: dict[int, RankSink], buffer_bytes: int, on_bytes: Callable[[int], None], stop: threading.Event
    ) -> None:
        self.sinks, self.on_bytes, self.stop = sinks, on_bytes, stop
        self.size = buffer_bytes
        self._buffers: dict[str, bytearray] = {}  # allocated when first needed
        self._plans: dict[tuple[object, ...], _ScatterPlan] = {}  # the same shapes recur in every layer

    def _buffer(self, purpose: str, size: int | None = None) -> bytearray:
        """``"read"``: bytes of a source that lends no span; ``"gather"``: the ranks' columns of a block;
        ``"scratch"``: other ranks' columns. Grown, never shrunk (plans keep views of the old ones)."""
        size = size or self.size
        if len(self._buffers.get(purpose, b"")) < size:
            self._buffers[purpose] = bytearray(size)
        return self._buffers[purpose]

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
        """The global bytes of rows ``[lo, hi)`` of outer indices ``[first, first + count)``: a view of the mapped
        source where the reader has them contiguous, else read into this streamer's buffer."""
        span = reader.span(first, count, lo, hi)
        if span is not None:
            with span.mapped() as view:
                yield view
            return
        buffer = self._buffer("read") if nbytes <= self.size else bytearray(nbytes)
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
                        cuts = [first, *reader.breaks(index, first, last), last]  # a span on each side of a break
                        for lo, hi in itertools.pairwise(cuts):
                            with self._source(reader, index, 1, lo, hi, (hi - lo) * g.row) as view:
                                sink.write(view)
                        self.on_bytes((last - first) * g.row)

    def _whole_blocks(self, reader: TensorReader, layout: TensorLayout, g: Geometry) -> None:
        """Several whole outer indices at once, each rank's ranges taken from them (a rowwise weight's columns)."""
        block = g.length * g.row
        per_read = max(1, self.size // block)
        held = {rank: layout.ranges[rank] for rank in self.sinks if any(b > a for a, b in layout.ranges[rank])}
        contiguous = all(len(ranges) == 1 for ranges in held.values())
        whole = all(ranges == ((0, g.length),) for ranges in held.values())
        for first in range(0, g.outer, per_read):
            count = min(per_read, g.outer - first)
            spans = None if whole or (count == 1 and contiguous) else reader.column_spans(first, count)
            if spans:
                self._scatter(spans, held, g, count)  # the kernel gathers: no per-row Python work, GIL released
                continue
            with self._source(reader, first, count, 0, g.length, count * block) as view:
                for rank, ranges in held.items():
                    if whole:  # the whole tensor (replicated): the block as it is
                        self._write(rank, view)
                    elif count == 1 and contiguous:  # one run of the block: no gather needed
                        ((start, stop),) = ranges
                        self._write(rank, view[start * g.row : stop * g.row])
                    else:
                        self._write(rank, self._gather(view, ranges, g, count))

    def _write(self, rank: int, data: memoryview) -> None:
        self.sinks[rank].write(data)
        self.on_bytes(len(data))

    def _gather(self, view: memoryview, ranges: tuple[tuple[int, int], ...], g: Geometry, count: int) -> memoryview:
        """One rank's ranges of ``count`` whole blocks, copied one after another into the gather buffer."""
        gathered, position, block = memoryview(self._buffer("gather")), 0, g.length * g.row
        for index in range(count):
            base = index * block
            for start, stop in ranges:
                size = (stop - start) * g.row
                gathered[position : position + size] = view[base + start * g.row : base + stop * g.row]
                position += size
        return gathered[:position]

    def _scatter(self, spans: list[ColumnSpan], held: dict[int, Ranges], g: Geometry, count: int) -> None:
        """Read ``count`` whole blocks with ``preadv`` straight into each rank's region, then write the regions."""
        key = (g, count, tuple(held.items()), tuple(columns for _, columns in spans))
        if key not in self._plans:
            self._plans[key] = self._scatter_plan(held, g, count, [columns for _, columns in spans])
        plan = self._plans[key]
        for (span, _), reads in zip(spans, plan.reads, strict=True):
            span.scatter(reads)
        gathered = memoryview(self._buffer("gather"))
        for rank, (start, stop) in plan.regions.items():
            self._write(rank, gathered[start:stop])

    def _scatter_plan(self, held: dict[int, Ranges], g: Geometry, count: int, sources: list[Ranges]) -> _ScatterPlan:
        """Lay each rank's columns of ``count`` blocks row after row in its region. Each source holds, row after
        row, the columns ``sources[k]`` (a checkpoint: all of them; an old rank file: that rank's); its bytes that
        no rank here holds (merged across rows) go to the scratch buffer."""
        regions, widths, position = {}, {}, 0
        for rank, ranges in held.items():
            widths[rank] = sum(stop - start for start, stop in ranges) * g.row
            regions[rank] = (position, position + count * widths[rank])
            position += count * widths[rank]

        def local(rank: int, column: int) -> int:
            """Where global ``column`` lies in one row of ``rank``'s piece, in bytes."""
            before = 0
            for start, stop in held[rank]:
                if start <= column < stop:
                    return before + (column - start) * g.row
                before += (stop - start) * g.row
            raise AssertionError(column)

        plans = []
        for columns in sources:
            items: list[tuple[int, int] | int] = []  # a (start, stop) of the gather buffer, or bytes to skip
            skip = 0
            for index in range(count):
                for a, b in columns:
                    cursor = a
                    overlaps = sorted(
                        (max(a, start), min(b, stop), rank)
                        for rank, ranges in held.items()
                        for start, stop in ranges
                        if max(a, start) < min(b, stop)
                    )
                    for lo, hi, rank in overlaps:
                        skip += (lo - cursor) * g.row
                        if skip:
                            items.append(skip)
                            skip = 0
                        at = regions[rank][0] + index * widths[rank] + local(rank, lo)
                        items.append((at, at + (hi - lo) * g.row))
                        cursor = hi
                    skip += (b - cursor) * g.row
            if skip:
                items.append(skip)
            plans.append(self._preadv_calls(items))
        return _ScatterPlan(plans, regions)

    def _preadv_calls(self, items: list[tuple[int, int] | int]) -> list[tuple[int, list[memoryview], int]]:
        """``(offset, buffers, bytes)`` calls of at most ``IOV_MAX`` buffers for items read one after another."""
        gathered = memoryview(self._buffer("gather"))
        scratch = memoryview(self._buffer("scratch", max([i for i in items if isinstance(i, int)], default=1)))
        buffers = [scratch[:i] if isinstance(i, int) else gathered[i[0] : i[1]] for i in items]
        calls, offset = [], 0
        for index in range(0, len(buffers), IOV_MAX):
            chunk = buffers[index : index + IOV_MAX]
            nbytes = sum(len(b) for b in chunk)
            calls.append((offset, chunk, nbytes))
            offset += nbytes
        return calls


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
