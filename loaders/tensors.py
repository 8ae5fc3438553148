"""Tensors made of a safetensors file's bytes: the file mapped once, each tensor a zero-copy view of it."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import warnings

import torch

from reshard.manifests.dtypes import DTYPES
from reshard.manifests.safetensors import HeaderEntry


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, DTYPES[dtype].torch)


def torch_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` (safetensors' count of elements) in elements of the torch dtype: F4's ``float4_e2m1fn_x2`` holds a
    pair, so its last dim is halved, as ``safe_open`` gives it."""
    pairs = DTYPES[dtype].per_torch_element
    return (*shape[:-1], shape[-1] // pairs) if pairs > 1 and shape else shape


def map_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """Map a whole file read-only as a flat uint8 tensor (``map_open`` of the file opened once)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return map_open(fd)
    finally:
        os.close(fd)


def map_open(fd: int) -> torch.Tensor:
    """Map the whole file open as ``fd`` as a flat uint8 tensor; slices of it are views of the page cache, not copies.

    The mapping is of the descriptor's file, whatever is renamed over its path meanwhile, so a header read from
    the same descriptor describes exactly these bytes; the descriptor may be closed once this returns (the mapping
    keeps the file). The mapping is private (copy on write): nothing written to a view can reach the file on disk.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    with warnings.catch_warnings():  # the copy-on-write mapping is writable; torch warns for read-only buffers only
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference: the mapping lives as long as views


def tensor_view(flat: torch.Tensor, entry: HeaderEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, as a zero-copy view of the mapped file ``flat``."""
    dtype, shape = torch_dtype(entry.dtype), torch_shape(entry.dtype, entry.shape)
    raw = flat[entry.offset : entry.offset + entry.nbytes]
    if entry.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if entry.offset % dtype.itemsize:
        raw = raw.clone()  # an unaligned tensor cannot be viewed in place; copy just this one
    return raw.view(dtype).view(shape)


_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault every page in and map it, as reading each would


class Residency:
    """Make a mapping's pages resident in a background thread: read from disk if cold, and mapped either way.

    A mapping's pages otherwise come in one fault at a time on first use, so the first forward would pay for
    reading the weights. ``MADV_POPULATE_READ`` does all of it in one call that releases the GIL (ctypes), so it runs
    while the caller builds the model; ``wait`` joins it before the weights are handed out. Best effort: where the
    call is unsupported the kernel is asked to read ahead (``MADV_WILLNEED``), and a failure leaves the pages to come
    in on first use. The thread holds ``flat`` so the mapping outlives the call.
    """

    def __init__(self, flat: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        self._flat = flat
        stop = flat.numel() if stop is None else stop
        self.error: int | None = None  # errno of a failed call, for tests and the curious
        self._thread: threading.Thread | None = None
        if stop > start and sys.platform == "linux" and flat.device.type == "cpu":
            address = flat.data_ptr() + start
            self._thread = threading.Thread(
                target=self._populate, args=(address, stop - start), name="reshard-populate", daemon=True
            )
            self._thread.start()

    def _populate(self, address: int, length: int) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        aligned = address - address % page
        length += address - aligned
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(aligned, length, _MADV_POPULATE_READ) != 0:
            self.error = ctypes.get_errno()
            libc.madvise(aligned, length, _MADV_WILLNEED)

    def wait(self) -> None:
        """Return once the pages are resident (or the attempt is over); the mapping stays the caller's."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._flat = torch.empty(0, dtype=torch.uint8)
