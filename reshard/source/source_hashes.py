"""Whole source files hashed on a background thread while the rank files are written (for the manifest's source
record, and so that nothing unchecked is re-hashed into a new artifact)."""

from __future__ import annotations

import threading
from pathlib import Path

from reshard.manifests.hashing import hash_file


class SourceHashes:
    """xxh3-128 of whole source files, computed on a background thread while the rank files are written.

    The thread reads each file once, in order, from a read-only mapping (no copy out of the page cache), so on
    a cold cache it also reads the checkpoint ahead of the writers. ``digest`` waits for a file's hash, or
    hashes the file itself if the thread was never started (a worker that only writes some of the ranks).
    """

    def __init__(self, files: list[Path]) -> None:
        self._files = list(files)
        self._digests: dict[Path, tuple[int, str]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reshard-source-hashes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for path in self._files:
                self._digests[path] = hash_file(path)
        except BaseException as exc:  # raised again by digest(), in the caller's thread
            self._error = exc

    def digest(self, path: Path) -> tuple[int, str]:
        """Size and xxh3-128 of ``path``."""
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        if path not in self._digests:
            self._digests[path] = hash_file(path)
        return self._digests[path]
