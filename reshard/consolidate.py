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
from pathlib import Path

from tqdm.auto import tqdm

from reshard.conversion import ITEMSIZE
from reshard.errors import OutputExistsError, ReshardError
from reshard.from_artifact import artifact_readers, open_artifact
from reshard.layout import TensorLayout, file_order, tensor_layout
from reshard.manifests import resolve_in
from reshard.readers import Geometry, OpenFiles
from reshard.staging import copy_hashed, staging_folder, write_durably
from reshard.write import write_rank_files

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default of "5GB"


_LITERAL_PATTERN = re.compile(r"\^?(?:\w|\\\.)+")


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
    manifest, _ = open_artifact(root)
    renames = manifest.options.get("key_renames", [])
    # tp=1 layouts keep each tensor's placement dim, so the readers see the rank files' pieces in the same geometry.
    layouts = {
        checkpoint_key(t.name, renames): (t.name, tensor_layout(t.name, t.dtype, t.shape, t.style, 1))
        for t in manifest.tensors
    }
    shards = _group_into_shards([(name, layout) for name, (_, layout) in sorted(layouts.items())], max_shard_bytes)
    files = OpenFiles()
    total = sum(math.prod(t.shape) * ITEMSIZE[t.dtype] for t in manifest.tensors)
    try:
        readers = artifact_readers(root, manifest, files, {t.name: Geometry.of(t) for _, t in layouts.values()})
        with (
            staging_folder(out_path, overwrite) as staging,
            tqdm(total=total, unit="B", unit_scale=True, desc="consolidate", disable=not progress) as bar,
        ):
            weight_map: dict[str, str] = {}
            for index, shard in enumerate(shards):
                name = (
                    "model.safetensors"
                    if len(shards) == 1
                    else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                renamed = file_order([_renamed(layout, key) for key, layout in shard], ITEMSIZE)
                source_of = {key: layout.name for key, layout in shard}
                write_rank_files(
                    renamed,
                    {r.name: readers[source_of[r.name]] for r in renamed},
                    {0: staging / name},
                    metadata={"format": "pt"},
                    on_bytes=bar.update,
                    rank_metadata=False,
                )
                weight_map.update({key: name for key, _ in shard})
            if len(shards) > 1:
                index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                write_durably(staging / INDEX_NAME, (json.dumps(index_doc, indent=2) + "\n").encode())
            copy_hashed([resolve_in(root, f.path) for f in manifest.files if f.rank is None], staging)
    finally:
        files.close()
    return out_path


def _renamed(layout: TensorLayout, name: str) -> TensorLayout:
    return TensorLayout(
        name, layout.dtype, layout.shape, layout.style, layout.placement, layout.ranges, layout.local_shapes
    )


def _group_into_shards(
    tensors: list[tuple[str, TensorLayout]], max_shard_bytes: int
) -> list[list[tuple[str, TensorLayout]]]:
    """Fill shards in name order up to ``max_shard_bytes`` each, as save_pretrained does."""
    shards: list[list[tuple[str, TensorLayout]]] = [[]]
    size = 0
    for name, layout in tensors:
        nbytes = math.prod(layout.shape) * ITEMSIZE[layout.dtype]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, layout))
        size += nbytes
    return shards
