"""``reshard verify``: re-hash every file and every tensor slice of an artifact against its manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from reshard.manifests import Manifest, read_manifest, resolve_in
from reshard.manifests.errors import ReshardError
from reshard.manifests.hashing import hash_file, hash_regions
from reshard.manifests.rank_header import rank_header_problems
from reshard.manifests.safetensors import SafetensorsHeader, read_header_at


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
        else:  # one descriptor, one pass: the header, the file's hash and every slice's hash are of one file
            with open(path, "rb", buffering=0) as handle:
                header = _header_or_problem(handle.fileno(), path, problems)
                size, digest, tensor_hashes = _hash_rank_file(handle.fileno(), header, on_bytes)
        if size != entry.size:
            problems.append(f"{entry.path}: {size} bytes, manifest records {entry.size}")
        elif digest != entry.xxh3:
            problems.append(f"{entry.path}: xxh3 {digest} does not match the manifest's {entry.xxh3}")
        if entry.rank is not None and header is not None:
            problems.extend(_check_rank_file(manifest, header, tensor_hashes, entry.path, entry.rank))
    return problems


def _header_or_problem(fd: int, path: Path, problems: list[str]) -> SafetensorsHeader | None:
    """The rank file's header, or ``None`` with the reason added to ``problems`` (its hash is still checked)."""
    try:
        header = read_header_at(fd, path)
    except ReshardError as exc:
        problems.append(str(exc))
        return None
    except (TypeError, ValueError) as exc:  # a __metadata__ that is not an object
        problems.append(f"{path.name}: header __metadata__ is not an object of strings ({exc})")
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items()):
        problems.append(f"{path.name}: header __metadata__ is not an object of strings")
        return None
    return header


def _hash_rank_file(
    fd: int, header: SafetensorsHeader | None, on_bytes: Callable[[int], None]
) -> tuple[int, str, dict[str, str]]:
    """Size and xxh3-128 of the file and of each tensor's bytes, from one pass over a mapping dropped window by
    window (memory stays bounded however large the rank file)."""
    regions = [(t.name, t.offset, t.nbytes) for t in header.tensors.values()] if header else []
    return hash_regions(fd, regions, on_bytes)


def total_bytes(manifest: Manifest) -> int:
    """Bytes ``verify_artifact`` reads: every file once (a rank file's tensor hashes come from the same read)."""
    return sum(entry.size for entry in manifest.files)


def _check_rank_file(
    manifest: Manifest, header: SafetensorsHeader, tensor_hashes: dict[str, str], name: str, rank: int
) -> list[str]:
    """Compare a rank file's header (artifact id, names, dtypes, shapes, data_offsets: ``rank_header_problems``) and
    each tensor's bytes with the manifest, so a problem names its tensor and field."""
    problems = [f"{name}: {problem}" for problem in rank_header_problems(header, manifest, rank)]
    for tensor in manifest.held_by(rank):
        item = header.tensors.get(tensor.name)
        piece = tensor.slice_for(manifest.tp_rank_of(rank))
        if item is None or item.dtype != tensor.dtype or item.shape != tuple(piece.shape):
            continue  # reported above
        if tensor_hashes.get(tensor.name) != piece.xxh3:
            problems.append(f"{name}: tensor {tensor.name!r} bytes do not match the manifest's xxh3 (corrupted)")
    return problems
