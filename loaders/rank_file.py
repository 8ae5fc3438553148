"""Open this rank's file of an artifact: check it against the manifest, map it, and view its tensors in place.

Only the one file the manifest names for the rank is touched; the other ranks' files may be absent. On CPU every
tensor is a zero-copy view of the read-only private mapping, its pages coming in on first use; ``open_rank_file``
with ``populate`` makes them resident in the background (``Residency``) while the caller builds the model. On an
accelerator the mapped bytes are streamed once into a single device buffer, read ahead of the copy, and the tensors
are views of that.

A CPU view is as aligned as its offset in the file. CPU kernels can take another code path (and round the last bit
differently) for data that is not 64-byte aligned, as a fresh allocation is; a writer that starts the data section
on a 64-byte boundary (``encode_header(..., align=64)``) makes mapped and copied weights compute the same bits.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import torch

from reshard.loaders.tensors import Residency, map_open, tensor_view
from reshard.loaders.transfer import copy_to_device
from reshard.manifests import Manifest, resolve_in
from reshard.manifests.errors import IntegrityError
from reshard.manifests.hashing import hash_bytes
from reshard.manifests.rank_header import rank_header_problems
from reshard.manifests.safetensors import SafetensorsHeader, read_header_at


@dataclasses.dataclass(frozen=True)
class RankFile:
    """A rank's local tensors and the making-resident of their mapping, which the caller waits for once built."""

    tensors: dict[str, torch.Tensor]
    resident: Residency | None = None

    def wait_resident(self) -> None:
        """Return once the weights' pages are resident (at once if nothing was populated)."""
        if self.resident is not None:
            self.resident.wait()


def open_rank_file(
    root: str | os.PathLike[str],
    manifest: Manifest,
    rank: int,
    *,
    device: torch.device,
    verify: bool,
    populate: bool = False,
) -> RankFile:
    """``map_rank_file``; with ``populate``, the CPU mapping's pages are made resident in the background once the file
    is checked: the caller builds the model meanwhile and calls ``RankFile.wait_resident()`` before handing the weights
    out."""
    return _open(root, manifest, rank, device=device, verify=verify, populate=populate)


def map_rank_file(
    root: str | os.PathLike[str], manifest: Manifest, rank: int, *, device: torch.device, verify: bool
) -> dict[str, torch.Tensor]:
    """This rank's local tensors, by name, on ``device``; raise ``IntegrityError`` naming the file if it lies.

    Checks before mapping, always: the file exists, has the size the manifest records, carries the manifest's
    artifact id, and its header lists exactly the manifest's tensors with the local shapes and dtypes recorded for
    ``rank``, contiguous in the manifest's order (so no view can overlap another or reach past the file). With
    ``verify`` every tensor's xxh3-128 is compared with the manifest's as it is mapped.
    """
    return _open(root, manifest, rank, device=device, verify=verify, populate=False).tensors


def _open(
    root: str | os.PathLike[str], manifest: Manifest, rank: int, *, device: torch.device, verify: bool, populate: bool
) -> RankFile:
    entry = manifest.rank_file(rank)
    path = resolve_in(root, entry.path)
    try:
        return _open_checked(path, entry.size, manifest, rank, device=device, verify=verify, populate=populate)
    except OSError as exc:  # gone between the manifest and here: the folder was replaced or removed meanwhile
        raise IntegrityError(
            f"{path}: cannot be read ({exc.strerror or exc}); was the artifact replaced while loading? load it again"
        ) from exc


def _open_checked(
    path: Path, recorded_size: int, manifest: Manifest, rank: int, *, device: torch.device, verify: bool, populate: bool
) -> RankFile:
    # One descriptor from the size check to the mapping: a file renamed over ``path`` meanwhile (a sync tool, ``cp``
    # then rename, a cache refresh) is either the one checked and mapped, or not seen at all.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; the manifest lists it as the file of rank {rank}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{path}: not a regular file; the manifest lists it as the file of rank {rank}")
        if info.st_size != recorded_size:
            raise IntegrityError(
                f"{path}: {info.st_size} bytes, but the manifest records {recorded_size} (truncated, or from another "
                "conversion)"
            )
        header = _read_header(fd, path)
        _check_header(header, manifest, rank)
        flat = map_open(fd)
    finally:
        os.close(fd)
    if flat.numel() != header.file_size:  # the descriptor's file changed size between fstat and mmap
        raise IntegrityError(f"{path}: changed while it was opened (truncated or rewritten in place)")
    if verify:
        _verify(flat, header, manifest, rank)
    if device.type == "cpu":
        resident = Residency(flat, header.data_start, header.file_size) if populate else None
        return RankFile({name: tensor_view(flat, item) for name, item in header.tensors.items()}, resident)
    buffer = copy_to_device(flat, header.data_start, header.file_size, device)
    tensors = {
        name: tensor_view(buffer, dataclasses.replace(item, offset=item.offset - header.data_start))
        for name, item in header.tensors.items()
    }
    return RankFile(tensors)


def _check_header(header: SafetensorsHeader, manifest: Manifest, rank: int) -> None:
    """The file must be this manifest's (its artifact id) and hold exactly the manifest's tensors, each with the
    dtype and local shape recorded for ``rank``, back to back at the offsets the manifest's order gives."""
    if problems := rank_header_problems(header, manifest, rank):
        raise IntegrityError(f"{header.path}: {problems[0]}")


def _read_header(fd: int, path: Path) -> SafetensorsHeader:
    """``read_header_at``, with a header whose ``__metadata__`` is not a string map refused like any other lie."""
    try:
        header = read_header_at(fd, path)
    except (TypeError, ValueError) as exc:  # dict() of a malformed __metadata__
        raise IntegrityError(f"{path}: header __metadata__ is not an object of strings ({exc})") from exc
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items()):
        raise IntegrityError(f"{path}: header __metadata__ is not an object of strings")
    return header


def _verify(flat: torch.Tensor, header: SafetensorsHeader, manifest: Manifest, rank: int) -> None:
    """Compare each tensor's bytes in the mapping with the xxh3-128 the manifest records for this rank's slice."""
    for tensor in manifest.held_by(rank):
        item = header.tensors[tensor.name]
        digest = hash_bytes(flat[item.offset : item.offset + item.nbytes].numpy().data)
        expected = tensor.slice_for(manifest.tp_rank_of(rank)).xxh3
        if digest != expected:
            raise IntegrityError(
                f"{header.path}: tensor {tensor.name!r} has xxh3 {digest}, but the manifest records {expected} "
                "(the file is corrupt or was modified)"
            )
