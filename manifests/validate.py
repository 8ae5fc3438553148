"""The one validator every manifest reader goes through (``Manifest.from_json``).

A manifest is trusted by the runtime and every command, so nothing in it is taken on faith: each JSON value is
type-checked (a ``bool`` is not an ``int``), sizes are bounded before anything is allocated, every structural field
(placement, per-rank ranges and local shapes) is re-derived from ``layout`` and compared, and the whole document
must match its own ``manifest_xxh3`` digest, so an edit that keeps the structure consistent is caught too. Errors
are ``ManifestError`` naming the file and the JSON field path: ``manifest.json: tensors[3].slices[1].ranges[0]:
expected [int, int], got "x"``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from reshard.manifests.errors import ManifestError, PlanError, shown
from reshard.manifests.layout import STYLES, tensor_layout
from reshard.manifests.manifest import (
    DIGEST_FIELD,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Placement,
    RankSlice,
    SourceInfo,
    TensorEntry,
    check_relative_path,
    manifest_digest,
    resolve_in,
)
from reshard.manifests.safetensors import ITEMSIZES
from reshard.manifests.transforms import Transforms

MAX_RANKS = 65536  # tp (and world size) bound, checked before any per-rank list is built
MAX_BYTES = 2**62  # any file or tensor size
MAX_NDIM = 16
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ARTIFACT_ID = re.compile(r"[0-9A-Za-z._-]{1,128}")
_KINDS = ("shard", "strided_shard", "replicate", "plain")
T = TypeVar("T")


class _Fields:
    """Typed access to raw JSON values that raises ``ManifestError`` with ``origin: path: what``."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, path: str, message: str) -> NoReturn:
        raise ManifestError(f"{self.origin}: {path}: {message}")

    def expected(self, path: str, what: str, value: Any) -> NoReturn:
        self.fail(path, f"expected {what}, got {shown(value)}")

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.expected(path, "an object", value)
        return value

    def req(self, data: dict[str, Any], key: str, path: str) -> Any:
        if key not in data:
            self.fail(_join(path, key), "missing (malformed manifest)")
        return data[key]

    def array(self, value: Any, path: str, limit: int | None = None) -> list[Any]:
        if not isinstance(value, list):
            self.expected(path, "a list", value)
        if limit is not None and len(value) > limit:
            self.fail(path, f"{len(value)} items, at most {limit} allowed")
        return value

    def integer(self, value: Any, path: str, low: int = 0, high: int = MAX_BYTES) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.expected(path, "an integer", value)
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range [{low}, {high}]")
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str):
            self.expected(path, "a string", value)
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"{shown(value)} does not match {pattern.pattern}")
        return value

    def opt(self, value: Any, path: str, check: Callable[[Any, str], T]) -> T | None:
        return None if value is None else check(value, path)

    def str_map(self, value: Any, path: str) -> dict[str, str]:
        data = self.obj(value, path)
        for key, item in data.items():
            self.string(item, _join(path, key))
        return dict(data)


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
    f = _Fields(origin)
    manifest = _manifest(f, data)
    check_manifest(manifest, origin)
    for entry in manifest.files if root is not None else []:
        resolve_in(root, entry.path, origin)
    digest = f.string(f.req(data, DIGEST_FIELD, ""), DIGEST_FIELD, _HEX32)
    if manifest_digest(data) != digest:
        raise ManifestError(f"{origin}: content does not match its digest ({DIGEST_FIELD}); the manifest was edited")
    return manifest


