"""transformers' distributed checkpoints as a source: each rank's slices, read where they lie, never gathered.

``model.save_pretrained(dir, distributed_checkpoint=True)`` on a TP model writes torch DCP's Hugging Face storage
layout (``HuggingFaceStorageWriter(save_distributed=True)``), as of transformers 5.23 and torch 2.13:

- ``shard-SSSSS-model-00001-of-00001.safetensors``, one per saving rank (``SSSSS`` = rank + 1), holding that rank's
  local slice of every tensor it saves, under the tensor's own name. A replicated tensor is saved by one rank only.
- each file's ``__metadata__`` has ``DCP_VERSION`` ``"1.0"``, ``format`` ``"pt"`` and ``DCP_SHARDING_INFO``: a JSON
  string ``{name: {"saved_offsets": [o0, o1, ...]}}``, the slice's global offset along every dim. No global shape
  is stored: as torch's own reader does, it is the largest offset + local shape over all slices.
- ``config.json`` and ``generation_config.json`` beside them (rank 0); no index, and no pickled ``.metadata``.

Each slice becomes chunks of the global tensor (``row_major_chunks``: a range of one dim), so the copy engine
streams it like an artifact's rank file. Every tensor must be tiled exactly once by slices cut along one dim.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from reshard.manifests.chunks import Chunk, StoredTensor, contiguous, row_major_chunks
from reshard.manifests.dtypes import row_bytes
from reshard.manifests.errors import FileFormatError, SourceError
from reshard.manifests.preflight import text_config
from reshard.manifests.safetensors import HeaderEntry, read_header
from reshard.source.checkpoint import Checkpoint, extra_files, open_checkpoint, read_model_config
from reshard.transforms import Table

SHARD_FILE = re.compile(r"^shard-([0-9]{5})-model-([0-9]{5})-of-([0-9]{5})\.safetensors$")  # transformers' test
SHARDING_KEY = "DCP_SHARDING_INFO"
VERSION_KEY = "DCP_VERSION"
OFFSETS_KEY = "saved_offsets"
_TIED_OUTPUTS = ("lm_head", "embed_out")  # output embeddings a tied model saves again, as tp_plan knows them
_INPUT_EMBEDDINGS = ("embed_tokens", "embed_in")


@dataclass(frozen=True)
class _Slice:
    """One rank's saved part of a tensor: its header entry in ``file`` and its global offset along every dim."""

    file: Path
    entry: HeaderEntry
    offsets: tuple[int, ...]


def is_distributed_checkpoint(model: str | Path) -> bool:
    """Whether MODEL is a local folder holding DCP shard files (the test transformers' ``from_pretrained`` uses)."""
    path = Path(model).expanduser()
    return path.is_dir() and any(SHARD_FILE.match(p.name) for p in path.iterdir())


def checkpoint_table(model: str, revision: str | None = None) -> tuple[Checkpoint, Table]:
    """MODEL's checkpoint and its tensor table, whichever kind of folder it is: a distributed checkpoint's
    slices, or a normal checkpoint's tensors (one chunk each)."""
    if is_distributed_checkpoint(model):
        return open_distributed_checkpoint(Path(model).expanduser())
    checkpoint = open_checkpoint(model, revision)
    return checkpoint, {name: t.stored() for name, t in checkpoint.tensors.items()}


def open_distributed_checkpoint(root: Path) -> tuple[Checkpoint, Table]:
    """The folder as a checkpoint (config, shard files as weights, extra files) and every tensor's chunks.

    The returned ``Checkpoint`` has no ``tensors``: a tensor here is several slices, which only the table can say.
    With tied embeddings the output embedding, which DCP saves again, is left out, as ``save_pretrained`` does.
    """
    config = read_model_config(str(root))
    files = shard_files(root)
    table = distributed_tensors(root, files)
    if config.get("tie_word_embeddings", text_config(config).get("tie_word_embeddings", False)):
        table = {name: t for name, t in table.items() if not _tied_output(name)}
    _check_vocabulary(root, text_config(config), table)
    extra, skipped = extra_files(root, set(files))
    return Checkpoint(root, config, {}, files, extra, skipped=skipped), table


def _check_vocabulary(root: Path, config: dict[str, object], table: Table) -> None:
    """The format stores no global shape, so a missing last shard file leaves every tensor looking whole but short.
    TP (and FSDP) split the input embedding over every rank: its rows must be config.json's vocab_size."""
    vocab = config.get("vocab_size")
    for name, tensor in table.items():
        module, _, leaf = name.rpartition(".")
        embedding = leaf == "weight" and module.rpartition(".")[2] in _INPUT_EMBEDDINGS
        if embedding and isinstance(vocab, int) and tensor.shape[:1] != (vocab,):
            raise SourceError(
                f"{root}: tensor {name!r} has {tensor.shape[0]} rows but config.json vocab_size is {vocab} "
                "(a shard file missing?)"
            )


