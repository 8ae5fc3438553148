"""Moving bytes safely, for both halves: atomic writes, streams verified against the manifest, OS errors as ours.

Publishing, fetching and staging all need the same three things; one copy each keeps their guarantees the same:
a file under its final name is always whole (``atomic_file``), bytes are hashed as they pass and compared with the
manifest's size and xxh3 before anything is committed (``VerifiedStream``), and an ``OSError`` from a client or the
kernel becomes one-line ``StorageError``/``OutputError`` naming the location (``os_errors``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from reshard.manifests.errors import IntegrityError, ReshardError
from reshard.manifests.manifest import FileEntry


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(target: Path) -> Path:
    """The hidden name beside ``target`` a file is written under before it is renamed (one per process)."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Yield a file to fill; on success it is flushed, fsynced (``durable``) and renamed to ``target`` (and the
    folder fsynced), on an exception removed, so ``target`` is either untouched or whole."""
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write a small file atomically (see ``atomic_file``)."""
    with atomic_file(target, durable=durable) as handle:
        handle.write(data)


class VerifiedStream:
    """Hashes bytes as they pass and checks them against a manifest ``FileEntry``: what is sent or stored is then
    exactly what was hashed, in the same pass. ``update`` refuses more bytes than the entry records at once."""

    def __init__(self, entry: FileEntry, uri: str, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        import xxhash  # here, so that importing the runtime does not load it

        self.entry, self.uri, self.on_bytes = entry, uri, on_bytes
        self.size = 0
        self._digest = xxhash.xxh3_128()

    def update(self, chunk: bytes | memoryview) -> None:
        if self.size + len(chunk) > self.entry.size:
            raise IntegrityError(f"{self.uri}: longer than the {self.entry.size} bytes the manifest records")
        self._digest.update(chunk)
        self.size += len(chunk)
        self.on_bytes(len(chunk))

    def check(self) -> None:
        """Raise ``IntegrityError`` unless the bytes seen are the entry's size and xxh3."""
        if self.size != self.entry.size:
            raise IntegrityError(
                f"{self.uri}: truncated, {self.size} of the {self.entry.size} bytes the manifest records"
            )
        digest = self._digest.hexdigest()
        if digest != self.entry.xxh3:
            raise IntegrityError(
                f"{self.uri}: xxh3 {digest} does not match the manifest's {self.entry.xxh3} (corrupt or changed)"
            )


def verified_copy(
    chunks: Iterable[bytes], sink: Callable[[bytes], Any], entry: FileEntry, uri: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:  # fmt: skip
    """Pass ``chunks`` to ``sink`` while hashing them; ``IntegrityError`` (after the last chunk, or as soon as there
    are too many bytes) if they are not exactly the entry's bytes. The caller commits only if this returns."""
    stream = VerifiedStream(entry, uri, on_bytes)
    for chunk in chunks:
        stream.update(chunk)
        sink(chunk)
    stream.check()


def file_chunks(path: str | os.PathLike[str], chunk_bytes: int = 16 * 1024 * 1024) -> Iterator[bytes]:
    """A file's bytes in order, ``chunk_bytes`` at a time (read once: what is yielded is what is hashed)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            yield chunk


@contextlib.contextmanager
def os_errors(
    uri: str | os.PathLike[str], kind: type[ReshardError], action: str = "cannot access", missing: bool = True
) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into ``kind`` (``StorageError``, ``OutputError``: both ``OSError``s)
    naming ``uri``: a missing object (``missing``) as "no such object", anything else as ``action`` with the
    reason. reshard's own errors pass through unchanged."""
    try:
        yield
    except ReshardError:
        raise
    except FileNotFoundError as exc:
        if not missing:
            raise kind(f"{uri}: {action} ({exc.strerror or exc})") from exc
        raise kind(f"{uri}: no such object") from exc
    except OSError as exc:  # s3fs maps client errors (403, 404, network) and the kernel its failures onto OSError
        raise kind(f"{uri}: {action} ({exc.strerror or exc})") from exc
