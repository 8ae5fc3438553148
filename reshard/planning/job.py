"""What a conversion will do, decided before a byte is written: the plan, each tensor's layout and chunks, the records.

Two sources make a job: a Hugging Face checkpoint (``job_from_checkpoint``) or another reshard artifact
(``job_from_artifact``, re-sharding from its rank files alone). Both build a tensor table, apply the transforms'
forward halves (an artifact's are first reversed), assign styles and lay every tensor out; the job is plain data
that ``reshard.commands.convert`` executes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reshard
from reshard.manifests import FileEntry, SourceInfo, resolve_in
from reshard.manifests.chunks import StoredTensor
from reshard.manifests.dtypes import DTYPES, STORED_DTYPES
from reshard.manifests.errors import PlanError, ReshardError, ShardabilityError
from reshard.manifests.hashing import hash_bytes
from reshard.manifests.layout import TensorLayout, file_order, tensor_layout
from reshard.manifests.load_report import LoadReport
from reshard.manifests.pipeline import Pipeline
from reshard.manifests.plans import UNRECORDED_VERSION, plan_for_config, plans_version
from reshard.manifests.preflight import config_pipeline, require_expert_parallel, require_shardable, tied_embeddings
from reshard.manifests.transforms import Transforms
from reshard.planning.conversions import converted
from reshard.planning.model_keys import meta_model
from reshard.planning.tp_plan import assign_styles, load_plan, merged_plan, split_expert_parallel
from reshard.planning.unused import checked_table
from reshard.request import ConversionRequest
from reshard.source.artifact import artifact_tensors, manifest_and_digest
from reshard.source.checkpoint import artifact_config, read_model_config
from reshard.source.distributed_checkpoint import checkpoint_table
from reshard.transforms import Context, Table, chain, kv_heads


@dataclass(frozen=True)
class ConversionJob:
    """Everything decided before a byte is written: what goes where, where it comes from, what is recorded.

    ``tensors`` holds where each output tensor's bytes are (chunks of source files), ``layouts`` where they go.
    ``source`` is what the manifest records of the source; for a checkpoint its ``files`` are filled in by hashing
    ``hashed_files`` (the weights, ``weight_files``, on a background thread while the rank files are written).
    ``unused`` are the checkpoint's tensors the model does not load (``load_report`` says why), kept out of
    ``tensors`` and ``layouts``.
    """

    tp: int
    ep: int
    config: dict[str, Any]
    plan: dict[str, str]
    ep_plan: dict[str, str]
    plan_overrides: dict[str, str] | None
    layouts: list[TensorLayout]
    tensors: Table
    transforms: Transforms
    extra_files: list[Path]
    source: SourceInfo
    identity: dict[str, Any]
    weight_files: list[Path]
    hashed_files: list[Path]
    config_bytes: bytes | None = None  # a config.json to write instead of copying the source's
    lineage: dict[str, Any] | None = None
    pipeline: Pipeline | None = None  # with pipeline stages: transformers' split of the layers
    transformers_version: str | None = None  # the release whose built-in plan and conversions it follows
    load_report: LoadReport | None = None
    unused: Table = field(default_factory=dict)  # tensors the model does not use: stored once, in no rank file

    @property
    def pp(self) -> int:
        return self.pipeline.stages if self.pipeline is not None else 1

    @property
    def world_size(self) -> int:
        """Rank files: one per (stage, tp rank), numbered row-major."""
        return self.pp * self.tp

    def held_by(self, rank: int) -> list[TensorLayout]:
        """The layouts rank file ``rank`` holds, in file order: its stage's (all of them without stages)."""
        if self.pipeline is None:
            return self.layouts
        stage = rank // self.tp
        return [layout for layout in self.layouts if stage in self.pipeline.stages_of(layout.name)]

    def stages_of(self, name: str) -> tuple[int, ...] | None:
        return self.pipeline.stages_of(name) if self.pipeline is not None else None

    def fingerprint(self) -> str:
        """Identifies the job (inputs, plan, layout, tool version): finished files of a run with the same
        fingerprint can be reused by a resumed run."""
        document = {
            "tool": reshard.__version__,
            "tp": self.tp,
            **({"pipeline": self.pipeline.to_json() | {"stages": self.pp}} if self.pipeline is not None else {}),
            "plan": self.plan,
            "ep_plan": self.ep_plan,
            **({"transformers": self.transformers_version} if self.transformers_version is not None else {}),
            "identity": self.identity,
            "layouts": [[t.name, t.dtype, list(t.shape), t.style] for t in self.layouts],
        }
        return hash_bytes(json.dumps(document, sort_keys=True).encode())


