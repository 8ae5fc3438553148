"""``reshard.convert``: a checkpoint in, a tensor-parallel artifact out. Plan first, then write, manifest last.

The artifact is built in a hidden ``.NAME.partial`` folder next to the output and renamed into place only once
every file is written, fsynced and hashed and the manifest is in it, so an interrupted run never leaves a folder
that looks complete, and rerunning simply starts over.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import reshard
from reshard.errors import OutputExistsError, PlanError, ReshardError
from reshard.experts import fuse_experts
from reshard.from_artifact import artifact_readers, open_artifact
from reshard.kv_heads import HeadMapReader, config_json, head_maps, kv_replication, mapped_shape, with_kv_heads
from reshard.layout import TensorLayout, file_order, tensor_layout
from reshard.loaders.integrity import hash_bytes, hash_file
from reshard.loaders.safetensors_file import ITEMSIZES
from reshard.manifests import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    RankSlice,
    SourceInfo,
    TensorEntry,
    rank_file_name,
    read_manifest,
    resolve_in,
)
from reshard.parallel import WorkerGroup, from_torchrun, run_workers, solo, worker_command
from reshard.plan import (
    assign_styles,
    builtin_plan,
    key_converters,
    key_renames,
    load_plan,
    model_key,
    split_expert_parallel,
)
from reshard.preflight import require_expert_parallel, require_shardable, text_config
from reshard.readers import CheckpointTensorReader, Geometry, OpenFiles, SegmentedTensorReader, TensorReader
from reshard.source import Checkpoint, open_checkpoint, read_model_config
from reshard.staging import copy_hashed, prepare_staging, promote_staging, staging_path, write_durably
from reshard.write import WrittenFile, write_rank_files

ITEMSIZE = ITEMSIZES


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
    identity: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    config_bytes: bytes | None = None  # a config.json to write instead of copying the source's
    ep_plan: dict[str, str] = field(default_factory=dict)
    ep: int = 1
    lineage: dict[str, Any] | None = None

    @property
    def tp(self) -> int:
        return len(self.layouts[0].ranges) if self.layouts else 1

    def fingerprint(self, tp: int) -> str:
        """Identifies the job (inputs, plan, layout, tool version): finished files of a run with the same
        fingerprint can be reused by a resumed run."""
        document = {
            "tool": reshard.__version__,
            "tp": tp,
            "plan": self.plan,
            "ep_plan": self.ep_plan,
            "identity": self.identity,
            "layouts": [[t.name, t.dtype, list(t.shape), t.style] for t in self.layouts],
        }
        return hash_bytes(json.dumps(document, sort_keys=True).encode())


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    tp: int = 1,
    plan: str | dict[str, str] = "auto",
    revision: str | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    group: WorkerGroup | None = None,
    replicate_kv: bool = False,
    ep: int = 1,
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
        workers: split the rank files over this many local processes.
        replicate_kv: when tp exceeds the KV heads, duplicate them so every rank holds whole heads.
        ep: expert-parallel size (equal to tp): each rank holds whole experts instead of a slice of each.
        group: this process's worker group; by default the torchrun group when run under torchrun, else alone.

    Returns:
        The manifest written into ``out``.

    A killed run resumes: the same command reuses the rank files already finished (after re-hashing them).

    Example:
        >>> reshard.convert("./SmolLM2-1.7B", "./SmolLM2-1.7B-tp8", tp=8)  # doctest: +SKIP
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ReshardError(f"tp must be a positive integer, got {tp!r}")
    model = os.fspath(source)
    out_path = Path(out) if out is not None else default_output(model, tp)
    group = group or from_torchrun() or solo()
    if out_path.exists() and not overwrite and group.index == 0:
        raise OutputExistsError(f"{out_path}: already exists (pass --overwrite to replace it)")
    job = _build_job(model, tp, plan, revision, replicate_kv, ep)
    job_id = job.fingerprint(tp)
    if group.is_leader:
        prepare_staging(out_path, job_id)
    if workers > 1 and group.size == 1 and not isinstance(plan, str):
        raise ReshardError("workers > 1 needs the plan as 'auto' or a JSON file path")
    staging = staging_path(out_path)
    # The source's file hashes (for the manifest) are computed while the rank files are written: reads and xxh3
    # release the GIL, so the extra pass over the source costs little wall time.
    with ThreadPoolExecutor(max_workers=1) as hashing:
        source_info = hashing.submit(job.source_info, False) if group.is_leader else None
        group.barrier()
        if workers > 1 and group.size == 1:
            argv = [model, "--tp", str(tp), "-o", str(out_path), "--plan", str(plan)]
            argv += ["--revision", revision] if revision else []
            argv += ["--replicate-kv"] if replicate_kv else []
            argv += ["--ep", str(ep)] if ep > 1 else []
            run_workers([worker_command(argv, index, workers) for index in range(workers)])
        else:
            write_part(job, staging, group.ranks(tp), job_id, progress=progress)
        group.barrier()
        manifest = _finish(job, staging, out_path, tp, job_id, overwrite, source_info) if source_info else None
    group.barrier()
    return manifest if manifest is not None else read_manifest(out_path)


def convert_part(
    source: str,
    out: str | os.PathLike[str],
    tp: int,
    plan: str,
    revision: str | None,
    index: int,
    size: int,
    replicate_kv: bool = False,
    ep: int = 1,
) -> None:
    """One local worker's share of ``convert(..., workers=size)``: its rank files only, into the staging folder
    the parent prepared (the parent writes the manifest)."""
    job = _build_job(source, tp, plan, revision, replicate_kv, ep)
    staging = staging_path(Path(out))
    if not staging.is_dir():
        raise ReshardError(f"{staging}: no staging folder; --worker is for the processes `--workers` starts")
    write_part(job, staging, WorkerGroup(index, size, lambda: None).ranks(tp), job.fingerprint(tp), progress=False)


def _build_job(
    model: str, tp: int, plan: str | dict[str, str], revision: str | None, replicate_kv: bool = False, ep: int = 1
) -> ConversionJob:
    if (Path(model) / MANIFEST_NAME).is_file():
        return _job_from_artifact(Path(model), tp, plan, replicate_kv, ep)
    return _job_from_checkpoint(model, revision, tp, plan, replicate_kv, ep)


def write_part(job: ConversionJob, staging: Path, ranks: list[int], job_id: str, *, progress: bool) -> None:
    """Write this worker's rank files into ``staging``, reusing any a previous run of the same job finished."""
    todo = {}
    for rank in ranks:
        path = staging / rank_file_name(rank, job.tp)
        if _finished(path, job_id) is None:
            todo[rank] = path
    if not todo:
        return
    files = OpenFiles()
    try:
        readers = job.open_readers(files)
        desc = f"write {len(todo)} of {job.tp} rank files"
        with tqdm(total=job.total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            written = write_rank_files(
                job.layouts,
                readers,
                todo,
                metadata={"format": "pt", "reshard.tp": str(job.tp)},
                on_bytes=bar.update,
            )
    finally:
        files.close()
    for w in written.values():
        record = {"job": job_id, "size": w.size, "xxh3": w.xxh3, "tensor_hashes": w.tensor_hashes}
        write_durably(_record_path(w.path), json.dumps(record).encode())


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def _finished(path: Path, job_id: str, rehash: bool = True) -> WrittenFile | None:
    """The record of a rank file a run of this job completed, if the file is still exactly what it wrote.

    ``rehash=False`` trusts a record written in this run (after the file's fsync) and checks only the size.
    """
    record_path = _record_path(path)
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("job") != job_id or path.stat().st_size != record.get("size"):
        return None
    if rehash and hash_file(path)[1] != record["xxh3"]:
        return None
    return WrittenFile(path, record["size"], record["xxh3"], record["tensor_hashes"])


def _finish(
    job: ConversionJob, staging: Path, out: Path, tp: int, job_id: str, overwrite: bool, source: Future[SourceInfo]
) -> Manifest:
    """Collect every rank file's record, copy the small files, write the manifest last and rename into place."""
    written = []
    for rank in range(tp):
        path = staging / rank_file_name(rank, tp)
        record = _finished(path, job_id, rehash=False)  # reused files were re-hashed when write_part reused them
        if record is None:
            raise ReshardError(f"{path}: rank {rank} was not written completely; run the same command again")
        written.append(record)
        _record_path(path).unlink()
    extras = copy_hashed([p for p in job.extra_files if not (job.config_bytes and p.name == "config.json")], staging)
    if job.config_bytes is not None:
        write_durably(staging / "config.json", job.config_bytes)
        extras = sorted(
            [*extras, FileEntry("config.json", len(job.config_bytes), hash_bytes(job.config_bytes))],
            key=lambda f: f.path,
        )
    manifest = Manifest(
        tool_version=reshard.__version__,
        model_type=job.config.get("model_type"),
        architecture=_architecture(job.config),
        mesh={"tp": tp},
        options=job.options,
        lineage=job.lineage,
        plan=job.plan,
        expert_mesh={"ep": job.ep} if job.ep > 1 else None,
        ep_plan=job.ep_plan,
        source=source.result(),
        tensors=_tensor_entries(job.layouts, written),
        files=[FileEntry(w.path.name, w.size, w.xxh3, rank) for rank, w in enumerate(written)] + extras,
    )
    write_durably(staging / MANIFEST_NAME, manifest.to_json().encode())
    promote_staging(staging, out, overwrite)
    return manifest


def _job_from_checkpoint(
    model: str, revision: str | None, tp: int, plan: str | dict[str, str], replicate_kv: bool, ep: int
) -> ConversionJob:
    # Plan and shardability come from config.json alone: refuse a bad tp before any weight is fetched or read.
    config = read_model_config(model, revision)
    resolved_plan = load_plan(plan, config)
    ep_plan: dict[str, str] = {}
    if ep > 1:
        require_expert_parallel(config, tp, ep, model)
        resolved_plan, ep_plan = split_expert_parallel(config, resolved_plan)
    require_shardable(config, resolved_plan, tp, model, replicate_kv)
    checkpoint = open_checkpoint(model, revision)
    renames = key_renames(config)
    sources = {model_key(name, renames): (t.file, t.entry) for name, t in checkpoint.tensors.items()}
    sources, fused = fuse_experts(sources, key_converters(config))
    tied = bool(config.get("tie_word_embeddings", text_config(config).get("tie_word_embeddings", False)))
    styles = assign_styles(
        [*sources, *fused], {**resolved_plan, **ep_plan}, tied_embeddings=tied, strict=plan != "auto"
    )
    shapes = {name: (entry.dtype, entry.shape) for name, (_, entry) in sources.items()}
    shapes.update({name: (f.dtype, f.shape) for name, f in fused.items()})
    replication = kv_replication(config, tp) if replicate_kv else None
    head_dim = replication.head_dim if replication else 0
    head_map = (
        head_maps(list(shapes), resolved_plan, replication.original, replication.factor, 1) if replication else {}
    )
    layouts = file_order(
        [
            tensor_layout(name, dtype, mapped_shape(shape, head_map.get(name), head_dim), styles[name], tp)
            for name, (dtype, shape) in shapes.items()
        ],
        ITEMSIZE,
    )

    def open_readers(files: OpenFiles) -> dict[str, TensorReader]:
        readers: dict[str, TensorReader] = {}
        for layout in layouts:
            dtype, shape = shapes[layout.name]
            geometry = Geometry.of(tensor_layout(layout.name, dtype, shape, layout.style, tp))  # as on disk
            if layout.name in fused:
                readers[layout.name] = SegmentedTensorReader(files, fused[layout.name].segments, geometry)
            else:
                readers[layout.name] = CheckpointTensorReader(files, *sources[layout.name], geometry)
            if layout.name in head_map:
                readers[layout.name] = HeadMapReader(readers[layout.name], head_dim, head_map[layout.name])
        return readers

    options: dict[str, Any] = {}
    if renames:
        options["key_renames"] = [list(r) for r in renames]
    if fused:
        # how to give the per-expert tensors back (consolidate): checkpoint names and rows, in fused order
        options["fused"] = {
            name: [[source, segment.nbytes] for source, segment in zip(f.sources, f.segments, strict=True)]
            for name, f in sorted(fused.items())
        }
    if replication:
        options["replicate_kv"] = replication.to_json()
    return ConversionJob(
        config=config,
        plan=resolved_plan,
        layouts=layouts,
        open_readers=open_readers,
        total_bytes=sum(math.prod(shape) * ITEMSIZE[dtype] for dtype, shape in shapes.values()),
        extra_files=checkpoint.extra_files,
        source_info=lambda progress: _source_info(checkpoint, progress),
        identity={
            "source": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint.weight_files],
            "repo": [checkpoint.repo_id, checkpoint.commit],
        },
        options=options,
        config_bytes=config_json(with_kv_heads(config, replication.replicated)) if replication else None,
        ep_plan=ep_plan,
        ep=ep,
    )


