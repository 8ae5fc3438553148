"""Rank files: each written as ``NAME.tmp`` (header first, then its tensors' bytes in layout order, hashed as they
pass), preallocated, fsynced and renamed, so a file under its final name is always whole.

The ranks are split into contiguous groups, one writer thread each (``engine.Streamer``): rank files are
independent, and file writes, ``preadv`` and xxh3 release the GIL, so the groups run in parallel.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from reshard.manifests.errors import OutputError
from reshard.manifests.layout import TensorLayout
from reshard.manifests.safetensors import encode_header
from reshard.write.engine import Streamer
from reshard.write.os_calls import WriteBack, preallocate, write_all
from reshard.write.reader import ChunkReader

DEFAULT_BUFFER_BYTES = 2 * 1024 * 1024  # per view, gather and read: small enough that bytes written are still cached
# when hashed (larger buffers make the hashes read from memory instead of the CPU cache)
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
                    write_all(self.fd, piece, self.path)
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


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records of a rank file once it is closed."""

    path: Path
    size: int
    xxh3: str
    tensor_hashes: dict[str, str]


def rank_bytes(layouts: list[TensorLayout], ranks: list[int]) -> int:
    """Tensor bytes the rank files of ``ranks`` hold together (what a progress bar counts)."""
    return sum(t.local_nbytes(r) for t in layouts for r in ranks)


MAX_THREADS = 4  # each has its own buffers; a few threads already saturate the page cache's copy bandwidth


def default_threads(ranks: int) -> int:
    """One writer thread per CPU this process may use, at most one per rank file and ``MAX_THREADS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(ranks, cpus, MAX_THREADS))


def write_rank_files(
    layouts: list[TensorLayout],
    readers: dict[str, ChunkReader],
    paths: dict[int, Path],
    *,
    metadata: dict[str, str],
    buffer_bytes: int | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    rank_metadata: bool = True,
    threads: int | None = None,
    durable: bool = True,
    rank_offset: int = 0,
) -> dict[int, WrittenFile]:
    """Write ``paths[r]`` for the ranks given: header, then each layout's rank-r bytes in order.

    Each file is written as ``NAME.tmp``, fsynced (unless ``durable=False``) and renamed, so a file under its
    final name is always whole.
    ``readers`` gives each tensor's global bytes; only the rows these ranks hold are read. ``on_bytes`` is called
    with the number of bytes written (from the writer threads; calls are serialised). ``rank_metadata`` records
    each file's rank in its header metadata (``rank_offset + r``: a pipeline stage's files follow the earlier
    stages'). ``threads`` (default: one per CPU, at most ``MAX_THREADS``) split the
    ranks between them. ``durable=False`` skips the write-back and fsync (files left in the page cache, like cp).
    """
    sinks: dict[int, RankSink] = {}
    writeback = WriteBack() if durable else None
    try:
        for rank, path in paths.items():
            fd = os.open(_temporary(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sinks[rank] = RankSink(path, fd, writeback=writeback)
            header = [(t.name, t.dtype, t.local_shapes[rank]) for t in layouts]
            file_metadata = {**metadata, "rank": str(rank_offset + rank)} if rank_metadata else metadata
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
        streamers = [Streamer({r: sinks[r] for r in group}, size, progress, stop) for group in groups if group]
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


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