def _tied_output(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in _TIED_OUTPUTS


def shard_files(root: Path) -> list[Path]:
    """The shard files, in rank order; another safetensors file beside them is refused (torch's reader would read
    it as one more slice of every tensor it holds, reshard would not know which copy is meant)."""
    files, counts, ranks = [], set(), set()
    for path in sorted(root.iterdir()):
        match = SHARD_FILE.match(path.name)
        if match:
            files.append(path)
            counts.add(match.group(3))
            ranks.add(int(match.group(1)))
        elif path.name.endswith(".safetensors"):
            raise SourceError(
                f"{path}: a safetensors file beside DCP shard files (move it, or the shard files, to its own folder)"
            )
    if len(counts) > 1:
        raise SourceError(f"{root}: shard files disagree on their model file count ({', '.join(sorted(counts))})")
    missing = sorted(set(range(1, max(ranks) + 1)) - ranks)
    if missing:  # every rank of a TP model holds a slice of something, so every rank writes its files
        raise SourceError(f"{root}: no shard-{missing[0]:05d}-model-*.safetensors, but shard {max(ranks)} is there")
    return files


def distributed_tensors(root: Path, files: list[Path]) -> Table:
    """Every tensor of the shard files, global shape and chunks, each checked to be tiled exactly once."""
    slices: dict[str, list[_Slice]] = {}
    for file in files:
        header = read_header(file)
        offsets = _sharding_info(file, header.metadata, set(header.tensors))
        for name, entry in header.tensors.items():
            slices.setdefault(name, []).append(_Slice(file, entry, offsets[name]))
    return {name: _stored(root, name, parts) for name, parts in sorted(slices.items())}


def _sharding_info(file: Path, metadata: dict[str, str], names: set[str]) -> dict[str, tuple[int, ...]]:
    """Each tensor's saved offsets from the file's ``__metadata__``, checked field by field."""
    version = metadata.get(VERSION_KEY)
    if version != "1.0":
        raise FileFormatError(f"{file}: __metadata__ {VERSION_KEY} is {version!r}, expected '1.0' (torch DCP's format)")
    try:
        info = json.loads(metadata[SHARDING_KEY])
    except KeyError as exc:
        raise FileFormatError(f"{file}: __metadata__ has no {SHARDING_KEY} (not written by torch DCP)") from exc
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{file}: __metadata__ {SHARDING_KEY} is not valid JSON ({exc})") from exc
    if not isinstance(info, dict) or set(info) != names:
        extra = sorted(set(info) ^ names) if isinstance(info, dict) else []
        raise FileFormatError(
            f"{file}: __metadata__ {SHARDING_KEY} must name exactly the file's tensors"
            + (f" (differs on {extra[0]!r})" if extra else "")
        )
    offsets = {}
    for name, record in info.items():
        value = record.get(OFFSETS_KEY) if isinstance(record, dict) else None
        if not (isinstance(value, list) and all(isinstance(o, int) and o >= 0 for o in value)):
            raise FileFormatError(
                f"{file}: {SHARDING_KEY} {name!r} {OFFSETS_KEY} must be a list of offsets, got {value!r}"
            )
        offsets[name] = tuple(value)
    return offsets


def _stored(root: Path, name: str, parts: list[_Slice]) -> StoredTensor:
    """One tensor from its slices: dtype and rank agreed, global shape from the extents, and the slices (cut along
    one dim, or one whole copy) tiling it without gap or overlap."""
    first = parts[0]
    for part in parts:
        entry = part.entry
        if entry.dtype != first.entry.dtype or len(entry.shape) != len(first.entry.shape):
            raise SourceError(
                f"{part.file}: tensor {name!r} is {entry.dtype}{list(entry.shape)} here but "
                f"{first.entry.dtype}{list(first.entry.shape)} in {first.file.name}"
            )
        if len(part.offsets) != len(entry.shape):
            raise FileFormatError(
                f"{part.file}: {SHARDING_KEY} {name!r} {OFFSETS_KEY} has {len(part.offsets)} dims, the tensor "
                f"{len(entry.shape)}"
            )
    dtype, rank = first.entry.dtype, len(first.entry.shape)
    held = [p for p in parts if p.entry.nbytes]  # an uneven split may leave a rank an empty slice
    shape = tuple(max(p.offsets[d] + p.entry.shape[d] for p in held or parts) for d in range(rank))
    if not held:
        return StoredTensor(name, dtype, shape, ())
    dims = sorted({d for p in held for d in range(rank) if p.entry.shape[d] != shape[d]})
    if len(dims) > 1:
        raise SourceError(
            f"{root}: tensor {name!r} is cut along dims {dims}; only slices along one dim are supported "
            "(a checkpoint of a TP-only model)"
        )
    if not dims:  # saved whole, by one rank
        if len(held) > 1:
            raise SourceError(f"{held[1].file}: tensor {name!r} is saved whole here and in {held[0].file.name}")
        return StoredTensor(
            name, dtype, shape, contiguous(held[0].file, held[0].entry.offset, held[0].entry.nbytes, name)
        )
    dim = dims[0]
    held.sort(key=lambda p: p.offsets[dim])
    chunks: list[Chunk] = []
    position = 0
    for index, part in enumerate(held):
        if any(part.offsets[d] for d in range(rank) if d != dim):
            raise SourceError(f"{part.file}: tensor {name!r} {OFFSETS_KEY} {list(part.offsets)} are off dim {dim}")
        start, stop = part.offsets[dim], part.offsets[dim] + part.entry.shape[dim]
        if start > position:
            raise SourceError(f"{root}: tensor {name!r} dim {dim} {position}..{start} is in no shard file")
        if start < position:
            raise SourceError(
                f"{part.file}: tensor {name!r} dim {dim} {start}..{stop} overlaps {held[index - 1].file.name}"
            )
        row = row_bytes(dtype, shape, dim, name)
        chunks.extend(row_major_chunks(part.file, part.entry.offset, shape, row, dim, [(start, stop)], name))
        position = stop
    return StoredTensor(name, dtype, shape, tuple(chunks))  # the last slice reaches shape[dim]: shape is its extent