def build_job(request: ConversionRequest) -> ConversionJob:
    """The job for a request: re-sharding if the source is an artifact, else converting a checkpoint."""
    from reshard.manifests import MANIFEST_NAME

    if (Path(request.source) / MANIFEST_NAME).is_file():
        return job_from_artifact(request)
    return job_from_checkpoint(request)


def job_from_checkpoint(request: ConversionRequest) -> ConversionJob:
    # Plan and shardability come from config.json alone: refuse a bad tp before any weight is fetched or read.
    tp, model = request.tp, request.source
    version = plans_version(request.transformers)  # the release whose plans and conversions the artifact follows
    config = read_model_config(model, request.revision)
    rules = load_plan(request.plan, config, version)
    plan = merged_plan(rules, config, version) if request.custom_plan else rules
    if tp > 1 and not plan:
        raise PlanError(
            f"{model}: tp_size={tp} was requested, but the plan is empty: it applies no tensor-parallel rule, and "
            "transformers refuses such a load ('has no tp_plan'); give rules, or --plan auto"
        )
    ep_plan: dict[str, str] = {}
    if request.ep > 1:
        require_expert_parallel(config, tp, request.ep, model)
        plan, ep_plan = split_expert_parallel(config, plan, version)
    require_shardable(config, plan, tp, model, request.replicate_kv)
    checkpoint, stored = checkpoint_table(model, request.revision)  # a distributed checkpoint's slices, or whole
    builtin = plan_for_config(config, version)
    tp_and_ep = {**plan, **ep_plan}
    table, transforms = converted(
        stored, builtin, tp_and_ep, tp, model, config, version, tp_plan=plan, replicate_kv=request.replicate_kv
    )
    replication = transforms.replicate_kv
    new_config = kv_heads.with_kv_heads(config, replication.replicated) if replication else None
    table, unused, load_report = checked_table(table, new_config or config, request.allow_missing, model)
    tied = tied_embeddings(config)
    builtin = plan_for_config(config, version)
    own = set(builtin.tp_plan) if builtin else set()
    checked = [rule for rule in rules if rule not in own] if request.custom_plan else []
    styles = assign_styles(list(table), {**plan, **ep_plan}, tied_embeddings=tied, checked=checked)
    pipeline = pipeline_split(config, table, request.pp or 1, tied, model, request.ep)
    dtypes = stored_dtypes(table, config, request.dtype)
    if dtypes:
        new_config = with_dtype(new_config or config, request.dtype)
    model_dtype = request.dtype if dtypes else checkpoint.weights_dtype
    new_config = artifact_config(new_config or config, model_dtype) or new_config
    return ConversionJob(
        tp=tp,
        ep=request.ep,
        config=config,
        plan=plan,
        ep_plan=ep_plan,
        plan_overrides=rules if request.custom_plan else None,
        layouts=_layouts(table, styles, tp, dtypes),
        tensors=table,
        transforms=transforms,
        extra_files=checkpoint.extra_files,
        source=SourceInfo(checkpoint.repo_id, checkpoint.revision, checkpoint.commit, skipped=checkpoint.skipped),
        identity={
            "source": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint.weight_files],
            "repo": [checkpoint.repo_id, checkpoint.commit],
        },
        weight_files=checkpoint.weight_files,
        hashed_files=sorted([*checkpoint.weight_files, *checkpoint.extra_files, *filter(None, [checkpoint.index])]),
        config_bytes=kv_heads.config_json(new_config) if new_config else None,
        pipeline=pipeline,
        transformers_version=version,
        load_report=load_report,
        unused=unused,
    )