def check_manifest(manifest: Manifest, origin: str = MANIFEST_NAME) -> None:
    """Structural checks of a typed manifest: mesh, files, and every tensor's placement, ranges and local shapes
    re-derived from ``layout`` (the single source of truth), in the order the rank files hold them."""
    f = _Fields(origin)
    if set(manifest.mesh) != {"tp"}:
        f.fail("mesh", f'expected {{"tp": N}}, got {shown(manifest.mesh)}; this reshard reads tp meshes only')
    tp = manifest.tp
    if manifest.expert_mesh is not None and manifest.expert_mesh != {"ep": tp}:
        f.fail("expert_mesh", f'expected null or {{"ep": {tp}}} (ep equals tp), got {shown(manifest.expert_mesh)}')
    for rule, style in (manifest.plan_overrides or {}).items():
        if manifest.plan.get(rule) != style and not (manifest.ep_plan and rule not in manifest.plan):
            f.fail(f"plan_overrides.{rule}", f"{shown(style)}, but the plan gives {shown(manifest.plan.get(rule))}")
    _check_files(f, manifest)
    names: set[str] = set()
    rank_bytes = [0] * tp
    for index, tensor in enumerate(manifest.tensors):
        path = f"tensors[{index}]"
        if tensor.name in names:
            f.fail(f"{path}.name", f"tensor {tensor.name!r} is listed twice")
        names.add(tensor.name)
        _check_tensor(f, tensor, tp, path)
        itemsize = ITEMSIZES[tensor.dtype]
        for piece in tensor.slices:
            rank_bytes[piece.rank] += math.prod(piece.shape) * itemsize
    if problem := manifest.options.problem({t.name: (t.dtype, t.shape) for t in manifest.tensors}):
        f.fail(*problem)
    keys = [(-ITEMSIZES[t.dtype], t.name) for t in manifest.tensors]
    if keys != sorted(keys):
        f.fail("tensors", "not in rank-file order (widest dtype first, then by name)")
    for entry in manifest.files:
        if entry.rank is not None and entry.size < 8 + rank_bytes[entry.rank]:
            f.fail(
                f"files[{manifest.files.index(entry)}].size",
                f"{entry.size} bytes cannot hold rank {entry.rank}'s {rank_bytes[entry.rank]} bytes of tensors",
            )


def _check_files(f: _Fields, manifest: Manifest) -> None:
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


def _check_path(f: _Fields, value: str, path: str) -> None:
    if not value or value == MANIFEST_NAME or any(part in ("", ".", "..") for part in value.split("/")):
        check_relative_path(value, f.origin)  # the clearer message for paths that leave the folder
        f.fail(path, f"{shown(value)} is not a file path inside the artifact")
    check_relative_path(value, f.origin)


def _check_tensor(f: _Fields, tensor: TensorEntry, tp: int, path: str) -> None:
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
    except PlanError as exc:
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


def _manifest(f: _Fields, data: dict[str, Any]) -> Manifest:
    """The typed manifest of raw JSON: every field's type and bounds, sizes before any per-rank list is built."""
    mesh = f.obj(f.req(data, "mesh", ""), "mesh")
    mesh_sizes = {key: f.integer(value, f"mesh.{key}", 1, MAX_RANKS) for key, value in mesh.items()}
    if math.prod(mesh_sizes.values()) > MAX_RANKS:
        f.fail("mesh", f"world size {math.prod(mesh_sizes.values())} exceeds {MAX_RANKS}")
    expert_mesh = data.get("expert_mesh")
    if expert_mesh is not None:
        expert_mesh = {
            key: f.integer(value, f"expert_mesh.{key}", 1, MAX_RANKS)
            for key, value in f.obj(expert_mesh, "expert_mesh").items()
        }
    files = [_file(f, item, f"files[{i}]") for i, item in enumerate(f.array(f.req(data, "files", ""), "files"))]
    tensors = [
        _tensor(f, item, f"tensors[{i}]") for i, item in enumerate(f.array(f.req(data, "tensors", ""), "tensors"))
    ]
    lineage = data.get("lineage")
    return Manifest(
        tool_version=f.string(f.req(data, "tool_version", ""), "tool_version"),
        model_type=f.opt(data.get("model_type"), "model_type", f.string),
        architecture=f.opt(data.get("architecture"), "architecture", f.string),
        mesh=mesh_sizes,
        plan=f.str_map(f.req(data, "plan", ""), "plan"),
        source=_source(f, f.req(data, "source", ""), "source"),
        tensors=tensors,
        files=files,
        options=Transforms.from_json(data.get("options"), f.origin),
        lineage=f.obj(lineage, "lineage") if lineage is not None else None,
        expert_mesh=expert_mesh,
        ep_plan=f.str_map(data.get("ep_plan") or {}, "ep_plan"),
        plan_overrides=f.opt(data.get("plan_overrides"), "plan_overrides", f.str_map),
        artifact=f.string(f.req(data, "artifact", ""), "artifact", _ARTIFACT_ID),
    )


