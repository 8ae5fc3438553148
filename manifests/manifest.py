"""The manifest: what an artifact holds, as typed dataclasses with JSON in and out.

An artifact is a folder with ``manifest.json`` and one safetensors file per rank (plus copied config and tokenizer
files). The manifest is written last, so a folder without one is incomplete by definition. Its JSON Schema is
``manifests/manifest.schema.json``; ``FORMAT_VERSION`` changes whenever a reader of the old version would misread
the new one.

Both the offline stage and the runtime import this module; it imports nothing of either.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reshard.manifests.dtypes import nbytes
from reshard.manifests.errors import ManifestError
from reshard.manifests.load_report import LoadReport
from reshard.manifests.pipeline import Pipeline
from reshard.manifests.transforms import Transforms

FORMAT_NAME = "reshard-tp"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DIGEST_FIELD = "manifest_xxh3"


@dataclass(frozen=True)
class Placement:
    """How a tensor is spread over the tp ranks, as a DTensor placement.

    ``kind`` is ``"shard"`` (torch.chunk along ``dim``), ``"strided_shard"`` (``_StridedShard``: ``dim`` cut into
    ``split_factor`` groups, each chunked; packed ``[gate; up]`` weights), ``"replicate"`` (a Replicate DTensor,
    e.g. a rowwise bias) or ``"plain"`` (not a DTensor at all: an unplanned tensor, full on every rank).
    ``mesh`` names the mesh the placement lives on: ``"tp"``, or ``"ep"`` for experts under expert parallelism.
    """

    kind: str
    dim: int | None = None
    split_factor: int | None = None
    mesh: str = "tp"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.dim is not None:
            out["dim"] = self.dim
        if self.split_factor is not None:
            out["split_factor"] = self.split_factor
        if self.mesh != "tp":
            out["mesh"] = self.mesh
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Placement:
        return cls(data["kind"], data.get("dim"), data.get("split_factor"), data.get("mesh", "tp"))

    @property
    def is_sharded(self) -> bool:
        return self.kind in ("shard", "strided_shard")


@dataclass(frozen=True)
class RankSlice:
    """One rank's piece of a tensor: ``ranges`` of the global tensor along the placement's dim, concatenated.

    A plain or replicated tensor has one range covering its whole first dim (or none for a scalar).
    ``xxh3`` is the xxh3-128 of the piece's bytes as stored in the rank file.
    """

    rank: int
    ranges: list[tuple[int, int]]
    shape: tuple[int, ...]
    xxh3: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the model: global shape and dtype, the plan style that placed it, and every rank's slice."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    style: str | None
    placement: Placement
    slices: list[RankSlice]
    stages: tuple[int, ...] | None = None  # the pipeline stages holding it (``None``: no pipeline stages)

    def slice_for(self, tp_rank: int) -> RankSlice:
        return self.slices[tp_rank]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return nbytes(self.dtype, self.shape)

    def slice_nbytes(self, tp_rank: int) -> int:
        """Bytes of tp rank ``tp_rank``'s slice, as its rank file stores it."""
        return nbytes(self.dtype, self.slices[tp_rank].shape)

    def on_stage(self, stage: int) -> bool:
        return self.stages is None or stage in self.stages

    def to_json(self, *, slices: bool = True) -> dict[str, Any]:
        """The tensor's JSON form; ``slices=False`` leaves out the per-rank slices (a summary)."""
        data: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "style": self.style,
            "placement": self.placement.to_json(),
        }
        if self.stages is not None:
            data["stages"] = list(self.stages)
        if slices:
            data["slices"] = [
                {"rank": s.rank, "ranges": [list(r) for r in s.ranges], "shape": list(s.shape), "xxh3": s.xxh3}
                for s in self.slices
            ]
        return data


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact (or of its source): relative path, size and xxh3-128; ``rank`` for rank files."""

    path: str
    size: int
    xxh3: str
    rank: int | None = None


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from: a Hub repo (id, revision, resolved commit) or a local folder, and its files."""

    repo_id: str | None
    revision: str | None
    commit: str | None
    files: list[FileEntry] = field(default_factory=list)
    # Source files deliberately left out of the artifact, each "NAME: REASON": what a reviewer should know is missing.
    skipped: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """Everything the runtime needs without the source checkpoint.

    ``mesh`` maps mesh dimension names to sizes in order (``{"tp": 8}``, or ``{"pp": 2, "tp": 4}`` with pipeline
    stages); the rank files are numbered in row-major order over it. With stages, ``pipeline`` records the split
    (``manifests.pipeline``), each tensor's ``stages`` the stages holding it, and a rank file holds only its stage's
    tensors (``held_by``). ``plan`` is the resolved tensor-parallel plan in transformers' own form (module
    names with ``*`` for layer numbers → style names), applied unchanged by the runtime. With expert parallelism,
    ``expert_mesh`` is ``{"ep": M}`` over the same ranks (M == tp: reshard does not shard experts with FSDP) and
    ``ep_plan`` holds transformers' expert-parallel rules, which take precedence over ``plan`` for the experts.
    ``plan_overrides`` are the rules of a custom plan as the user gave them (``None``: the model's own plan);
    ``plan`` is them merged into the model's own, as ``DistributedConfig(tp_plan=...)`` merges them.
    ``transformers_version`` is the transformers release whose built-in plan and load-time key conversions the
    artifact follows (``None`` in manifests written before the field, which all followed 5.23's); the runtime
    refuses the artifact under a release that would build another model from it. ``artifact`` identifies the
    conversion; every rank file's ``__metadata__["reshard.artifact"]`` repeats it, so a rank file from another
    conversion is refused at load. ``load_report`` (``manifests.load_report``) is the checkpoint compared with the
    model at conversion, and names the tensors kept out of the rank files. The JSON also carries ``manifest_xxh3``,
    the digest of everything else in it (``manifest_digest``), so any edit is refused on read.
    """

    tool_version: str
    model_type: str | None
    architecture: str | None
    mesh: dict[str, int]
    plan: dict[str, str]
    source: SourceInfo
    tensors: list[TensorEntry]
    files: list[FileEntry]
    options: Transforms = field(default_factory=Transforms)
    lineage: dict[str, Any] | None = None
    expert_mesh: dict[str, int] | None = None
    ep_plan: dict[str, str] = field(default_factory=dict)
    artifact: str = ""
    plan_overrides: dict[str, str] | None = None
    pipeline: Pipeline | None = None
    transformers_version: str | None = None
    load_report: LoadReport | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def tp(self) -> int:
        return self.mesh["tp"]

    @property
    def pp(self) -> int:
        return self.mesh.get("pp", 1)

    def stage_of(self, rank: int) -> int:
        """The pipeline stage of rank file ``rank`` (files are numbered row-major over ``(pp, tp)``)."""
        return rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        """The tp rank of rank file ``rank``: which of a tensor's ``slices`` it holds."""
        return rank % self.tp

    def held_by(self, rank: int) -> list[TensorEntry]:
        """The tensors rank file ``rank`` holds, in file order: all of them, or its pipeline stage's."""
        stage = self.stage_of(rank)
        return [tensor for tensor in self.tensors if tensor.on_stage(stage)]

    def holder(self, tensor: TensorEntry, tp_rank: int) -> int:
        """A rank file holding ``tensor``'s slice ``tp_rank``: on the first stage that holds the tensor."""
        return (tensor.stages[0] if tensor.stages else 0) * self.tp + tp_rank

    @property
    def world_size(self) -> int:
        size = 1
        for dim in self.mesh.values():
            size *= dim
        return size

    def rank_file(self, rank: int) -> FileEntry:
        for entry in self.files:
            if entry.rank == rank:
                return entry
        raise ManifestError(f"manifest has no file for rank {rank} (world size {self.world_size})")

    def to_json(self) -> str:
        """Serialise deterministically (sorted plan, fixed key order), ending with a newline.

        One line per top-level key, per file, per tensor and per plan rule: readable and greppable, and written by
        json's C encoder (an indented dump goes through its much slower pure-Python one)."""
        data: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "artifact": self.artifact,
            "tool_version": self.tool_version,
            **({"transformers_version": self.transformers_version} if self.transformers_version is not None else {}),
            "model_type": self.model_type,
            "architecture": self.architecture,
            "mesh": self.mesh,
            "plan": dict(sorted(self.plan.items())),
            "expert_mesh": self.expert_mesh,
            "ep_plan": dict(sorted(self.ep_plan.items())),
            "plan_overrides": dict(sorted(self.plan_overrides.items())) if self.plan_overrides is not None else None,
            "options": self.options.to_json(),
            "lineage": self.lineage,
            "source": asdict(self.source),
            "files": [asdict(f) for f in self.files],
            "tensors": [t.to_json() for t in self.tensors],
        }
        if self.pipeline is not None:  # only pipeline artifacts carry the field: others stay as they were
            data["pipeline"] = self.pipeline.to_json()
        if self.load_report is not None:  # absent from manifests written before reports existed
            data["load_report"] = self.load_report.to_json()
        data = {DIGEST_FIELD: manifest_digest(data), **data}
        return _one_item_per_line(data)

    @classmethod
    def from_json(
        cls, text: str | bytes, origin: str = MANIFEST_NAME, root: str | os.PathLike[str] | None = None
    ) -> Manifest:
        """Parse and validate (``validate.parse_manifest``); raise ``ManifestError`` naming ``origin`` and the field
        on anything a reader could misread, and on any edit since it was written. With ``root``, every file path
        must also stay inside that folder once symlinks are followed, and not name a folder."""
        from reshard.manifests.validate import parse_manifest  # validate builds on layout, which imports this module

        return parse_manifest(text, origin, root)

    def validate(self, origin: str = MANIFEST_NAME) -> None:
        """Check internal consistency (``validate.check_manifest``): mesh, files, and every tensor's re-derived
        placement, ranges and local shapes."""
        from reshard.manifests.validate import check_manifest

        check_manifest(self, origin)


