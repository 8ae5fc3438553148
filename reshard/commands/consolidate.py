"""``reshard consolidate``: an artifact back into a Hugging Face checkpoint (sharded safetensors + index).

Every tensor is reassembled from the rank files with the same streaming readers a re-shard uses, under the
checkpoint's own names (transformers' load-time renames undone), so ``from_pretrained`` loads the result and
every tensor equals the original bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reshard.manifests import Manifest, resolve_in
from reshard.manifests.dtypes import nbytes
from reshard.manifests.errors import OutputExistsError
from reshard.manifests.layout import Geometry, TensorLayout, file_order, tensor_layout
from reshard.manifests.progress import progress_bar
from reshard.planning.unused import unused_tensors
from reshard.source.artifact import InputCheck, artifact_tensors, manifest_and_digest
from reshard.source.checkpoint import INDEX_NAME
from reshard.transforms import Context, chain, kv_heads
from reshard.write.rank_files import write_rank_files
from reshard.write.reader import ChunkReader, OpenFiles
from reshard.write.staging import copy_hashed, staging_folder, write_durably

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default of "5GB"


def consolidate(
    artifact: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``out`` as a Hugging Face checkpoint holding every tensor of ``artifact`` whole.

    Every file of ``artifact`` is hashed while it is read and compared with its manifest before ``out`` appears:
    a damaged artifact raises ``IntegrityError`` and leaves nothing behind.

    Example:
        >>> consolidate("./SmolLM2-1.7B-tp8", "./SmolLM2-1.7B")  # doctest: +SKIP
    """
    root, out_path = Path(artifact), Path(out)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path}: already exists (pass --overwrite to replace it)")
    manifest, _ = manifest_and_digest(root)
    inputs = InputCheck(root, manifest)  # every input byte checked against the manifest before promotion
    files = OpenFiles()
    unused = manifest.load_report.unused if manifest.load_report and manifest.load_report.unused_file else ()
    total = sum(nbytes(t.dtype, t.shape) for t in [*manifest.tensors, *unused])
    try:
        outputs = _checkpoint_tensors(root, manifest, files)
        shards = _group_into_shards([outputs[name] for name in sorted(outputs)], max_shard_bytes)
        with (
            staging_folder(out_path, overwrite) as staging,
            progress_bar(total=total, desc="consolidate", enabled=progress) as bar,
        ):
            inputs.start()
            weight_map: dict[str, str] = {}
            for index, shard in enumerate(shards):
                name = (
                    "model.safetensors"
                    if len(shards) == 1
                    else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                layouts = file_order([layout for layout, _ in shard])
                readers = {layout.name: reader for layout, reader in shard}
                write_rank_files(
                    layouts, readers, {0: staging / name}, metadata={"format": "pt"}, on_bytes=bar.update,
                    rank_metadata=False,
                )  # fmt: skip
                weight_map.update({layout.name: name for layout, _ in shard})
            if len(shards) > 1:
                index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                write_durably(staging / INDEX_NAME, (json.dumps(index_doc, indent=2) + "\n").encode())
            unused_file = manifest.load_report.unused_file if manifest.load_report else None
            extras = [resolve_in(root, f.path) for f in manifest.files if f.rank is None and f.path != unused_file]
            stored = manifest.options.replicate_kv
            copy_hashed([p for p in extras if not (stored and p.name == "config.json")], staging)
            if stored:  # the config the checkpoint had: its own number of KV heads
                config = json.loads((root / "config.json").read_text())
                write_durably(
                    staging / "config.json", kv_heads.config_json(kv_heads.with_kv_heads(config, stored.original))
                )
            inputs.check()  # a damaged artifact is refused here: staging_folder removes what was written
    finally:
        files.close()
    return out_path


def _checkpoint_tensors(
    root: Path, manifest: Manifest, files: OpenFiles
) -> dict[str, tuple[TensorLayout, ChunkReader]]:
    """Every tensor of the original checkpoint under its name there: the transforms' reverse halves (KV heads
    folded, fused experts split, renames undone, ...) applied to the artifact's tensors and to those the model does
    not use (its unused file), each laid out whole.

    A tensor keeps the placement dim of the artifact's tensor it comes from (a fused part its fused tensor's), so
    the engine reads the rank files' pieces in the geometry they were cut in.
    """
    styles = {t.name: t.style for t in manifest.tensors}
    table = {**artifact_tensors(root, manifest), **unused_tensors(root, manifest)}  # the unused ones were converted too
    table, came_from = chain.reverse(table, manifest.options, Context(manifest.tp, manifest.plan))
    outputs = {}
    for name, tensor in table.items():
        layout = tensor_layout(name, tensor.dtype, tensor.shape, styles.get(came_from[name]), 1)
        outputs[name] = (layout, ChunkReader(files, tensor, Geometry.of(layout)))
    return outputs


def _group_into_shards(
    tensors: list[tuple[TensorLayout, ChunkReader]], max_shard_bytes: int
) -> list[list[tuple[TensorLayout, ChunkReader]]]:
    """Fill shards in name order up to ``max_shard_bytes`` each, as save_pretrained does."""
    shards: list[list[tuple[TensorLayout, ChunkReader]]] = [[]]
    size = 0
    for layout, reader in tensors:
        if shards[-1] and size + layout.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((layout, reader))
        size += layout.nbytes
    return shards
