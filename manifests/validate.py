"""The one validator every manifest reader goes through (``Manifest.from_json``).

A manifest is trusted by the runtime and every command, so nothing in it is taken on faith: each JSON value is
type-checked (``typed_json``: a ``bool`` is not an ``int``), sizes are bounded before anything is allocated, every
structural field
(placement, per-rank ranges and local shapes) is re-derived from ``layout`` and compared, and the whole document
must match its own ``manifest_xxh3`` digest, so an edit that keeps the structure consistent is caught too. Errors
are ``ManifestError`` naming the file and the JSON field path: ``manifest.json: tensors[3].slices[1].ranges[0]:
expected [int, int], got "x"``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from reshard.manifests.claims import claims_problem, config_problem
from reshard.manifests.errors import ManifestError, PlanError, ShardabilityError, shown
from reshard.manifests.layout import STYLES, file_order_key, tensor_layout
from reshard.manifests.load_report import load_report_problem
from reshard.manifests.manifest import (
    DIGEST_FIELD,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    TensorEntry,
    check_relative_path,
    manifest_digest,
    resolve_in,
)
from reshard.manifests.pipeline import Pipeline
from reshard.manifests.typed_json import HEX32, Fields, typed_manifest


def parse_manifest(
    raw: str | bytes, origin: str = MANIFEST_NAME, root: str | os.PathLike[str] | None = None
) -> Manifest:
    """Parse, type-check, re-derive and digest-check a manifest; the ``Manifest`` is returned only if all pass.

    With ``root`` (the artifact folder) every file path is also resolved in it (``resolve_in``). The digest is
    checked last, so that an edit gets the most specific message there is."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{origin}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so is a 5000-digit number
        raise ManifestError(f"{origin}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{origin}: not a reshard manifest (format is not {FORMAT_NAME!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ManifestError(
            f"{origin}: manifest format version {version!r}, this reshard reads version {FORMAT_VERSION}; "
            "convert the checkpoint again or use a matching reshard"
        )
    f = Fields(origin)
    manifest = typed_manifest(f, data)
    check_manifest(manifest, origin)
    for entry in manifest.files if root is not None else []:
        resolve_in(root, entry.path, origin)
    digest = f.string(f.req(data, DIGEST_FIELD, ""), DIGEST_FIELD, HEX32)
    if manifest_digest(data) != digest:
        raise ManifestError(f"{origin}: content does not match its digest ({DIGEST_FIELD}); the manifest was edited")
    return manifest


def check_manifest(manifest: Manifest, origin: str = MANIFEST_NAME) -> None:
    """Structural checks of a typed manifest: mesh, files, and every tensor's placement, ranges and local shapes
    re-derived from ``layout`` (the single source of truth), in the order the rank files hold them."""
    f = Fields(origin)
    _check_mesh(f, manifest)
    tp = manifest.tp
    if manifest.expert_mesh is not None and manifest.expert_mesh != {"ep": tp}:
        f.fail("expert_mesh", f'expected null or {{"ep": {tp}}} (ep equals tp), got {shown(manifest.expert_mesh)}')
    for rule, style in (manifest.plan_overrides or {}).items():
        if manifest.plan.get(rule) != style and not (manifest.ep_plan and rule not in manifest.plan):
            f.fail(f"plan_overrides.{rule}", f"{shown(style)}, but the plan gives {shown(manifest.plan.get(rule))}")
    _check_files(f, manifest)
    names: set[str] = set()
    rank_bytes = [0] * manifest.world_size
    for index, tensor in enumerate(manifest.tensors):
        path = f"tensors[{index}]"
        if tensor.name in names:
            f.fail(f"{path}.name", f"tensor {tensor.name!r} is listed twice")
        names.add(tensor.name)
        _check_tensor(f, tensor, tp, path)
        _check_stages(f, tensor, manifest.pipeline, path)
        for stage in tensor.stages if tensor.stages is not None else range(manifest.pp):
            for piece in tensor.slices:
                rank_bytes[stage * tp + piece.rank] += tensor.slice_nbytes(piece.rank)
    known = {t.name: (t.dtype, t.shape) for t in manifest.tensors}
    if (report := manifest.load_report) is not None:
        other_files = {entry.path for entry in manifest.files if entry.rank is None}
        if problem := load_report_problem(report, names, other_files):
            f.fail(*problem)
        known.update({u.name: (u.dtype, u.shape) for u in report.unused if report.unused_file is not None})
    if problem := manifest.options.problem(known):
        f.fail(*problem)
    if problem := claims_problem(manifest):
        f.fail(*problem)
    _check_interleaved(f, manifest)
    keys = [file_order_key(t) for t in manifest.tensors]
    if keys != sorted(keys):
        f.fail("tensors", "not in rank-file order (widest dtype first, then by name)")
    for entry in manifest.files:
        if entry.rank is not None and entry.size < 8 + rank_bytes[entry.rank]:
            f.fail(
                f"files[{manifest.files.index(entry)}].size",
                f"{entry.size} bytes cannot hold rank {entry.rank}'s {rank_bytes[entry.rank]} bytes of tensors",
            )


