"""Tensors made of a safetensors file's bytes: the file mapped once, each tensor a zero-copy view of it."""

from __future__ import annotations

import os
from typing import cast

import torch

from reshard.manifests.safetensors import HeaderEntry, itemsize

_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, _TORCH_NAMES[dtype])


def map_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """Map a whole file read-only as a flat uint8 tensor; slices of it are views of the page cache, not copies.

    ``shared=False`` maps the file private: nothing written to a view can reach the file on disk.
    """
    size = os.path.getsize(path)
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    return torch.empty(0, dtype=torch.uint8).set_(cast(torch.UntypedStorage, storage))  # typed as _StorageBase


def tensor_view(flat: torch.Tensor, entry: HeaderEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, as a zero-copy view of the mapped file ``flat``."""
    dtype = torch_dtype(entry.dtype)
    raw = flat[entry.offset : entry.offset + entry.nbytes]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if entry.offset % itemsize(entry.dtype):
        raw = raw.clone()  # an unaligned tensor cannot be viewed in place; copy just this one
    return raw.view(dtype).view(entry.shape)
