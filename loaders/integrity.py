"""xxh3-128 hashing of files and tensors: the checks behind ``reshard verify`` and ``verify=True`` at load."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 16 * 1024 * 1024


def hash_file(path: str | os.PathLike[str], on_bytes: Callable[[int], None] = lambda n: None) -> tuple[int, str]:
    """Size and xxh3-128 hex digest of a file, read in fixed-size chunks (memory stays flat)."""
    import xxhash

    digest = xxhash.xxh3_128()
    size = 0
    buffer = bytearray(max(1, min(CHUNK_BYTES, os.path.getsize(path))))  # a small file gets a small buffer
    view = memoryview(buffer)
    with open(Path(path), "rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            digest.update(view[:got])
            size += got
            on_bytes(got)
    return size, digest.hexdigest()


def hash_bytes(data: memoryview | bytes) -> str:
    """xxh3-128 hex digest of a buffer."""
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()
