"""``load_state_dict``: an artifact's manifest and this rank's file, as the DTensors transformers would build.

Plan, then execute: resolve the mesh, read the manifest, check the mesh and dtype against it, map this rank's file,
and wrap each planned tensor with ``DTensor.from_local(local, tp_mesh, placement, shape=global, stride=global,
run_check=False)``, exactly as transformers' loader does after slicing. Unplanned tensors stay plain. In an
expert-parallel artifact the experts' tensors (placement mesh ``ep``) go on the ``ep`` mesh over the same ranks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement as TorchPlacement
from torch.distributed.tensor.placement_types import _StridedShard

from reshard.loaders.consensus import agreed, same_on_every_rank
from reshard.loaders.fetch import is_remote
from reshard.loaders.mesh import (
    EP,
    as_device,
    check_expert_mesh,
    check_mesh,
    check_no_stages,
    default_device,
    ep_submesh,
    pp_submesh,
    resolve_mesh,
    stage_mesh,
    tp_submesh,
)
from reshard.loaders.options import LoadOptions
from reshard.loaders.rank_file import RankFile
from reshard.loaders.rank_share import read_rank
from reshard.loaders.tensors import torch_dtype
from reshard.manifests import MANIFEST_NAME, Manifest, Placement, TensorEntry
from reshard.manifests.dtypes import DTYPES
from reshard.manifests.errors import ManifestError, ReshardError
from reshard.manifests.hashing import hash_bytes

logger = logging.getLogger(__name__)

DtypeArg = torch.dtype | str | None
DeviceArg = torch.device | str | int | None


@dataclass(frozen=True)
class LoadedArtifact:
    """What a load produced: the manifest, the mesh it ran on (``None`` in a plain single process), and tensors.

    ``ep_mesh`` is the 1-D ``ep`` mesh the experts of an expert-parallel artifact live on (else ``None``).
    """

    root: Path
    manifest: Manifest
    mesh: DeviceMesh | None
    device: torch.device
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    ep_mesh: DeviceMesh | None = None
    tp: int = 1  # the tp the tensors are cut for: the manifest's, or the mesh's when loaded at another world size
    rank_file: RankFile | None = None  # with populate, paged in in the background: ``wait_resident`` before use
    auto_dtype: bool = False  # dtype "auto" (or None) was asked: load_model builds in config.json's, as transformers

    def wait_resident(self) -> None:
        """Return once this rank's mapped weights are resident if they are being populated (at once otherwise)."""
        if self.rank_file is not None:
            self.rank_file.wait_resident()

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The mesh's 1-D ``tp`` part, on which the DTensors live; ``None`` when nothing is sharded (tp=1)."""
        return _sharding_mesh(self.mesh, self.tp)

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        """The mesh's 1-D ``pp`` part for an artifact with pipeline stages, else ``None``."""
        return pp_submesh(self.mesh) if self.manifest.pp > 1 else None


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    device_mesh: DeviceMesh | None = None,
    device: DeviceArg = None,
    dtype: DtypeArg = "auto",
    verify: bool = False,
    populate: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> dict[str, torch.Tensor]:
    """Map this rank's file of a reshard artifact into the tensors of a tensor-parallel state dict.

    Args:
        path: the artifact: a folder (``manifest.json`` and one ``rank-*.safetensors`` per rank),
            ``hf://ORG/NAME[@REVISION]`` or a bucket URL (``s3://``, ``gs://``, ...), of which this rank fetches the
            manifest, the small files and its own rank file only.
        device_mesh, device, dtype, verify, populate, revision, cache_dir, token: see ``LoadOptions`` (default
            mesh: a ``("tp",)`` mesh over the torchrun world; tensors as stored, verified by size and header).

    Returns:
        ``{name: tensor}`` under transformers' parameter names: a ``DTensor`` on the tp mesh for every planned
        tensor (``Shard``, ``_StridedShard`` or ``Replicate``; experts of an expert-parallel artifact ``Shard(0)`` on
        the ``ep`` mesh), a plain tensor (full on every rank) otherwise. A tied
        ``lm_head.weight`` is absent, as in the checkpoint. At tp=1 every tensor is plain, as in transformers.

    Example:
        >>> mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))  # doctest: +SKIP
        >>> state = load_state_dict("./SmolLM2-1.7B-tp2", device_mesh=mesh)  # doctest: +SKIP
        >>> state["model.layers.0.self_attn.q_proj.weight"].placements  # doctest: +SKIP
        (Shard(dim=0),)
    """
    options = LoadOptions(
        device_mesh=device_mesh,
        device=device,
        dtype=dtype,
        verify=verify,
        populate=populate,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    )
    artifact = open_artifact(path, options)
    artifact.wait_resident()
    if options.auto_dtype:  # as stored, every tensor a view of the mapped file
        return artifact.tensors
    return {name: cast_floating(value, artifact.dtype) for name, value in artifact.tensors.items()}