def pipeline_split(
    config: dict[str, Any], names: Any, pp: int, tied: bool, origin: str, ep: int = 1
) -> Pipeline | None:
    """transformers' split of the model into ``pp`` stages (``None`` for one), or an error saying why the model
    cannot be split that way."""
    if pp == 1:
        return None
    if ep > 1:
        raise PlanError(
            f"{origin}: --pp {pp} with --ep {ep}: transformers does not combine expert parallelism (token dispatch) "
            "with pipeline stages; use --pp with tensor parallelism only"
        )
    pipeline, problems = config_pipeline(config, pp, list(names), tied)
    if pipeline is None or problems:
        raise ShardabilityError(f"{origin}: cannot split into {pp} pipeline stages: {problems[0]}")
    return pipeline


def job_from_artifact(request: ConversionRequest) -> ConversionJob:
    """Re-shard an artifact: same plan and tensors, new tp, bytes read from the old rank files only.

    The transforms whose records follow the tp are undone and applied again at the new tp (``chain.reshard``):
    replicated KV heads folded back to the original heads and replicated again as the new tp needs, interleaved
    rows de-interleaved in the new ranks' blocks.
    """
    root, tp = Path(request.source), request.tp
    old, manifest_digest = manifest_and_digest(root)
    config = read_model_config(str(root))
    version = old.transformers_version or UNRECORDED_VERSION  # re-sharding keeps the plans the artifact follows
    if request.custom_plan and merged_plan(load_plan(request.plan, config, version), config, version) != old.plan:
        raise PlanError(f"{root}: re-sharding keeps the artifact's plan; convert from the checkpoint to change it")
    stored = old.options.replicate_kv
    if stored:
        config = kv_heads.with_kv_heads(config, stored.original)
    replicate_kv = request.replicate_kv or stored is not None
    require_shardable(config, old.plan, tp, str(root), replicate_kv)
    ep = 1
    if old.ep_plan or request.ep > 1:  # an expert-parallel artifact stays one, on the new ranks
        ep = tp
        require_expert_parallel(config, tp, ep, str(root))
        if not old.ep_plan:
            raise PlanError(f"{root}: re-sharding keeps the artifact's plan; convert from the checkpoint to add --ep")
    styles = {t.name: t.style for t in old.tensors}
    context = Context(tp, old.plan, styles.get, config, replicate_kv=replicate_kv, recorded=old.options)
    table, transforms = chain.reshard(artifact_tensors(root, old), context)
    replication = transforms.replicate_kv
    pp = request.pp if request.pp is not None else old.pp
    tied = old.pipeline.tied if old.pipeline is not None else tied_embeddings(config)
    pipeline = pipeline_split(config, table, pp, tied, str(root), ep)
    dtypes = stored_dtypes(table, config, request.dtype)  # cast again: the artifact's bytes are its only source
    rewrite_config = stored is not None or replication is not None or bool(dtypes)
    new_config = kv_heads.with_kv_heads(config, replication.replicated) if replication else config
    new_config = with_dtype(new_config, request.dtype) if dtypes else new_config
    return ConversionJob(
        tp=tp,
        ep=ep,
        config=config,
        plan=old.plan,
        ep_plan=old.ep_plan,
        plan_overrides=old.plan_overrides,
        layouts=_layouts(table, styles, tp, dtypes),
        tensors=table,
        transforms=transforms,
        extra_files=[resolve_in(root, f.path) for f in old.files if f.rank is None],
        source=old.source,
        identity={"artifact": manifest_digest},
        weight_files=[],
        hashed_files=[],
        config_bytes=kv_heads.config_json(new_config) if rewrite_config else None,
        lineage={"resharded_from": {"mesh": old.mesh, "manifest_xxh3": manifest_digest}},
        pipeline=pipeline,
        transformers_version=old.transformers_version,
        load_report=old.load_report,  # its unused file is one of the old artifact's other files, copied as they are
    )


