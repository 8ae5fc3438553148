"""``reshard.convert``: a checkpoint in, a tensor-parallel artifact out. Plan first, then write, manifest last.

The artifact is built in a hidden ``.NAME.partial`` folder next to the output and renamed into place only once
every file is written, fsynced and hashed and the manifest is in it, so an interrupted run never leaves a folder
that looks complete, and rerunning simply starts over.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import reshard
from reshard.errors import OutputExistsError, PlanError, ReshardError
from reshard.from_artifact import artifact_readers, open_artifact
from reshard.layout import TensorLayout, file_order, tensor_layout
from reshard.loaders.integrity import hash_file
from reshard.loaders.safetensors_file import DTYPES
from reshard.manifests import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Placement,
    RankSlice,
    SourceInfo,
    TensorEntry,
    rank_file_name,
    resolve_in,
)
from reshard.plan import assign_styles, builtin_plan, key_renames, load_plan, model_key
from reshard.preflight import require_shardable, text_config
from reshard.source import Checkpoint, open_checkpoint, read_model_config
from reshard.staging import copy_hashed, staging_folder, write_durably
from reshard.write import (
    CheckpointTensorReader,
    Geometry,
    OpenFiles,
    TensorReader,
    WrittenFile,
    write_rank_files,
)

ITEMSIZE = {name: size for name, (_, size) in DTYPES.items()}


def default_output(model: str, tp: int) -> Path:
    """``./NAME-tpN`` in the current folder, NAME being the last part of the model path or repo id."""
    return Path(f"{Path(model.rstrip('/')).name}-tp{tp}")


@dataclass
class ConversionJob:
    """Everything decided before a byte is written: what goes where, where it comes from, what is recorded."""

    config: dict[str, Any]
    plan: dict[str, str]
    layouts: list[TensorLayout]
    open_readers: Callable[[OpenFiles], dict[str, TensorReader]]
    total_bytes: int
    extra_files: list[Path]
    source_info: Callable[[bool], SourceInfo]
    options: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] | None = None


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    tp: int = 1,
    plan: str | dict[str, str] = "auto",
    revision: str | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert a Hugging Face checkpoint, or re-shard a reshard artifact, into one safetensors file per tp rank.

    Args:
        source: a local checkpoint folder, a Hub repo id, or a reshard artifact (a folder with manifest.json,
            whose rank files alone are then read: the original checkpoint is not needed).
        out: the artifact folder to create (default ``./NAME-tpN``).
        tp: the tensor-parallel size.
        plan: ``"auto"`` (transformers' own plan for the architecture), a JSON plan file, or a plan dict.
        revision: Hub revision (branch, tag or commit) when ``source`` is a repo id.
        overwrite: replace ``out`` if it exists.
        progress: show tqdm progress bars.

    Returns:
        The manifest written into ``out``.

    Example:
        >>> reshard.convert("./SmolLM2-1.7B", "./SmolLM2-1.7B-tp8", tp=8)  # doctest: +SKIP
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ReshardError(f"tp must be a positive integer, got {tp!r}")
    model = os.fspath(source)
    out_path = Path(out) if out is not None else default_output(model, tp)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path}: already exists (pass --overwrite to replace it)")
    if (Path(model) / MANIFEST_NAME).is_file():
        job = _job_from_artifact(Path(model), tp, plan)
    else:
        job = _job_from_checkpoint(model, revision, tp, plan)

    with staging_folder(out_path, overwrite) as staging:
        names = [rank_file_name(rank, tp) for rank in range(tp)]
        written = _write_ranks(job, [staging / n for n in names], tp, progress)
        extras = copy_hashed(job.extra_files, staging)
        manifest = Manifest(
            tool_version=reshard.__version__,
            model_type=job.config.get("model_type"),
            architecture=_architecture(job.config),
            mesh={"tp": tp},
            options=job.options,
            lineage=job.lineage,
            plan=job.plan,
            source=job.source_info(progress),
            tensors=_tensor_entries(job.layouts, written),
            files=[
                FileEntry(name, w.size, w.xxh3, rank) for rank, (name, w) in enumerate(zip(names, written, strict=True))
            ]
            + extras,
        )
        write_durably(staging / MANIFEST_NAME, manifest.to_json().encode())
    return manifest


def _job_from_checkpoint(model: str, revision: str | None, tp: int, plan: str | dict[str, str]) -> ConversionJob:
    # Plan and shardability come from config.json alone: refuse a bad tp before any weight is fetched or read.
    config = read_model_config(model, revision)
    resolved_plan = load_plan(plan, config)
    require_shardable(config, resolved_plan, tp, model)
    checkpoint = open_checkpoint(model, revision)
    renames = key_renames(config)
    sources = {model_key(name, renames): (t.file, t.entry) for name, t in checkpoint.tensors.items()}
    tied = bool(config.get("tie_word_embeddings", text_config(config).get("tie_word_embeddings", False)))
    styles = assign_styles(list(sources), resolved_plan, tied_embeddings=tied, strict=plan != "auto")
    layouts = file_order(
        [tensor_layout(name, entry.dtype, entry.shape, styles[name], tp) for name, (_, entry) in sources.items()],
        ITEMSIZE,
    )

    def open_readers(files: OpenFiles) -> dict[str, TensorReader]:
        return {t.name: CheckpointTensorReader(files, *sources[t.name], Geometry.of(t)) for t in layouts}

    return ConversionJob(
        config=config,
        plan=resolved_plan,
        layouts=layouts,
        open_readers=open_readers,
        total_bytes=sum(entry.nbytes for _, entry in sources.values()),
        extra_files=checkpoint.extra_files,
        source_info=lambda progress: _source_info(checkpoint, progress),
        options={"key_renames": [list(r) for r in renames]} if renames else {},
    )


def _job_from_artifact(root: Path, tp: int, plan: str | dict[str, str]) -> ConversionJob:
    """Re-shard an artifact: same plan and tensors, new tp, bytes read from the old rank files only."""
    old, manifest_digest = open_artifact(root)
    config = read_model_config(str(root))
    if plan != "auto" and load_plan(plan, config) != old.plan:
        raise PlanError(f"{root}: re-sharding keeps the artifact's plan; convert from the checkpoint to change it")
    require_shardable(config, old.plan, tp, str(root))
    layouts = file_order([tensor_layout(t.name, t.dtype, t.shape, t.style, tp) for t in old.tensors], ITEMSIZE)

    def open_readers(files: OpenFiles) -> dict[str, TensorReader]:
        return dict(artifact_readers(root, old, files, {t.name: Geometry.of(t) for t in layouts}))

    return ConversionJob(
        config=config,
        plan=old.plan,
        layouts=layouts,
        open_readers=open_readers,
        total_bytes=sum(math.prod(t.shape) * ITEMSIZE[t.dtype] for t in old.tensors),
        extra_files=[resolve_in(root, f.path) for f in old.files if f.rank is None],
        source_info=lambda progress: old.source,
        options=old.options,
        lineage={"resharded_from": {"mesh": old.mesh, "manifest_xxh3": manifest_digest}},
    )


def _write_ranks(job: ConversionJob, paths: list[Path], tp: int, progress: bool) -> list[WrittenFile]:
    files = OpenFiles()
    try:
        readers = job.open_readers(files)
        with tqdm(total=job.total_bytes, unit="B", unit_scale=True, desc=f"write tp={tp}", disable=not progress) as bar:
            return write_rank_files(
                job.layouts, readers, paths, metadata={"format": "pt", "reshard.tp": str(tp)}, on_bytes=bar.update
            )
    finally:
        files.close()


def _tensor_entries(layouts: list[TensorLayout], written: list[WrittenFile]) -> list[TensorEntry]:
    entries = []
    for layout in layouts:
        slices = [
            RankSlice(rank, list(layout.ranges[rank]), layout.local_shapes[rank], w.tensor_hashes[layout.name])
            for rank, w in enumerate(written)
        ]
        placement = Placement(layout.placement.kind, layout.placement.dim, layout.placement.split_factor)
        entries.append(TensorEntry(layout.name, layout.dtype, layout.shape, layout.style, placement, slices))
    return entries


def _source_info(checkpoint: Checkpoint, progress: bool) -> SourceInfo:
    files = sorted([*checkpoint.weight_files, *checkpoint.extra_files])
    index = checkpoint.root / "model.safetensors.index.json"
    if index.exists():
        files.append(index)
    total = sum(p.stat().st_size for p in files)
    entries = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="hash source", disable=not progress) as bar:
        for path in sorted(files):
            size, digest = hash_file(path, bar.update)
            entries.append(FileEntry(path.name, size, digest))
    return SourceInfo(checkpoint.repo_id, checkpoint.revision, checkpoint.commit, entries)


def _architecture(config: dict[str, object]) -> str | None:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        try:
            return str(builtin_plan(model_type)["architecture"])
        except ReshardError:
            return None
    return None
