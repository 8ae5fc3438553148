"""What a conversion will do, decided before a byte is written: layouts, readers, options, the manifest's records.

Two sources make a job: a Hugging Face checkpoint (``job_from_checkpoint``) or another reshard artifact
(``job_from_artifact``, re-sharding from its rank files alone). ``reshard.conversion`` then executes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reshard
from reshard.errors import PlanError, ReshardError
from reshard.experts import fuse_experts
from reshard.from_artifact import artifact_readers, manifest_and_digest
from reshard.kv_heads import HeadMapReader, config_json, head_maps, kv_replication, mapped_shape, with_kv_heads
from reshard.layout import TensorLayout, file_order, tensor_layout
from reshard.loaders.integrity import hash_bytes
from reshard.loaders.safetensors_file import ITEMSIZES
from reshard.manifests import FileEntry, SourceInfo, resolve_in
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
from reshard.progress import progress_bar
from reshard.readers import (
    CheckpointTensorReader,
    Geometry,
    OpenFiles,
    SegmentedTensorReader,
    SourceHashes,
    TensorReader,
)
from reshard.source import Checkpoint, open_checkpoint, read_model_config


@dataclass
class ConversionJob:
    """Everything decided before a byte is written: what goes where, where it comes from, what is recorded."""

    config: dict[str, Any]
    plan: dict[str, str]
    layouts: list[TensorLayout]
    open_readers: Callable[[OpenFiles], dict[str, TensorReader]]
    extra_files: list[Path]
    source_info: Callable[[bool], SourceInfo]
    identity: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    config_bytes: bytes | None = None  # a config.json to write instead of copying the source's
    ep_plan: dict[str, str] = field(default_factory=dict)
    ep: int = 1
    source_hashes: SourceHashes | None = None  # hashed on a background thread once started
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


def job_from_checkpoint(
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
        ITEMSIZES,
    )

    hashes = SourceHashes(checkpoint.weight_files)

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
        extra_files=checkpoint.extra_files,
        source_info=lambda progress: _source_info(checkpoint, hashes, progress),
        source_hashes=hashes,
        identity={
            "source": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint.weight_files],
            "repo": [checkpoint.repo_id, checkpoint.commit],
        },
        options=options,
        config_bytes=config_json(with_kv_heads(config, replication.replicated)) if replication else None,
        ep_plan=ep_plan,
        ep=ep,
    )


def job_from_artifact(root: Path, tp: int, plan: str | dict[str, str], replicate_kv: bool, ep: int) -> ConversionJob:
    """Re-shard an artifact: same plan and tensors, new tp, bytes read from the old rank files only.

    Replicated KV heads are folded back to the original heads and replicated again as the new tp needs.
    """
    old, manifest_digest = manifest_and_digest(root)
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
        ITEMSIZES,
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


def _source_info(checkpoint: Checkpoint, hashes: SourceHashes, progress: bool) -> SourceInfo:
    """Size and xxh3-128 of every source file; the weights were hashed while the rank files were written."""
    files = sorted([*checkpoint.weight_files, *checkpoint.extra_files])
    index = checkpoint.root / "model.safetensors.index.json"
    if index.exists():
        files.append(index)
    entries = []
    with progress_bar(total=len(files), unit="file", desc="hash source", enabled=progress) as bar:
        for path in sorted(files):
            size, digest = hashes.digest(path)
            entries.append(FileEntry(path.name, size, digest))
            bar.update()
    return SourceInfo(checkpoint.repo_id, checkpoint.revision, checkpoint.commit, entries)


def architecture(config: dict[str, object]) -> str | None:
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