def manifest_digest(data: dict[str, Any]) -> str:
    """xxh3-128 of a manifest's parsed JSON without its digest field, in canonical form (sorted keys, no spaces):
    the same for any formatting of the same content, different for any change of it."""
    from reshard.manifests.hashing import hash_bytes

    content = {key: value for key, value in data.items() if key != DIGEST_FIELD}
    return hash_bytes(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def check_relative_path(path: str, origin: str = MANIFEST_NAME) -> PurePosixPath:
    """Return ``path`` as a POSIX path if it stays inside the artifact; raise ``ManifestError`` otherwise."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or pure.is_absolute() or ".." in pure.parts or path.startswith("~"):
        raise ManifestError(f"{origin}: file path {path!r} leaves the artifact folder")
    return pure


def resolve_in(root: str | os.PathLike[str], path: str, origin: str = MANIFEST_NAME) -> Path:
    """Join a manifest path onto the artifact root, refusing anything that resolves outside it (symlinks too)."""
    root_path = Path(root).resolve()
    target = (root_path / check_relative_path(path, origin)).resolve()
    if root_path != target and root_path not in target.parents:
        raise ManifestError(f"{origin}: file path {path!r} resolves outside the artifact folder")
    if target.is_dir():
        raise ManifestError(f"{origin}: file path {path!r} names a folder, not a file")
    return target


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``root/manifest.json``, and check its file paths (and the ``config.json`` its records depend
    on) against the folder; a folder without one is not a (complete) artifact."""
    path = Path(root) / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{path}: no manifest; {root} is not a reshard artifact, or its conversion did not finish"
        ) from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    manifest = Manifest.from_json(text, origin=str(path), root=root)
    from reshard.manifests.validate import check_artifact_config

    check_artifact_config(manifest, root)  # the records that config.json must agree with
    return manifest


def rank_file_name(rank: int, world_size: int) -> str:
    """The rank file's name, e.g. ``rank-00003-of-00008.safetensors``."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _one_item_per_line(data: dict[str, Any]) -> str:
    """``data`` as JSON with each top-level key on its own line, and each item of a top-level list or dict too."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"  {json.dumps(item)}" for item in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        elif isinstance(value, dict) and value:
            items = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{items}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