def open_artifact(path: str | os.PathLike[str], options: LoadOptions | None = None) -> LoadedArtifact:
    """Do the work of ``load_state_dict`` and keep what ``load_model`` needs besides the tensors: ``rank_tensors``
    for the rank the mesh gives (every rank raising alike if one fails), then the tensors as DTensors."""
    options = options or LoadOptions()
    wanted = as_device(options.device)
    device_mesh = options.device_mesh
    mesh = resolve_mesh(device_mesh, wanted)
    default = device_mesh is None  # the world as one tp dimension, reshaped below for pipeline stages
    remote = is_remote(path)

    def choose(manifest: Manifest, origin: str) -> tuple[int, int]:
        tp = manifest.tp if manifest.pp > 1 else tp_submesh(mesh).size() if mesh is not None else 1
        if mesh is not None and tp != manifest.tp and not remote:  # at another world size: cut anew
            check_no_stages(mesh, origin)
            check_expert_mesh(manifest, origin)
            return tp_submesh(mesh).get_local_rank(), tp
        return check_mesh(manifest, mesh, origin, default=default), manifest.tp

    with agreed(mesh):  # a rank whose manifest or file is bad makes every rank raise; no collective inside
        target = wanted or default_device(mesh)
        read = read_rank(path, choose, options, target)
        root, manifest, tp = read.root, read.manifest, read.tp
        main_dtype = check_dtype(manifest, options.dtype, str(root / MANIFEST_NAME))
        ep_mesh = None  # an expert mesh the caller's mesh does not fit is refused here, on every rank alike
        if mesh is not None and manifest.ep_plan and (tp_mesh := _sharding_mesh(mesh, tp)) is not None:
            ep_mesh = ep_submesh(mesh, tp_mesh)  # expert-parallel artifacts have no pipeline stages: the final mesh
    # every rank must have read the same manifest (it is the only thing ranks do not exchange) before any tensor
    # is returned: outside the agreed block, since this is a collective
    same_on_every_rank(mesh, manifest_digest_of(manifest), "manifest_xxh3", str(root / MANIFEST_NAME))
    if manifest.pp > 1 and default and mesh is not None:  # the agreed manifest's (pp, tp): a collective
        mesh = stage_mesh(mesh, manifest)
    tp_mesh = _sharding_mesh(mesh, tp)
    tensors = {
        name: to_global(read.tensors[name], entry, ep_mesh if entry.placement.mesh == EP else tp_mesh)
        for name, entry in read.entries.items()
    }
    auto = options.auto_dtype
    return LoadedArtifact(root, manifest, mesh, target, main_dtype, tensors, ep_mesh, tp, read.rank_file, auto)


def manifest_digest_of(manifest: Manifest) -> str:
    """The digest of the manifest as this rank parsed it (its canonical JSON, digest field included)."""
    return hash_bytes(manifest.to_json().encode())


def _sharding_mesh(mesh: DeviceMesh | None, tp: int) -> DeviceMesh | None:
    """At tp=1 nothing is a DTensor (transformers applies no TP plan then); else the mesh's tp part."""
    return tp_submesh(mesh) if mesh is not None and tp > 1 else None