def check_config(manifest: Manifest, config: dict[str, Any], origin: str = MANIFEST_NAME) -> None:
    """The artifact's ``config.json`` against its manifest (``claims.config_problem``); ``ManifestError`` naming the
    field otherwise."""
    if problem := config_problem(manifest, config):
        Fields(origin).fail(*problem)


def check_artifact_config(manifest: Manifest, root: str | os.PathLike[str]) -> None:
    """``check_config`` with ``root/config.json`` when the manifest lists one (a small file; required when a record
    depends on it, as replicated KV heads do)."""
    listed = any(entry.path == "config.json" and entry.rank is None for entry in manifest.files)
    if not listed and manifest.options.replicate_kv is None:
        return
    path = os.path.join(root, "config.json")
    try:
        with open(path, "rb") as handle:
            config = json.loads(handle.read())
    except (OSError, ValueError, RecursionError) as exc:
        raise ManifestError(
            f"{path}: cannot be read as JSON ({exc}); the manifest's records are checked against it"
        ) from exc
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: not a JSON object")
    check_config(manifest, config, os.path.join(root, MANIFEST_NAME))


def _check_mesh(f: Fields, manifest: Manifest) -> None:
    """``{"tp": T}``, or ``{"pp": P, "tp": T}`` (P > 1, in that order) with the pipeline split recorded."""
    dims = list(manifest.mesh)
    if dims not in (["tp"], ["pp", "tp"]):
        f.fail("mesh", f'expected {{"tp": T}} or {{"pp": P, "tp": T}}, got {shown(manifest.mesh)}')
    pipeline = manifest.pipeline
    if manifest.pp == 1 and dims == ["pp", "tp"]:
        f.fail("mesh.pp", '1 pipeline stage: a tp-only artifact records {"tp": T}')
    if manifest.pp > 1 and pipeline is None:
        f.fail("pipeline", f"missing: the mesh has {manifest.pp} pipeline stages, but not how the layers split")
    if manifest.pp == 1 and pipeline is not None:
        f.fail("pipeline", "present, but the mesh has no pipeline stages")
    if pipeline is not None and manifest.expert_mesh is not None:
        f.fail("expert_mesh", "expert parallelism with pipeline stages (transformers does not combine them)")


def _check_stages(f: Fields, tensor: TensorEntry, pipeline: Pipeline | None, path: str) -> None:
    """A tensor's stages must be the ones transformers' split gives its name."""
    layer = pipeline.layer_of(tensor.name) if pipeline is not None else None
    if pipeline is not None and layer is not None and layer >= pipeline.layers:
        f.fail(f"{path}.name", f"{tensor.name!r} is in layer {layer}, but pipeline.layers is {pipeline.layers}")
    expected = pipeline.stages_of(tensor.name) if pipeline is not None else None
    if tensor.stages != expected:
        f.fail(
            f"{path}.stages",
            f"{shown(list(tensor.stages) if tensor.stages is not None else None)}, but the pipeline split puts "
            f"{tensor.name!r} on {shown(list(expected) if expected is not None else None)}",
        )


