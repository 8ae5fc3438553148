"""``reshard verify``: re-hash every file and every tensor slice of an artifact against its manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.errors import ReshardError
from reshard.loaders.integrity import hash_bytes, hash_file
from reshard.loaders.safetensors_file import map_file, read_header, tensor_memoryview
from reshard.manifests import Manifest, TensorEntry, read_manifest, resolve_in

if TYPE_CHECKING:
    import torch


def verify_artifact(root: str | os.PathLike[str], on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
    """Every problem found, one line each naming the file (and tensor); an empty list means the artifact is intact.

    A missing or unreadable manifest raises ``ManifestError`` instead: there is nothing to check against.
    """
    manifest = read_manifest(root)
    problems: list[str] = []
    for entry in manifest.files:
        path = resolve_in(root, entry.path)
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        if entry.rank is None:
            size, digest = hash_file(path, on_bytes)
        else:  # mapped once: the file's hash and every tensor slice's hash come from the same read
            flat = map_file(path)
            size, digest = flat.numel(), hash_bytes(tensor_memoryview(flat))
            on_bytes(size)
        if size != entry.size:
            problems.append(f"{entry.path}: {size} bytes, manifest records {entry.size}")
        elif digest != entry.xxh3:
            problems.append(f"{entry.path}: xxh3 {digest} does not match the manifest's {entry.xxh3}")
        if entry.rank is not None:
            problems.extend(_check_rank_file(manifest, path, flat, entry.path, entry.rank))
    return problems


def total_bytes(manifest: Manifest) -> int:
    """Bytes ``verify_artifact`` reads: every file once (a rank file's tensor hashes come from the same read)."""
    return sum(entry.size for entry in manifest.files)


def _check_rank_file(manifest: Manifest, path: Path, flat: torch.Tensor, name: str, rank: int) -> list[str]:
    """Compare a rank file's header and each tensor's bytes with the manifest, so a problem names its tensor."""
    try:
        header = read_header(path)
    except ReshardError as exc:
        return [str(exc)]
    problems = []
    expected: dict[str, TensorEntry] = {t.name: t for t in manifest.tensors}
    for missing in sorted(expected.keys() - header.tensors.keys()):
        problems.append(f"{name}: tensor {missing!r} is missing")
    for extra in sorted(header.tensors.keys() - expected.keys()):
        problems.append(f"{name}: tensor {extra!r} is not in the manifest")
    for tensor_name, entry in header.tensors.items():
        tensor = expected.get(tensor_name)
        if tensor is None:
            continue
        piece = tensor.slice_for(rank)
        if entry.dtype != tensor.dtype or entry.shape != tuple(piece.shape):
            problems.append(
                f"{name}: tensor {tensor_name!r} is {entry.dtype}{list(entry.shape)}, "
                f"manifest records {tensor.dtype}{list(piece.shape)}"
            )
            continue
        data = flat[entry.offset : entry.offset + entry.nbytes]
        digest = hash_bytes(tensor_memoryview(data))
        if digest != piece.xxh3:
            problems.append(f"{name}: tensor {tensor_name!r} bytes do not match the manifest's xxh3 (corrupted)")
    return problems