def _job_from_artifact(root: Path, tp: int, plan: str | dict[str, str], replicate_kv: bool, ep: int) -> ConversionJob:
    """Re-shard an artifact: same plan and tensors, new tp, bytes read from the old rank files only.

    Replicated KV heads are folded back to the original heads and replicated again as the new tp needs.
    """
    old, manifest_digest = open_artifact(root)
    config = read_model_config(str(root))
    if plan != "auto" and load_plan(plan, config) != old.plan:
        raise PlanError(f"{root}: re-sharding keeps the artifact's plan; convert from the checkpoint to change it")
    stored = old.options.get("replicate_kv")
    if stored:
        config = with_kv_heads(config, stored["original_kv_heads"])
    replicate_kv = replicate_kv or bool(stored)
    require_shardable(config, old.plan, tp, str(root), replicate_kv)
    if old.ep_plan or ep > 1:  # an expert-parallel artifact stays one, on the new ranks
        ep = tp
        require_expert_parallel(config, tp, ep, str(root))
        if not old.ep_plan:
            raise PlanError(f"{root}: re-sharding keeps the artifact's plan; convert from the checkpoint to add --ep")
    replication = kv_replication(config, tp) if replicate_kv else None
    head_dim = stored["head_dim"] if stored else (replication.head_dim if replication else 0)
    original_kv = stored["original_kv_heads"] if stored else (replication.original if replication else 0)
    stored_factor = stored["replicated_kv_heads"] // original_kv if stored else 1
    names = [t.name for t in old.tensors]
    head_map = head_maps(names, old.plan, original_kv, replication.factor if replication else 1, stored_factor)
    layouts = file_order(
        [
            tensor_layout(t.name, t.dtype, mapped_shape(t.shape, head_map.get(t.name), head_dim), t.style, tp)
            for t in old.tensors
        ],
        ITEMSIZE,
    )

    def open_readers(files: OpenFiles) -> dict[str, TensorReader]:
        geometries = {t.name: Geometry.of(tensor_layout(t.name, t.dtype, t.shape, t.style, tp)) for t in old.tensors}
        readers: dict[str, TensorReader] = dict(artifact_readers(root, old, files, geometries))
        for name, mapping in head_map.items():
            readers[name] = HeadMapReader(readers[name], head_dim, mapping)
        return readers

    options = {key: value for key, value in old.options.items() if key != "replicate_kv"}
    if replication:
        options["replicate_kv"] = replication.to_json()
    rewrite_config = bool(stored or replication)
    return ConversionJob(
        config=config,
        plan=old.plan,
        layouts=layouts,
        open_readers=open_readers,
        total_bytes=sum(math.prod(t.shape) * ITEMSIZE[t.dtype] for t in layouts),
        extra_files=[resolve_in(root, f.path) for f in old.files if f.rank is None],
        source_info=lambda progress: old.source,
        identity={"artifact": manifest_digest},
        options=options,
        lineage={"resharded_from": {"mesh": old.mesh, "manifest_xxh3": manifest_digest}},
        ep_plan=old.ep_plan,
        ep=ep if old.ep_plan else 1,
        config_bytes=config_json(with_kv_heads(config, replication.replicated) if replication else config)
        if rewrite_config
        else None,
    )


def _tensor_entries(layouts: list[TensorLayout], written: list[WrittenFile]) -> list[TensorEntry]:
    """The manifest's tensor table: each layout's per-rank ranges and shapes with the hashes the writer computed."""
    entries = []
    for layout in layouts:
        slices = [
            RankSlice(rank, list(layout.ranges[rank]), layout.local_shapes[rank], w.tensor_hashes[layout.name])
            for rank, w in enumerate(written)
        ]
        entries.append(TensorEntry(layout.name, layout.dtype, layout.shape, layout.style, layout.placement, slices))
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
