"""The operating-system calls the writer relies on: whole writes, preallocation, early write-back, scatter reads.

Linux's ``fallocate`` and ``sync_file_range`` are called through the C library already loaded in this process;
elsewhere they are skipped (the files are then simply written, and flushed by the final fsync).
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reshard.manifests.errors import OutputError

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def write_all(fd: int, data: memoryview, path: Path) -> None:
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

    Without it, ext4 does its delayed block allocation page by page while the writers run, which costs several
    times the CPU of the copy itself. A full disk is also reported before anything is written. Where the file
    system cannot preallocate, the file is simply written as is.
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

    ``sync_file_range`` can block for tens of milliseconds per call (the file system allocates blocks as it submits
    them); called from a writer, that would stall the copy.
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
