"""Read a reshard artifact as a source: every global tensor's chunks in the old rank files.

Lets ``reshard --tp 4 ./model-tp8`` (re-shard) and ``reshard consolidate`` read the rank files alone, streaming with
the same bounded buffers as a conversion from a checkpoint, without the original checkpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path

from reshard.manifests import MANIFEST_NAME, Manifest, read_manifest, resolve_in
from reshard.manifests.chunks import StoredTensor, contiguous, row_major_chunks
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import IntegrityError
from reshard.manifests.hashing import hash_file, hash_open, hash_regions
from reshard.manifests.rank_header import rank_header_problems
from reshard.manifests.safetensors import read_header, read_header_at
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
                dim = tensor.placement.dim
                row = row_bytes(tensor.dtype, tensor.shape, dim, tensor.name)
                chunks.extend(
                    row_major_chunks(header.path, entry.offset, tensor.shape, row, dim, piece.ranges, tensor.name)
                )
            else:
                chunks.extend(contiguous(header.path, entry.offset, entry.nbytes, tensor.name))
        table[tensor.name] = StoredTensor(tensor.name, tensor.dtype, tensor.shape, tuple(chunks))
    return table


class InputCheck:
    """Every file of the artifact hashed on a background thread while the engine reads it, compared with the
    manifest before the output is promoted: each file's size and xxh3-128, and each tensor slice's xxh3.

    The chunks trust the rank files' headers and the engine copies bytes without looking at them, so a flipped
    byte, or two tensors' offsets swapped in a header, would otherwise come out as a new artifact whose manifest
    vouches for them. Each file's size and xxh3-128 (which cover its header) catch both; the slices' hashes, from
    the same pass, tie the bytes to what the manifest says each slice is (a record over them, such as replicated KV
    heads, is then about these bytes). The hashing thread reads the files in order from the page cache the engine
    fills, so it costs little extra I/O.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self._manifest = manifest
        self._entries = {resolve_in(root, f.path): f for f in manifest.files}
        self._digests: dict[Path, tuple[int, str, dict[str, str]]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reshard-input-hashes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for path, entry in self._entries.items():
                self._digests[path] = _hashes(path, entry.rank is not None)
        except BaseException as exc:  # raised again by check(), in the caller's thread
            self._error = exc

    def check(self) -> None:
        """Raise ``IntegrityError`` naming the first file, or tensor slice, whose bytes are not the manifest's."""
        if self._thread is not None:
            self._thread.join()
        for path, entry in self._entries.items():
            try:
                if self._error is not None:
                    raise self._error
                if path not in self._digests:
                    self._digests[path] = _hashes(path, entry.rank is not None)
            except FileNotFoundError as exc:
                missing = exc.filename or path
                raise IntegrityError(f"{missing}: missing; the manifest lists it (see reshard verify)") from exc
            size, digest, slices = self._digests[path]
            if (size, digest) != (entry.size, entry.xxh3):
                raise IntegrityError(
                    f"{path}: {size} bytes with xxh3 {digest}, but the manifest records {entry.size} bytes with "
                    f"xxh3 {entry.xxh3}; the artifact is damaged (see reshard verify), nothing was written"
                )
            for tensor in self._manifest.held_by(entry.rank) if entry.rank is not None else []:
                expected = tensor.slice_for(self._manifest.tp_rank_of(entry.rank)).xxh3
                if slices.get(tensor.name) != expected:
                    raise IntegrityError(
                        f"{path}: tensor {tensor.name!r} has xxh3 {slices.get(tensor.name)}, but the manifest "
                        f"records {expected} for it (see reshard verify), nothing was written"
                    )


def _hashes(path: Path, rank_file: bool) -> tuple[int, str, dict[str, str]]:
    """Size and xxh3-128 of a file and, for a rank file, of each tensor its header lists: header and bytes read
    through one descriptor."""
    with open(path, "rb", buffering=0) as handle:
        if not rank_file:
            return (*hash_open(handle.fileno()), {})
        header = read_header_at(handle.fileno(), path)
        regions = [(t.name, t.offset, t.nbytes) for t in header.tensors.values()]
        return hash_regions(handle.fileno(), regions)
