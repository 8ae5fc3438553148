"""``reshard consolidate``: an artifact back into a Hugging Face checkpoint (sharded safetensors + index).

Every tensor is reassembled from the rank files with the same streaming readers a re-shard uses, under the
checkpoint's own names (transformers' load-time renames undone), so ``from_pretrained`` loads the result and
every tensor equals the original bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.errors import OutputExistsError, ReshardError
from reshard.from_artifact import artifact_readers, manifest_and_digest
from reshard.kv_heads import HeadMapReader, config_json, head_maps, mapped_shape, with_kv_heads
from reshard.layout import TensorLayout, file_order, tensor_layout
from reshard.loaders.safetensors_file import ITEMSIZES
from reshard.manifests import Manifest, Placement, resolve_in
from reshard.progress import progress_bar
from reshard.readers import ColumnSpan, Geometry, OpenFiles, Span, TensorReader
from reshard.staging import copy_hashed, staging_folder, write_durably
from reshard.write import write_rank_files

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default of "5GB"


_LITERAL_PATTERN = re.compile(r"\^?(?:\w|\\\.|\.)+")


def checkpoint_key(model_key: str, renames: list[list[str]]) -> str:
    """Undo transformers' load-time renames: literal ones such as gpt_neox's ``^embed_out\\.`` → ``lm_head.``."""
    for pattern, target in reversed(renames):
        if not _LITERAL_PATTERN.fullmatch(pattern):
            raise ReshardError(f"cannot undo the key rename {pattern!r} -> {target!r} (not a literal pattern)")
        anchored = pattern.startswith("^")
        literal = pattern.removeprefix("^").replace("\\.", ".")
        model_key = re.sub(("^" if anchored else "") + re.escape(target), literal.replace("\\", "\\\\"), model_key)
    return model_key


def consolidate(
    artifact: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``out`` as a Hugging Face checkpoint holding every tensor of ``artifact`` whole.

    Example:
        >>> consolidate("./SmolLM2-1.7B-tp8", "./SmolLM2-1.7B")  # doctest: +SKIP
    """
    root, out_path = Path(artifact), Path(out)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path}: already exists (pass --overwrite to replace it)")
    manifest, _ = manifest_and_digest(root)
    files = OpenFiles()
    total = sum(math.prod(t.shape) * ITEMSIZES[t.dtype] for t in manifest.tensors)
    try:
        outputs = _checkpoint_tensors(root, manifest, files)
        shards = _group_into_shards(sorted(outputs.values(), key=lambda o: o[0].name), max_shard_bytes)
        with (
            staging_folder(out_path, overwrite) as staging,
            progress_bar(total=total, desc="consolidate", enabled=progress) as bar,
        ):
            weight_map: dict[str, str] = {}
            for index, shard in enumerate(shards):
                name = (
                    "model.safetensors"
                    if len(shards) == 1
                    else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                layouts = file_order([layout for layout, _ in shard], ITEMSIZES)
                readers = {layout.name: reader for layout, reader in shard}
                write_rank_files(
                    layouts, readers, {0: staging / name}, metadata={"format": "pt"}, on_bytes=bar.update,
                    rank_metadata=False,
                )  # fmt: skip
                weight_map.update({layout.name: name for layout, _ in shard})
            if len(shards) > 1:
                index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                write_durably(staging / INDEX_NAME, (json.dumps(index_doc, indent=2) + "\n").encode())
            extras = [resolve_in(root, f.path) for f in manifest.files if f.rank is None]
            stored = manifest.options.get("replicate_kv")
            copy_hashed([p for p in extras if not (stored and p.name == "config.json")], staging)
            if stored:  # the config the checkpoint had: its own number of KV heads
                config = json.loads((root / "config.json").read_text())
                write_durably(staging / "config.json", config_json(with_kv_heads(config, stored["original_kv_heads"])))
    finally:
        files.close()
    return out_path


def _checkpoint_tensors(
    root: Path, manifest: Manifest, files: OpenFiles
) -> dict[str, tuple[TensorLayout, TensorReader]]:
    """Every tensor of the original checkpoint: its name there, a whole-tensor layout and where to read it.

    tp=1 layouts keep each tensor's placement dim, so the readers see the rank files' pieces in the same geometry.
    Fused experts are split back into their per-expert tensors.
    """
    renames = manifest.options.get("key_renames", [])
    fused: dict[str, list[list[Any]]] = manifest.options.get("fused", {})
    layouts = {t.name: tensor_layout(t.name, t.dtype, t.shape, t.style, 1) for t in manifest.tensors}
    readers: dict[str, TensorReader] = dict(
        artifact_readers(root, manifest, files, {name: Geometry.of(t) for name, t in layouts.items()})
    )
    if stored := manifest.options.get("replicate_kv"):  # fold duplicated KV heads back to the original ones
        original, head_dim = stored["original_kv_heads"], stored["head_dim"]
        folds = head_maps(list(layouts), manifest.plan, original, 1, stored["replicated_kv_heads"] // original)
        for name, mapping in folds.items():
            readers[name] = HeadMapReader(readers[name], head_dim, mapping)
            t = layouts[name]
            layouts[name] = tensor_layout(name, t.dtype, mapped_shape(t.shape, mapping, head_dim), t.style, 1)
    outputs: dict[str, tuple[TensorLayout, TensorReader]] = {}
    for name, layout in layouts.items():
        if name not in fused:
            key = checkpoint_key(name, renames)
            outputs[key] = (_renamed(layout, key), readers[name])
            continue
        for key, layout_part, reader in _expert_parts(layout, readers[name], fused[name]):
            outputs[checkpoint_key(key, renames)] = (_renamed(layout_part, checkpoint_key(key, renames)), reader)
    return outputs


def _expert_parts(
    fused: TensorLayout, reader: TensorReader, pieces: list[list[Any]]
) -> list[tuple[str, TensorLayout, TensorReader]]:
    """The per-expert tensors a fused ``[E, C, ...]`` tensor was made of (its pieces in fused order)."""
    if not fused.placement.is_sharded or not fused.placement.dim:
        raise ReshardError(f"{fused.name}: cannot split fused experts that are not sharded past the expert dim")
    dim, experts, rows_total = fused.placement.dim, fused.shape[0], fused.shape[1]
    row_bytes = math.prod(fused.shape[2:]) * ITEMSIZES[fused.dtype]
    per_expert = len(pieces) // experts
    parts: list[tuple[str, TensorLayout, TensorReader]] = []
    for index, (key, nbytes) in enumerate(pieces):
        expert, offset = index // per_expert, sum(n for _, n in pieces[index - index % per_expert : index]) // row_bytes
        shape = (nbytes // row_bytes, *fused.shape[2:])
        placement = Placement("shard", dim - 1)
        layout = TensorLayout(key, fused.dtype, shape, fused.style, placement, (((0, shape[dim - 1]),),), (shape,))
        parts.append((key, layout, ExpertPartReader(reader, expert, offset, rows_total, fused.shape, dim)))
    return parts


@dataclass(frozen=True)
class ExpertPartReader:
    """Rows of one expert's piece (rows ``[offset, offset + n)`` of fused dim 1) read through the fused reader."""

    fused: TensorReader
    expert: int
    offset: int
    rows_total: int
    fused_shape: tuple[int, ...]
    dim: int

    def read(self, first: int, count: int, lo: int, hi: int, out: memoryview) -> None:
        self.fused.read(*self._in_fused(first, count, lo, hi), out)

    def span(self, first: int, count: int, lo: int, hi: int) -> Span | None:
        return self.fused.span(*self._in_fused(first, count, lo, hi))

    def breaks(self, index: int, lo: int, hi: int) -> list[int]:
        if self.dim == 1:  # rows of one expert's piece: the fused tensor's rows, shifted
            return [b - self.offset for b in self.fused.breaks(self.expert, self.offset + lo, self.offset + hi)]
        return self.fused.breaks(self._in_fused(index, 1, lo, hi)[0], lo, hi)

    def column_spans(self, first: int, count: int) -> list[ColumnSpan] | None:
        return None  # a tp=1 layout: every block is taken whole, never gathered

    def _in_fused(self, first: int, count: int, lo: int, hi: int) -> tuple[int, int, int, int]:
        """The same bytes as (first, count, lo, hi) of the fused tensor's reader."""
        if self.dim == 1:  # the piece is a run of rows of the fused tensor's own geometry
            return self.expert, 1, self.offset + lo, self.offset + hi
        inner = math.prod(self.fused_shape[2 : self.dim])
        base = (self.expert * self.rows_total + self.offset) * inner
        return base + first, count, lo, hi


def _renamed(layout: TensorLayout, name: str) -> TensorLayout:
    return TensorLayout(
        name, layout.dtype, layout.shape, layout.style, layout.placement, layout.ranges, layout.local_shapes
    )


def _group_into_shards(
    tensors: list[tuple[TensorLayout, TensorReader]], max_shard_bytes: int
) -> list[list[tuple[TensorLayout, TensorReader]]]:
    """Fill shards in name order up to ``max_shard_bytes`` each, as save_pretrained does."""
    shards: list[list[tuple[TensorLayout, TensorReader]]] = [[]]
    size = 0
    for layout, reader in tensors:
        nbytes = math.prod(layout.shape) * ITEMSIZES[layout.dtype]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((layout, reader))
        size += nbytes
    return shards