def _check_files(f: Fields, manifest: Manifest) -> None:
    """Unique safe paths, the manifest not among them, and exactly one file per rank."""
    seen: dict[str, int] = {}
    ranks: dict[int, int] = {}
    for index, entry in enumerate(manifest.files):
        path = f"files[{index}]"
        _check_path(f, entry.path, f"{path}.path")
        if entry.path in seen:
            f.fail(f"{path}.path", f"{entry.path!r} is listed twice")
        seen[entry.path] = index
        if entry.rank is not None:
            if entry.rank in ranks:
                f.fail(f"{path}.rank", f"rank {entry.rank} has two files")
            ranks[entry.rank] = index
    for index, entry in enumerate(manifest.files):  # "a" and "a/b" cannot both be files
        parts = entry.path.split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[:cut]) in seen:
                f.fail(f"files[{index}].path", f"{entry.path!r} lies inside another listed file")
    if sorted(ranks) != list(range(manifest.world_size)):
        raise ManifestError(
            f"{f.origin}: files: rank files {sorted(ranks)} do not cover world size {manifest.world_size}"
        )


def _check_path(f: Fields, value: str, path: str) -> None:
    if not value or value == MANIFEST_NAME or any(part in ("", ".", "..") for part in value.split("/")):
        check_relative_path(value, f.origin)  # the clearer message for paths that leave the folder
        f.fail(path, f"{shown(value)} is not a file path inside the artifact")
    check_relative_path(value, f.origin)


def _check_tensor(f: Fields, tensor: TensorEntry, tp: int, path: str) -> None:
    """The recorded placement, ranges and local shapes must be what ``layout`` derives for them."""
    if tensor.style is not None and tensor.style not in STYLES:
        f.fail(f"{path}.style", f"unknown style {tensor.style!r}")
    if len(tensor.slices) != tp:
        f.fail(f"{path}.slices", f"{len(tensor.slices)} slices, expected one per rank ({tp})")
    for rank, piece in enumerate(tensor.slices):
        if piece.rank != rank:
            f.fail(f"{path}.slices[{rank}].rank", f"expected {rank}, got {piece.rank}")
    try:
        layout = tensor_layout(tensor.name, tensor.dtype, tensor.shape, tensor.style, tp)
    except (PlanError, ShardabilityError) as exc:
        f.fail(path, str(exc))
    if tensor.placement != layout.placement:
        f.fail(
            f"{path}.placement",
            f"{shown(tensor.placement.to_json())} but style {tensor.style!r} places a {len(tensor.shape)}-d tensor "
            f"as {shown(layout.placement.to_json())}",
        )
    for rank, piece in enumerate(tensor.slices):
        ranges = [tuple(r) for r in piece.ranges]
        if ranges != list(layout.ranges[rank]):
            f.fail(
                f"{path}.slices[{rank}].ranges",
                f"{shown(piece.ranges)}, but {tensor.name!r} {list(tensor.shape)} at tp={tp} gives rank {rank} "
                f"{shown(layout.ranges[rank])}",
            )
        if tuple(piece.shape) != layout.local_shapes[rank]:
            f.fail(
                f"{path}.slices[{rank}].shape",
                f"{shown(piece.shape)}, but the layout gives {shown(layout.local_shapes[rank])}",
            )


def _check_interleaved(f: Fields, manifest: Manifest) -> None:
    """An interleaved tensor's blocks must be the rows of its dim each rank holds (the whole dim when its placement
    cuts another dim or none): transformers de-interleaves each rank's slice."""
    tensors = {t.name: t for t in manifest.tensors}
    for name, record in sorted((manifest.options.interleaved or {}).items()):
        tensor = tensors[name]  # Transforms.problem has checked that it exists
        placement = tensor.placement
        if placement.is_sharded and placement.mesh == "tp" and placement.dim == record.dim:
            expected = tuple(sum(b - a for a, b in piece.ranges) for piece in tensor.slices)
        else:
            expected = (tensor.shape[record.dim],)
        if record.blocks != expected:
            f.fail(f"options.interleaved.{name}.blocks", f"{list(record.blocks)}, but the ranks hold {list(expected)}")
