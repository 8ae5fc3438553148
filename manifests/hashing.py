"""xxh3-128 hashing of files and tensors: the checks behind ``reshard verify`` and ``verify=True`` at load."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK_BYTES = 16 * 1024 * 1024


def hash_file(path: str | os.PathLike[str], on_bytes: Callable[[int], None] = lambda n: None) -> tuple[int, str]:
    """Size and xxh3-128 hex digest of a file, hashed straight from its pages (``mapped_windows``)."""
    with open(Path(path), "rb", buffering=0) as handle:
        return hash_open(handle.fileno(), on_bytes)


def hash_open(fd: int, on_bytes: Callable[[int], None] = lambda n: None) -> tuple[int, str]:
    """``hash_file`` of the file open as ``fd``: the bytes hashed are that file's, whatever is renamed over its path."""
    import xxhash

    digest = xxhash.xxh3_128()
    size = 0
    for _, part in open_windows(fd):
        digest.update(part)
        size += len(part)
        on_bytes(len(part))
    return size, digest.hexdigest()


def hash_regions(
    fd: int, regions: list[tuple[str, int, int]], on_bytes: Callable[[int], None] = lambda n: None
) -> tuple[int, str, dict[str, str]]:
    """Size and xxh3-128 of the file open as ``fd``, and of each ``(name, offset, nbytes)`` region of it, from one
    pass over its windows (a rank file's hash and its tensors' hashes from the same read)."""
    import xxhash

    whole = xxhash.xxh3_128()
    ordered = sorted(regions, key=lambda region: region[1])
    parts = {name: xxhash.xxh3_128() for name, _, _ in ordered}
    size = 0
    for start, part in open_windows(fd):
        stop = start + len(part)
        whole.update(part)
        for name, offset, nbytes in ordered:  # each region gets its bytes in order, window after window
            lo, hi = max(start, offset), min(stop, offset + nbytes)
            if lo < hi:
                parts[name].update(part[lo - start : hi - start])
        size = stop
        on_bytes(len(part))
    return size, whole.hexdigest(), {name: digest.hexdigest() for name, digest in parts.items()}


def mapped_windows(path: str | os.PathLike[str], window: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """``(offset, view)`` of each window of a file in order, through one read-only mapping: no copy into this
    process, and each window is dropped from it once the caller moves on, so resident memory stays one window."""
    with open(Path(path), "rb", buffering=0) as handle:
        yield from open_windows(handle.fileno(), window)


def open_windows(fd: int, window: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """``mapped_windows`` of the file open as ``fd``."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapping, memoryview(mapping) as view:
        for start in range(0, size, window):
            stop = min(start + window, size)
            with view[start:stop] as part:
                yield start, part
            mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def hash_bytes(data: memoryview | bytes) -> str:
    """xxh3-128 hex digest of a buffer."""
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()
