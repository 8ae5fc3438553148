"""``reshard.convert``: a checkpoint in, a tensor-parallel artifact out. Plan first, then write, manifest last.

The artifact is built in a hidden ``.NAME.partial`` folder next to the output and renamed into place only once
every file is written, fsynced and hashed and the manifest is in it, so an interrupted run never leaves a folder
that looks complete. Running the same command again resumes: rank files a run of the same job finished are kept
(after re-hashing them) and only the rest are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import reshard
from reshard.manifests import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    RankSlice,
    TensorEntry,
    rank_file_name,
    read_manifest,
)
from reshard.manifests.errors import OutputExistsError, ReshardError
from reshard.manifests.hashing import hash_bytes, hash_file
from reshard.manifests.layout import Geometry
from reshard.manifests.plans import UNRECORDED_VERSION
from reshard.manifests.progress import progress_bar
from reshard.manifests.rank_header import ARTIFACT_KEY
from reshard.planning.job import ConversionJob, architecture, build_job, source_files
from reshard.request import ConversionRequest
from reshard.source.source_hashes import SourceHashes
from reshard.workers import WorkerGroup, from_torchrun, run_workers, solo, worker_command
from reshard.write.rank_files import WrittenFile, rank_bytes, write_rank_files
from reshard.write.reader import ChunkReader, OpenFiles
from reshard.write.staging import copy_hashed, prepare_staging, promote_staging, staging_path, write_durably


def default_output(model: str, tp: int, pp: int | None = None, ep: int = 1, dtype: str = "auto") -> Path:
    """``./NAME-tpN`` in the current folder, NAME being the last part of the model path or repo id, followed by
    what else makes the artifact differ: ``-ppP`` with pipeline stages, ``-epE`` with expert parallelism, ``-DTYPE``
    when ``--dtype`` casts (``NAME-tp4-ep4-bfloat16``), so that two conversions of one model never collide."""
    if (Path(model) / MANIFEST_NAME).is_file():  # re-sharding keeps the artifact's stages and expert parallelism
        try:
            old = read_manifest(model)
        except ReshardError:
            old = None  # the conversion itself reports the bad manifest
        if old is not None:
            pp = old.pp if pp is None else pp
            ep = tp if old.ep_plan and ep == 1 else ep
    parts = [f"tp{tp}"]
    parts += [f"pp{pp}"] if pp is not None and pp > 1 else []
    parts += [f"ep{ep}"] if ep > 1 else []
    parts += [dtype] if dtype != "auto" else []
    return Path("-".join([Path(model.rstrip("/")).name, *parts]))


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
    durable: bool = True,
    dtype: str = "auto",
    pp: int | None = None,
    transformers: str | None = None,
) -> Manifest:
    """Convert a Hugging Face checkpoint, or re-shard a reshard artifact, into one safetensors file per tp rank.

    Args:
        source: a local checkpoint folder, a Hub repo id, or a reshard artifact (a folder with manifest.json,
            whose rank files alone are then read: the original checkpoint is not needed).
        out: the artifact folder to create (default ``./NAME-tpN``, see ``default_output``).
        tp: the tensor-parallel size.
        pp: pipeline stages, split as transformers' ``DistributedConfig(pp_size=pp)`` splits the layers: each
            stage's rank files hold only its layers (default: 1, or an artifact's own when re-sharding).
        plan: ``"auto"`` (transformers' own plan for the architecture), a JSON plan file, or a plan dict.
        revision: Hub revision (branch, tag or commit) when ``source`` is a repo id.
        overwrite: replace ``out`` if it exists.
        progress: show tqdm progress bars.
        workers: split the rank files over this many local processes.
        replicate_kv: when tp exceeds the KV heads, duplicate them so every rank holds whole heads.
        ep: expert-parallel size (equal to tp): each rank holds whole experts instead of a slice of each.
        group: this process's worker group; by default the torchrun group when run under torchrun, else alone.
        durable: flush the rank files to disk (fsync) before the manifest is written. ``False`` leaves them in the
            page cache, like ``cp``: interrupting the process is still safe, an OS crash soon after is not.
        dtype: ``"auto"`` (as the source stores them) or the floating dtype to store floating tensors in
            (``"bfloat16"``, ``"float16"``, ``"float32"``), cast as torch's ``.to`` casts: load with that dtype
            and the weights stay views of the mapped files.
        transformers: the transformers release whose built-in plan and load-time conversions the artifact follows
            (recorded in the manifest; ``load_model`` refuses the artifact under a release that would build another
            model). Default: the installed one, or the newest release reshard has plans for when transformers is
            not installed.

    Returns:
        The manifest written into ``out``.

    A killed run resumes: the same command reuses the rank files already finished (after re-hashing them).

    Example:
        >>> reshard.convert("./SmolLM2-1.7B", "./SmolLM2-1.7B-tp8", tp=8)  # doctest: +SKIP
    """
    model = os.fspath(source)
    request = ConversionRequest(
        model,
        Path(out) if out is not None else default_output(model, tp, pp, ep, dtype),
        tp,
        plan,
        revision,
        replicate_kv=replicate_kv,
        ep=ep,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        durable=durable,
        dtype=dtype,
        pp=pp,
        transformers=transformers,
    )
    return run(request, group or from_torchrun() or solo())


def run(request: ConversionRequest, group: WorkerGroup) -> Manifest:
    """Execute a request in this process's place of ``group``: plan, write this worker's rank files, and (the
    leader) the manifest last.

    The leader holds the output's lock throughout (a second run to the same output fails at once). Re-sharding
    hashes every file of the old artifact while the engine reads it and refuses to promote an output built from
    bytes that are not the manifest's. A run that fails on its input removes its staging folder; an interrupted
    one (or one the output side failed) keeps it, so that the same command resumes.
    """
    import contextlib

    from reshard.manifests.errors import IntegrityError, OutputError
    from reshard.manifests.storage import os_errors
    from reshard.source.artifact import InputCheck, manifest_and_digest
    from reshard.write.staging import output_lock, remove_staging

    out_path = request.out
    if out_path.exists() and not request.overwrite and group.index == 0:
        raise OutputExistsError(f"{out_path}: already exists (pass --overwrite to replace it)")
    with output_lock(out_path) if group.is_leader else contextlib.nullcontext():
        try:
            job = build_job(request)
            job_id = job.fingerprint()
            hashes = SourceHashes(job.weight_files)
            inputs = None
            if group.is_leader and "artifact" in job.identity:  # re-sharding: the old artifact's every byte
                old, digest = manifest_and_digest(Path(request.source))
                if digest != job.identity["artifact"]:
                    raise IntegrityError(f"{request.source}: manifest.json changed while re-sharding; run again")
                inputs = InputCheck(Path(request.source), old)
            if group.is_leader:
                with os_errors(out_path, OutputError, "cannot write", missing=False):
                    prepare_staging(out_path, job_id)
                hashes.start()  # the source's hashes for the manifest, while the rank files are written
                if inputs is not None:
                    inputs.start()
            staging = staging_path(out_path)
            group.barrier()
            if request.workers > 1 and group.size == 1:
                argvs = [request.worker_argv(index, request.workers) for index in range(request.workers)]
                run_workers([worker_command(argv) for argv in argvs])
            else:
                write_part(
                    job,
                    staging,
                    group.ranks(job.world_size),
                    job_id,
                    progress=request.progress,
                    durable=request.durable,
                )
            group.barrier()
            if inputs is not None:
                inputs.check()  # before _finish promotes anything
            manifest = _finish(job, staging, request, job_id, hashes) if group.is_leader else None
        except KeyboardInterrupt as exc:
            if group.is_leader:
                exc.add_note(f"finished rank files are kept in {staging_path(out_path)}; the same command resumes")
            raise
        except ReshardError as exc:
            if group.is_leader and not isinstance(exc, OSError):  # bad input: nothing of this run is worth keeping
                remove_staging(out_path)
            raise
    group.barrier()
    return manifest if manifest is not None else read_manifest(out_path)


def convert_part(request: ConversionRequest, index: int, size: int) -> None:
    """One local worker's share of a request run with ``workers=size``: its rank files only, into the staging
    folder the parent prepared (the parent writes the manifest)."""
    job = build_job(request)
    staging = staging_path(request.out)
    if not staging.is_dir():
        raise ReshardError(f"{staging}: no staging folder; --worker is for the processes `--workers` starts")
    ranks = WorkerGroup(index, size, lambda: None).ranks(job.world_size)
    write_part(job, staging, ranks, job.fingerprint(), progress=False, durable=request.durable)


def write_part(
    job: ConversionJob, staging: Path, ranks: list[int], job_id: str, *, progress: bool, durable: bool = True
) -> None:
    """Write this worker's rank files into ``staging``, reusing any a previous run of the same job finished.

    With pipeline stages, each stage's files are written in turn, holding that stage's tensors only."""
    todo: dict[int, dict[int, Path]] = {}  # stage -> tp rank -> path
    for rank in ranks:
        path = staging / rank_file_name(rank, job.world_size)
        if _finished(path, job_id) is None:
            todo.setdefault(rank // job.tp, {})[rank % job.tp] = path
    if not todo:
        return
    files = OpenFiles()
    written: list[WrittenFile] = []
    try:
        readers = {t.name: ChunkReader(files, job.tensors[t.name], Geometry.of(t)) for t in job.layouts}
        count = sum(len(paths) for paths in todo.values())
        total = sum(rank_bytes(job.held_by(stage * job.tp), list(paths)) for stage, paths in todo.items())
        with progress_bar(total=total, desc=f"write {count} of {job.world_size} rank files", enabled=progress) as bar:
            for stage, paths in sorted(todo.items()):
                written += write_rank_files(
                    job.held_by(stage * job.tp),
                    readers,
                    paths,
                    metadata={"format": "pt", "reshard.tp": str(job.tp), ARTIFACT_KEY: job_id},
                    on_bytes=bar.update,
                    durable=durable,
                    rank_offset=stage * job.tp,
                ).values()
    finally:
        files.close()
    for w in written:
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
    job: ConversionJob, staging: Path, request: ConversionRequest, job_id: str, hashes: SourceHashes
) -> Manifest:
    """Collect every rank file's record, copy the small files, write the manifest last and rename into place.

    The manifest's ``artifact`` is the job's fingerprint, which write_part put into every rank file's header, so a
    rank file can be matched to its manifest; ``to_json`` adds the digest that covers the manifest itself."""
    written = []
    for rank in range(job.world_size):
        path = staging / rank_file_name(rank, job.world_size)
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
        architecture=architecture(job.config, job.transformers_version or UNRECORDED_VERSION),
        mesh={"pp": job.pp, "tp": job.tp} if job.pipeline is not None else {"tp": job.tp},
        pipeline=job.pipeline,
        options=job.transforms,
        lineage=job.lineage,
        plan=job.plan,
        expert_mesh={"ep": job.ep} if job.ep > 1 else None,
        ep_plan=job.ep_plan,
        plan_overrides=job.plan_overrides,
        source=source_files(job, hashes.digest, request.progress),
        tensors=_tensor_entries(job, written),
        files=[FileEntry(w.path.name, w.size, w.xxh3, rank) for rank, w in enumerate(written)] + extras,
        artifact=job_id,  # the id every rank file's header repeats (write_part's metadata)
        transformers_version=job.transformers_version,
    )
    manifest.validate(str(staging / MANIFEST_NAME))  # what every reader will check, before it is written
    write_durably(staging / MANIFEST_NAME, manifest.to_json().encode())
    promote_staging(staging, request.out, request.overwrite)
    return manifest


def _tensor_entries(job: ConversionJob, written: list[WrittenFile]) -> list[TensorEntry]:
    """The manifest's tensor table: each layout's per-rank ranges and shapes with the hashes the writer computed
    (a tensor several stages hold, the tied embeddings, has the same bytes in each stage's files)."""
    entries = []
    for layout in job.layouts:
        stages = job.stages_of(layout.name)
        slices = []
        for rank in range(job.tp):
            hashes = {written[stage * job.tp + rank].tensor_hashes[layout.name] for stage in stages or (0,)}
            if len(hashes) != 1:
                raise ReshardError(f"tensor {layout.name!r}: the stages' rank files hold different bytes of it")
            slices.append(RankSlice(rank, list(layout.ranges[rank]), layout.local_shapes[rank], hashes.pop()))
        entries.append(
            TensorEntry(layout.name, layout.dtype, layout.shape, layout.style, layout.placement, slices, stages)
        )
    return entries
