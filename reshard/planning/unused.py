"""The load check run on a conversion's tensor table, and the file of the tensors the model does not use.

``checked_table`` compares the table (after every forward transform) with the model ``load_model`` will build and
splits off the unused tensors; ``write_unused`` stores them once, whole, in ``unused.safetensors`` (no rank loads
it); ``unused_tensors`` reads them back for consolidation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from reshard.manifests import FileEntry, Manifest, resolve_in
from reshard.manifests.chunks import StoredTensor, contiguous
from reshard.manifests.errors import IntegrityError, ReshardError, SourceError
from reshard.manifests.layout import Geometry, file_order, tensor_layout
from reshard.manifests.load_report import UNUSED_FILE, LoadReport
from reshard.manifests.safetensors import read_header
from reshard.planning.load_check import LoadCheck, check_load
from reshard.planning.model_keys import ModelKeys, model_keys
from reshard.transforms import Table


def load_check(
    table: Table, config: dict[str, Any], allow_missing: bool = False, *, read_bytes: bool = True
) -> LoadCheck:
    """The load check of a converted table against ``config``'s model. ``read_bytes=False`` (``reshard check``,
    headers only) leaves a tied pair stored twice undecided (both kept, as if their bytes differed)."""
    from reshard.write.reader import tensor_xxh3

    keys = _keys(config)
    if keys is None:
        return LoadCheck(LoadReport("nothing: transformers cannot build this model and there is no built-in plan"))

    def same_bytes(a: str, b: str) -> bool | None:
        if not read_bytes:
            return None
        first, second = table[a], table[b]
        return (first.dtype, first.shape) == (second.dtype, second.shape) and tensor_xxh3(first) == tensor_xxh3(second)

    shapes = {name: (tensor.dtype, tensor.shape) for name, tensor in table.items()}
    model_type = config.get("model_type")
    return check_load(shapes, keys, allow_missing=allow_missing, same_bytes=same_bytes, model_type=str(model_type))


def _keys(config: dict[str, Any]) -> ModelKeys | None:
    try:
        return model_keys(config)
    except ReshardError:
        return None


def checked_table(
    table: Table, config: dict[str, Any], allow_missing: bool, origin: str
) -> tuple[Table, Table, LoadReport]:
    """The tensors the model loads, those it does not, and the report; a refusal raises ``SourceError`` (exit 3)
    with the first problem."""
    check = load_check(table, config, allow_missing)
    if check.problems:
        raise SourceError(f"{origin}: {check.problems[0]}")
    unused = {name: table[name] for name in sorted(check.unused)}
    kept = {name: tensor for name, tensor in table.items() if name not in unused}
    return kept, unused, replace(check.report, unused_file=UNUSED_FILE if unused else None)


def write_unused(unused: Table, folder: Path, durable: bool = True) -> FileEntry | None:
    """Write the unused tensors whole into ``folder/unused.safetensors``; its entry for the manifest's files."""
    from reshard.write.rank_files import write_rank_files
    from reshard.write.reader import ChunkReader, OpenFiles

    if not unused:
        return None
    layouts = file_order([tensor_layout(n, t.dtype, t.shape, None, 1) for n, t in unused.items()])
    files = OpenFiles()
    try:
        readers = {layout.name: ChunkReader(files, unused[layout.name], Geometry.of(layout)) for layout in layouts}
        written = write_rank_files(
            layouts, readers, {0: folder / UNUSED_FILE}, metadata={"format": "pt"}, rank_metadata=False, durable=durable
        )[0]
    finally:
        files.close()
    return FileEntry(UNUSED_FILE, written.size, written.xxh3)


def unused_tensors(root: Path, manifest: Manifest) -> Table:
    """The unused tensors of an artifact, from its unused file, each checked against the report's dtype and shape."""
    report = manifest.load_report
    if report is None or report.unused_file is None:
        return {}
    header = read_header(resolve_in(root, report.unused_file))
    table: Table = {}
    for unused in report.unused:
        entry = header.tensors.get(unused.name)
        if entry is None or (entry.dtype, tuple(entry.shape)) != (unused.dtype, unused.shape):
            raise IntegrityError(f"{header.path}: does not hold {unused.name!r} as the manifest's load report says")
        chunks = contiguous(header.path, entry.offset, entry.nbytes, unused.name)
        table[unused.name] = StoredTensor(unused.name, unused.dtype, unused.shape, chunks)
    return table
