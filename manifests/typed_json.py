"""A manifest's raw JSON as typed dataclasses: every value's type and bounds checked before it is used.

The first half of the validator (``validate`` re-derives the structure from the typed result): a ``bool`` is not an
``int``, sizes are bounded before any per-rank list is built, and every error is a ``ManifestError`` naming the file
and the JSON field path, e.g. ``manifest.json: tensors[3].slices[1].ranges[0]: expected [int, int], got "x"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from reshard.manifests.dtypes import DTYPES
from reshard.manifests.errors import ManifestError, shown
from reshard.manifests.load_report import parse_load_report
from reshard.manifests.manifest import FileEntry, Manifest, Placement, RankSlice, SourceInfo, TensorEntry
from reshard.manifests.pipeline import Pipeline
from reshard.manifests.transforms import Transforms

MAX_RANKS = 65536  # tp (and world size) bound, checked before any per-rank list is built
MAX_BYTES = 2**62  # any file or tensor size
MAX_NDIM = 16
HEX32 = re.compile(r"[0-9a-f]{32}")
_ARTIFACT_ID = re.compile(r"[0-9A-Za-z._-]{1,128}")
_KINDS = ("shard", "strided_shard", "replicate", "plain")
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_LAYERS = 1 << 20
T = TypeVar("T")


class Fields:
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

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.expected(path, "true or false", value)
        return value

    def opt(self, value: Any, path: str, check: Callable[[Any, str], T]) -> T | None:
        return None if value is None else check(value, path)

    def str_map(self, value: Any, path: str) -> dict[str, str]:
        data = self.obj(value, path)
        for key, item in data.items():
            self.string(item, _join(path, key))
        return dict(data)


def typed_manifest(f: Fields, data: dict[str, Any]) -> Manifest:
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
    pipeline = data.get("pipeline")
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
        pipeline=_pipeline(f, pipeline, mesh_sizes.get("pp", 1)) if pipeline is not None else None,
        transformers_version=f.opt(
            data.get("transformers_version"), "transformers_version", lambda v, p: _transformers_version(f, v, p)
        ),
        load_report=parse_load_report(f, data.get("load_report")),
    )


def _transformers_version(f: Fields, value: Any, path: str) -> str:
    """A release number whose built-in plans this reshard has: an artifact following another release's plans may be
    another model, and nothing here could tell."""
    from reshard.manifests.plans import VERSION_PATTERN, plan_sets

    version = f.string(value, path, VERSION_PATTERN)
    known = plan_sets().versions
    if not plan_sets().known(version):
        f.fail(
            path,
            f"transformers {version}: this reshard has the built-in plans of transformers {', '.join(known)} only; "
            "use a reshard that knows it",
        )
    return version


def _pipeline(f: Fields, value: Any, stages: int) -> Pipeline:
    data = f.obj(value, "pipeline")
    if unknown := sorted(set(data) - {"layers", "prefix", "tied"}):
        f.fail(f"pipeline.{unknown[0]}", "unknown field")
    return Pipeline(
        stages,
        f.integer(f.req(data, "layers", "pipeline"), "pipeline.layers", 1, MAX_LAYERS),
        f.string(f.req(data, "prefix", "pipeline"), "pipeline.prefix", _PREFIX),
        f.boolean(f.req(data, "tied", "pipeline"), "pipeline.tied"),
    )


def _source(f: Fields, value: Any, path: str) -> SourceInfo:
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


def _file(f: Fields, value: Any, path: str) -> FileEntry:
    data = f.obj(value, path)
    return FileEntry(
        path=f.string(f.req(data, "path", path), f"{path}.path"),
        size=f.integer(f.req(data, "size", path), f"{path}.size"),
        xxh3=f.string(f.req(data, "xxh3", path), f"{path}.xxh3", HEX32),
        rank=f.opt(data.get("rank"), f"{path}.rank", lambda v, p: f.integer(v, p, 0, MAX_RANKS - 1)),
    )


def _shape(f: Fields, value: Any, path: str) -> tuple[int, ...]:
    return tuple(f.integer(d, f"{path}[{i}]") for i, d in enumerate(f.array(value, path, MAX_NDIM)))


def _tensor(f: Fields, value: Any, path: str) -> TensorEntry:
    data = f.obj(value, path)
    dtype = f.string(f.req(data, "dtype", path), f"{path}.dtype")
    if dtype not in DTYPES:
        f.fail(f"{path}.dtype", f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    shape = _shape(f, f.req(data, "shape", path), f"{path}.shape")
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8:
        f.fail(f"{path}.shape", f"{list(shape)} of {dtype} is {bits} bits, not a whole number of bytes")
    if bits // 8 > MAX_BYTES:
        f.fail(f"{path}.shape", f"{list(shape)} of {dtype} exceeds {MAX_BYTES} bytes")
    slices = f.array(f.req(data, "slices", path), f"{path}.slices", MAX_RANKS)
    stages = data.get("stages")
    if stages is not None:
        items = f.array(stages, f"{path}.stages", MAX_RANKS)
        stages = tuple(f.integer(item, f"{path}.stages[{i}]", 0, MAX_RANKS - 1) for i, item in enumerate(items))
    return TensorEntry(
        name=f.string(f.req(data, "name", path), f"{path}.name"),
        dtype=dtype,
        shape=shape,
        style=f.opt(f.req(data, "style", path), f"{path}.style", f.string),
        placement=_placement(f, f.req(data, "placement", path), f"{path}.placement"),
        slices=[_slice(f, item, f"{path}.slices[{i}]") for i, item in enumerate(slices)],
        stages=stages,
    )


def _placement(f: Fields, value: Any, path: str) -> Placement:
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


def _slice(f: Fields, value: Any, path: str) -> RankSlice:
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
        xxh3=f.string(f.req(data, "xxh3", path), f"{path}.xxh3", HEX32),
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