def to_global(local: torch.Tensor, entry: TensorEntry, mesh: DeviceMesh | None) -> torch.Tensor:
    """Wrap one rank's slice as the DTensor its placement describes, on ``mesh`` (the tp mesh, or the ep mesh for
    a placement on ``ep``); plain tensors (and everything at tp=1) as is."""
    if mesh is None or entry.placement.kind == "plain":
        return local
    return DTensor.from_local(
        local,
        mesh,
        [torch_placement(entry.placement, entry.name)],
        run_check=False,
        shape=torch.Size(entry.shape),
        stride=contiguous_stride(entry.shape),
    )


def torch_placement(placement: Placement, name: str) -> TorchPlacement:
    """The DTensor placement a manifest placement stands for."""
    if placement.kind == "shard" and placement.dim is not None:
        return Shard(placement.dim)
    if placement.kind == "strided_shard" and placement.dim is not None and placement.split_factor:
        return _StridedShard(placement.dim, split_factor=placement.split_factor)
    if placement.kind == "replicate":
        return Replicate()
    raise ManifestError(f"tensor {name!r}: unknown placement {placement.to_json()}")


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``: the global stride transformers gives ``from_local``."""
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def check_dtype(manifest: Manifest, dtype: DtypeArg, origin: str) -> torch.dtype:
    """The dtype to load in: the artifact's main floating dtype (most bytes) for ``"auto"``, else ``dtype``.

    Another floating dtype than the stored one is cast, as ``from_pretrained`` casts a checkpoint; the tensors are
    then copies, which defeats mapping the file, so it is said once, with how to keep the load zero-copy.
    """
    sizes: Counter[torch.dtype] = Counter()
    for tensor in manifest.tensors:
        if tensor.dtype not in DTYPES:
            raise ManifestError(f"{origin}: tensor {tensor.name!r} has unknown dtype {tensor.dtype!r}")
        if DTYPES[tensor.dtype].per_torch_element > 1:
            # its torch dtype holds element pairs: the manifest's shapes are not the DTensor's; refused, not guessed
            raise ReshardError(f"{origin}: tensor {tensor.name!r} is {tensor.dtype}, which the runtime cannot load yet")
        dtype_of_tensor = torch_dtype(tensor.dtype)
        if dtype_of_tensor.is_floating_point:
            sizes[dtype_of_tensor] += tensor.nbytes
    stored = sizes.most_common(1)[0][0] if sizes else torch.get_default_dtype()
    if dtype is None or dtype == "auto":
        return stored
    requested = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(requested, torch.dtype) or requested not in CASTABLE:
        names = ", ".join(str(d).removeprefix("torch.") for d in CASTABLE)
        raise ReshardError(f"dtype must be 'auto' or a floating dtype ({names}), got {dtype!r}")
    if sizes and requested != stored:
        name = str(requested).removeprefix("torch.")
        logger.warning(
            "%s: the artifact stores %s weights and dtype=%s casts them: the tensors are copies, not views of the "
            "mapped rank file; store the artifact in %s (reshard --dtype %s) to load it without copies",
            origin, stored, requested, name, name,
        )  # fmt: skip
    return requested


# The dtypes a model is built in, which dtype= may cast to and from (float8 is quantized data: never cast).
CASTABLE = tuple(torch_dtype(d.name) for d in DTYPES.values() if d.castable)


def cast_floating(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype`` if it is a floating tensor stored in another one (a copy), else itself."""
    return cast_tensor(value, dtype) if value.dtype in CASTABLE and value.dtype != dtype else value


def cast_tensor(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy in ``dtype`` (torch's ``.to``, as transformers casts); a DTensor is cast locally and keeps its
    placements, global shape and stride (no communication)."""
    if isinstance(value, DTensor):
        return DTensor.from_local(
            value.to_local().to(dtype),
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    return value.to(dtype)