def _source(f: _Fields, value: Any, path: str) -> SourceInfo:
    data = f.obj(value, path)
    extra: dict[str, Any] = {}
    if "skipped" in data:  # optional; written only by reshards that skip source files
        extra["skipped"] = [
            f.string(item, f"{path}.skipped[{i}]") for i, item in enumerate(f.array(data["skipped"], f"{path}.skipped"))
        ]
    items = f.array(data.get("files", []), f"{path}.files")
    try:
        return SourceInfo(
            repo_id=f.opt(data.get("repo_id"), f"{path}.repo_id", f.string),
            revision=f.opt(data.get("revision"), f"{path}.revision", f.string),
            commit=f.opt(data.get("commit"), f"{path}.commit", f.string),
            files=[_file(f, item, f"{path}.files[{i}]") for i, item in enumerate(items)],
            **extra,
        )
    except TypeError as exc:  # a field this SourceInfo does not have
        f.fail(path, f"unknown field ({exc})")


def _file(f: _Fields, value: Any, path: str) -> FileEntry:
    data = f.obj(value, path)
    return FileEntry(
        path=f.string(f.req(data, "path", path), f"{path}.path"),
        size=f.integer(f.req(data, "size", path), f"{path}.size"),
        xxh3=f.string(f.req(data, "xxh3", path), f"{path}.xxh3", _HEX32),
        rank=f.opt(data.get("rank"), f"{path}.rank", lambda v, p: f.integer(v, p, 0, MAX_RANKS - 1)),
    )


def _shape(f: _Fields, value: Any, path: str) -> tuple[int, ...]:
    return tuple(f.integer(d, f"{path}[{i}]") for i, d in enumerate(f.array(value, path, MAX_NDIM)))


def _tensor(f: _Fields, value: Any, path: str) -> TensorEntry:
    data = f.obj(value, path)
    dtype = f.string(f.req(data, "dtype", path), f"{path}.dtype")
    if dtype not in ITEMSIZES:
        f.fail(f"{path}.dtype", f"unknown dtype {dtype!r}; known: {sorted(ITEMSIZES)}")
    shape = _shape(f, f.req(data, "shape", path), f"{path}.shape")
    if math.prod(shape) * ITEMSIZES[dtype] > MAX_BYTES:
        f.fail(f"{path}.shape", f"{list(shape)} of {dtype} exceeds {MAX_BYTES} bytes")
    slices = f.array(f.req(data, "slices", path), f"{path}.slices", MAX_RANKS)
    return TensorEntry(
        name=f.string(f.req(data, "name", path), f"{path}.name"),
        dtype=dtype,
        shape=shape,
        style=f.opt(f.req(data, "style", path), f"{path}.style", f.string),
        placement=_placement(f, f.req(data, "placement", path), f"{path}.placement"),
        slices=[_slice(f, item, f"{path}.slices[{i}]") for i, item in enumerate(slices)],
    )


def _placement(f: _Fields, value: Any, path: str) -> Placement:
    data = f.obj(value, path)
    if unknown := sorted(set(data) - {"kind", "dim", "split_factor", "mesh"}):
        f.fail(f"{path}.{unknown[0]}", "unknown field")
    kind = f.string(f.req(data, "kind", path), f"{path}.kind")
    if kind not in _KINDS:
        f.expected(f"{path}.kind", " or ".join(_KINDS), kind)
    mesh = f.string(data.get("mesh", "tp"), f"{path}.mesh")
    if mesh not in ("tp", "ep"):
        f.expected(f"{path}.mesh", '"tp" or "ep"', mesh)
    return Placement(
        kind,
        f.opt(data.get("dim"), f"{path}.dim", lambda v, p: f.integer(v, p, 0, MAX_NDIM - 1)),
        f.opt(data.get("split_factor"), f"{path}.split_factor", lambda v, p: f.integer(v, p, 1, MAX_RANKS)),
        mesh,
    )


def _slice(f: _Fields, value: Any, path: str) -> RankSlice:
    data = f.obj(value, path)
    ranges = []
    for i, item in enumerate(f.array(f.req(data, "ranges", path), f"{path}.ranges", 64)):
        where = f"{path}.ranges[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            f.expected(where, "[int, int]", item)
        ranges.append((f.integer(item[0], where), f.integer(item[1], where)))
    return RankSlice(
        rank=f.integer(f.req(data, "rank", path), f"{path}.rank", 0, MAX_RANKS - 1),
        ranges=ranges,
        shape=_shape(f, f.req(data, "shape", path), f"{path}.shape"),
        xxh3=f.string(f.req(data, "xxh3", path), f"{path}.xxh3", _HEX32),
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
