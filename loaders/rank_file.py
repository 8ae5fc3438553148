"""Open this rank's file of an artifact: check it against the manifest, map it, and view its tensors in place.

Only the one file the manifest names for the rank is touched; the other ranks' files may be absent. On CPU every
tensor is a zero-copy view of the read-only private mapping (pages come in on first use); on an accelerator the
mapped bytes are streamed once into a single device buffer and the tensors are views of that.

A CPU view is as aligned as its offset in the file. CPU kernels can take another code path (and round the last bit
differently) for data that is not 64-byte aligned, as a fresh allocation is; a writer that starts the data section
on a 64-byte boundary (``encode_header(..., align=64)``) makes mapped and copied weights compute the same bits.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from reshard.loaders.tensors import map_file, tensor_view
from reshard.loaders.transfer import copy_to_device
from reshard.manifests import Manifest, resolve_in
from reshard.manifests.errors import IntegrityError
from reshard.manifests.hashing import hash_bytes
from reshard.manifests.safetensors import SafetensorsHeader, read_header


def map_rank_file(
    root: str | os.PathLike[str], manifest: Manifest, rank: int, *, device: torch.device, verify: bool
) -> dict[str, torch.Tensor]:
    """This rank's local tensors, by name, on ``device``; raise ``IntegrityError`` naming the file if it lies.

    Checks before mapping: the file exists, has the size the manifest records, and its header lists exactly the
    manifest's tensors with the local shapes and dtypes recorded for ``rank``. With ``verify`` every tensor's
    xxh3-128 is compared with the manifest's as it is mapped.
    """
    entry = manifest.rank_file(rank)
    path = resolve_in(root, entry.path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing; the manifest lists it as the file of rank {rank}")
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(
            f"{path}: {size} bytes, but the manifest records {entry.size} (truncated, or from another conversion)"
        )
    header = read_header(path)
    _check_header(header, manifest, rank)
    flat = map_file(path)
    if verify:
        _verify(flat, header, manifest, rank)
    if device.type == "cpu":
        return {name: tensor_view(flat, item) for name, item in header.tensors.items()}
    buffer = copy_to_device(flat, header.data_start, header.file_size, device)
    return {
        name: tensor_view(buffer, dataclasses.replace(item, offset=item.offset - header.data_start))
        for name, item in header.tensors.items()
    }


def _check_header(header: SafetensorsHeader, manifest: Manifest, rank: int) -> None:
    """The file must hold exactly the manifest's tensors, each with the local shape and dtype recorded for ``rank``."""
    expected = {tensor.name: tensor for tensor in manifest.tensors}
    if missing := sorted(expected.keys() - header.tensors.keys()):
        count = f" ({len(missing)} tensors missing)" if len(missing) > 1 else ""
        raise IntegrityError(f"{header.path}: lacks tensor {missing[0]!r} that the manifest lists{count}")
    if extra := sorted(header.tensors.keys() - expected.keys()):
        raise IntegrityError(f"{header.path}: holds tensor {extra[0]!r} that the manifest does not list")
    for name, item in header.tensors.items():
        tensor = expected[name]
        shape = tensor.slice_for(rank).shape
        if item.dtype != tensor.dtype or item.shape != shape:
            raise IntegrityError(
                f"{header.path}: tensor {name!r} is {item.dtype}{list(item.shape)}, but the manifest records "
                f"{tensor.dtype}{list(shape)} for rank {rank}"
            )


def _verify(flat: torch.Tensor, header: SafetensorsHeader, manifest: Manifest, rank: int) -> None:
    """Compare each tensor's bytes in the mapping with the xxh3-128 the manifest records for this rank's slice."""
    for tensor in manifest.tensors:
        item = header.tensors[tensor.name]
        digest = hash_bytes(flat[item.offset : item.offset + item.nbytes].numpy().data)
        expected = tensor.slice_for(rank).xxh3
        if digest != expected:
            raise IntegrityError(
                f"{header.path}: tensor {tensor.name!r} has xxh3 {digest}, but the manifest records {expected} "
                "(the file is corrupt or was modified)"
            )