def _layouts(
    table: Table, styles: dict[str, str | None], tp: int, dtypes: dict[str, str] | None = None
) -> list[TensorLayout]:
    """Every tensor laid out at ``tp``, in file order, in its stored dtype (``dtypes``, else the source's)."""
    dtypes = dtypes or {}
    return file_order([_layout(t, styles[t.name], tp, dtypes.get(t.name)) for t in table.values()])


def _layout(tensor: StoredTensor, style: str | None, tp: int, dtype: str | None = None) -> TensorLayout:
    return tensor_layout(tensor.name, dtype or tensor.dtype, tensor.shape, style, tp)


def stored_dtypes(table: Table, config: dict[str, Any], dtype: str) -> dict[str, str]:
    """The tensors ``--dtype`` stores in another dtype than the source's: name -> safetensors dtype.

    The same bits as ``from_pretrained(source, dtype=...)`` makes at load: every floating tensor in that dtype,
    except those its ``dtype_plan`` keeps in float32 (``_keep_in_fp32_modules`` for float16,
    ``_keep_in_fp32_modules_strict`` for float16 and bfloat16), matched by transformers' own pattern search.
    Empty for ``"auto"`` or when nothing changes, so such a conversion is byte for byte today's.
    """
    target = STORED_DTYPES[dtype]
    if target is None:
        return {}
    kept = _kept_in_float32(config, dtype)
    dtypes = {}
    for name, tensor in table.items():
        wanted = "F32" if kept is not None and kept.search(name) else target
        if DTYPES[tensor.dtype].castable and tensor.dtype != wanted:
            dtypes[name] = wanted
    return dtypes


def _kept_in_float32(config: dict[str, Any], dtype: str) -> re.Pattern[str] | None:
    """transformers' pattern of the parameters it keeps in float32 when it loads the model in ``dtype``: the
    ``dtype_plan`` of the model ``load_model`` builds (on the meta device, where children add their own rules)."""
    try:
        import torch
        from transformers.core_model_loading import build_glob_alternation
    except ImportError as exc:
        raise ReshardError(
            "--dtype needs transformers (pip install 'reshard[transformers]'): it keeps some modules in float32 "
            "when it casts, and the stored bytes must be the ones it would make"
        ) from exc
    try:
        model = meta_model(json.dumps(config, sort_keys=True), dtype)
    except ReshardError as exc:
        raise ReshardError(f"--dtype: {exc}") from None
    plan = model._get_dtype_plan(getattr(torch, dtype))
    return build_glob_alternation(list(plan))[0] if plan else None


def with_dtype(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json as ``save_pretrained`` writes it for a model in ``dtype``: ``dtype`` set (transformers 5's key;
    the older ``torch_dtype`` dropped, ``dtype`` wins over it at load), in the sub-configs that record one too."""
    new = {key: value for key, value in config.items() if key != "torch_dtype"}
    new["dtype"] = dtype
    for key, value in config.items():
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            new[key] = with_dtype(value, dtype)
    return new


def source_files(job: ConversionJob, digest: Any, progress: bool) -> SourceInfo:
    """The manifest's source record: the job's, with size and xxh3-128 of every hashed source file."""
    from reshard.manifests.progress import progress_bar

    entries = []
    with progress_bar(total=len(job.hashed_files), unit="file", desc="hash source", enabled=progress) as bar:
        for path in job.hashed_files:
            size, xxh3 = digest(path)
            entries.append(FileEntry(path.name, size, xxh3))
            bar.update()
    if not job.hashed_files:
        return job.source
    return SourceInfo(job.source.repo_id, job.source.revision, job.source.commit, entries, job.source.skipped)


def architecture(config: dict[str, Any], version: str) -> str | None:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    builtin = plan_for_config(config, version)
    return builtin.architecture if builtin else None
