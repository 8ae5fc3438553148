"""Read a reshard artifact as a source: every global tensor's chunks in the old rank files.

Lets ``reshard --tp 4 ./model-tp8`` (re-shard) and ``reshard consolidate`` read the rank files alone, streaming with
the same bounded buffers as a conversion from a checkpoint, without the original checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from reshard.manifests import MANIFEST_NAME, Manifest, read_manifest, resolve_in
from reshard.manifests.chunks import StoredTensor, contiguous, row_major_chunks
from reshard.manifests.errors import IntegrityError
from reshard.manifests.hashing import hash_file
from reshard.manifests.rank_header import rank_header_problems
from reshard.manifests.safetensors import ITEMSIZES, read_header
from reshard.source.source_hashes import SourceHashes
from reshard.transforms import Table


def manifest_and_digest(root: Path) -> tuple[Manifest, str]:
    """The artifact's manifest and the xxh3-128 of ``manifest.json`` (the new artifact's lineage points at it)."""
    manifest = read_manifest(root)
    _, digest = hash_file(root / MANIFEST_NAME)
    return manifest, digest


def artifact_tensors(root: Path, manifest: Manifest) -> Table:
    """Every tensor of the artifact with its chunks in the rank files; each rank file's header is checked against
    the manifest first. A tensor held whole by every rank is read from rank 0."""
    headers = {f.rank: read_header(resolve_in(root, f.path)) for f in manifest.files if f.rank is not None}
    for rank, header in headers.items():  # the same check as a load's: names, shapes, offsets, artifact id
        if problems := rank_header_problems(header, manifest, rank):
            raise IntegrityError(f"{header.path}: {problems[0]}")
    table: Table = {}
    for tensor in manifest.tensors:
        chunks = []
        ranks = tensor.slices if tensor.placement.is_sharded else tensor.slices[:1]
        for piece in ranks:
            header = headers[manifest.holder(tensor, piece.rank)]
            entry = header.tensors[tensor.name]
            if tensor.placement.is_sharded:
                assert tensor.placement.dim is not None
                dim, itemsize = tensor.placement.dim, ITEMSIZES[tensor.dtype]
                chunks.extend(
                    row_major_chunks(header.path, entry.offset, tensor.shape, itemsize, dim, piece.ranges, tensor.name)
                )
            else:
                chunks.extend(contiguous(header.path, entry.offset, entry.nbytes, tensor.name))
        table[tensor.name] = StoredTensor(tensor.name, tensor.dtype, tensor.shape, tuple(chunks))
    return table


class InputCheck:
    """Every file of the artifact hashed on a background thread while the engine reads it, compared with the
    manifest before the output is promoted.

    The chunks trust the rank files' headers and the engine copies bytes without looking at them, so a flipped
    byte, or two tensors' offsets swapped in a header, would otherwise come out as a new artifact whose manifest
    vouches for them. Each file's size and xxh3-128 (which cover its header) catch both. The hashing thread reads
    the files in order from the page cache the engine fills, so it costs little extra I/O.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self._entries = {resolve_in(root, f.path): f for f in manifest.files}
        self._hashes = SourceHashes(list(self._entries))

    def start(self) -> None:
        self._hashes.start()

    def check(self) -> None:
        """Raise ``IntegrityError`` naming the first file whose bytes are not the manifest's."""
        for path, entry in self._entries.items():
            try:
                size, digest = self._hashes.digest(path)
            except FileNotFoundError as exc:
                missing = exc.filename or path
                raise IntegrityError(f"{missing}: missing; the manifest lists it (see reshard verify)") from exc
            if (size, digest) != (entry.size, entry.xxh3):
                raise IntegrityError(
                    f"{path}: {size} bytes with xxh3 {digest}, but the manifest records {entry.size} bytes with "
                    f"xxh3 {entry.xxh3}; the artifact is damaged (see reshard verify), nothing was written"
                )
