"""The device mesh a load runs on: the caller's own, or a 1-D ``tp`` mesh over the torchrun world.

Unlike transformers, which builds its own ``(pp, dp_replicate, fsdp, tp)`` mesh and ignores a ``device_mesh``
argument, the caller's mesh is honoured: a 1-D mesh is the tp mesh, an n-D mesh must name a ``tp`` dimension and
every replica along the other dimensions (``dp``) loads the same rank file.

Expert-parallel artifacts put whole experts on an ``ep`` mesh over the same ranks as the tp mesh (transformers
requires ``ep_size == tp_size`` without FSDP): the caller's mesh may provide it as a dimension named ``ep`` (e.g. a
``tp`` dimension flattened into ``ep``), otherwise it is the tp group itself, named ``("ep",)``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from reshard.manifests import Manifest
from reshard.manifests.errors import MeshError

TP = "tp"
EP = "ep"
PP = "pp"


def default_device_type() -> str:
    """The accelerator's device type if there is one (``cuda``), else ``cpu``: transformers' own choice."""
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None and accelerator.type != "mps":  # DTensor has no MPS mesh
            return accelerator.type
    return "cpu"


def resolve_mesh(device_mesh: DeviceMesh | None, device: torch.device | None = None) -> DeviceMesh | None:
    """The mesh to load on, or ``None`` for a plain single process (no torchrun, no process group).

    Without a mesh, a running process group (or torchrun's environment, in which case the group is initialised
    here: gloo on CPU, nccl on CUDA) gives a 1-D ``("tp",)`` mesh over the whole world.
    """
    if device_mesh is not None:
        tp_dim(device_mesh)
        if device is not None and device.type != device_mesh.device_type:
            raise MeshError(f"device {device} does not match the device mesh's device type {device_mesh.device_type!r}")
        return device_mesh
    if not dist.is_available():
        return None
    device_type = device.type if device is not None else default_device_type()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        _init_process_group(device_type)
    elif device is None and "nccl" not in str(dist.get_backend()):
        device_type = "cpu"  # the caller's group is gloo: keep the tensors where it can reduce them
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=(TP,))


def _init_process_group(device_type: str) -> None:
    """Initialise the default group from torchrun's environment, bound to this process's local device."""
    backend = dist.Backend.default_device_backend_map.get(device_type)
    device_id = None
    if device_type != "cpu":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.accelerator.set_device_index(index)
        device_id = torch.device(device_type, index) if backend == "nccl" else None
    dist.init_process_group(backend=backend, device_id=device_id)


def tp_dim(mesh: DeviceMesh) -> int:
    """Index of the mesh's ``tp`` dimension: the one named ``tp``, or the only one of an unnamed 1-D mesh."""
    names = mesh.mesh_dim_names
    if names is not None and TP in names:
        return names.index(TP)
    if mesh.ndim == 1 and names is None:
        return 0
    raise MeshError(
        f"device mesh {mesh} has no dimension named 'tp'; name the tensor-parallel dimension 'tp', "
        "e.g. init_device_mesh('cuda', (2, 4), mesh_dim_names=('dp', 'tp'))"
    )


def tp_submesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh over this rank's tp group, on which every DTensor of the model lives."""
    if mesh.ndim == 1:
        return mesh
    return mesh[TP]


def check_mesh(manifest: Manifest, mesh: DeviceMesh | None, origin: str, *, default: bool = False) -> int:
    """Check that ``mesh`` fits the artifact and return the rank file this process must open (its tp rank, or
    ``stage * tp + tp rank`` with pipeline stages). ``default``: ``mesh`` is the 1-D world mesh ``resolve_mesh``
    made, which a pipeline artifact reshapes to ``(pp, tp)`` (``stage_mesh``)."""
    if manifest.pp > 1:
        return _pipeline_rank(manifest, mesh, origin, default)
    check_no_stages(mesh, origin)
    check_expert_mesh(manifest, origin)
    if mesh is None:
        if manifest.tp != 1:
            raise MeshError(
                f"{origin}: the artifact was converted for tp={manifest.tp}, but this is a single process; launch "
                f"it with torchrun --nproc-per-node {manifest.tp}, or pass a device_mesh whose 'tp' dimension has "
                f"{manifest.tp} ranks"
            )
        return 0
    tp_mesh = tp_submesh(mesh)
    if tp_mesh.size() != manifest.tp:
        raise MeshError(
            f"{origin}: the artifact was converted for tp={manifest.tp}, but the device mesh's 'tp' dimension has "
            f"{tp_mesh.size()} ranks (mesh {mesh}); launch {manifest.tp} processes per replica, or convert again "
            f"with --tp {tp_mesh.size()}"
        )
    return tp_mesh.get_local_rank()


def _pipeline_rank(manifest: Manifest, mesh: DeviceMesh | None, origin: str, default: bool) -> int:
    """The rank file of this process in a pipeline artifact: ``stage * tp + tp rank``."""
    pp, tp = manifest.pp, manifest.tp
    launch = f"launch it with torchrun --nproc-per-node {pp * tp} (pp={pp} x tp={tp})"
    if mesh is None:
        raise MeshError(
            f"{origin}: the artifact has {pp} pipeline stages of tp={tp}, but this is a single process; {launch}"
        )
    if default:
        if mesh.size() != pp * tp:
            raise MeshError(
                f"{origin}: the artifact has {pp} pipeline stages of tp={tp} ({pp * tp} ranks), but the world has "
                f"{mesh.size()}; {launch}, or convert again with other --pp/--tp"
            )
        return mesh.get_local_rank()
    names = mesh.mesh_dim_names or ()
    if PP not in names or TP not in names:
        raise MeshError(
            f"{origin}: the artifact has {pp} pipeline stages: the device mesh needs dimensions named 'pp' and 'tp', "
            f"e.g. init_device_mesh('cuda', ({pp}, {tp}), mesh_dim_names=('pp', 'tp')); got {mesh}"
        )
    if (_size(mesh, PP), _size(mesh, TP)) != (pp, tp):
        raise MeshError(
            f"{origin}: the artifact has pp={pp} x tp={tp}, but the device mesh has pp={_size(mesh, PP)} x "
            f"tp={_size(mesh, TP)}; convert again with --pp {_size(mesh, PP)} --tp {_size(mesh, TP)}"
        )
    return mesh[PP].get_local_rank() * tp + mesh[TP].get_local_rank()


def check_no_stages(mesh: DeviceMesh | None, origin: str) -> None:
    """An artifact without pipeline stages loads on no mesh that has them."""
    if mesh is not None and _size(mesh, PP) > 1:
        raise MeshError(
            f"{origin}: the device mesh has {_size(mesh, PP)} pipeline stages, but the artifact has none; convert "
            f"it with --pp {_size(mesh, PP)}"
        )


def _size(mesh: DeviceMesh, name: str) -> int:
    names = mesh.mesh_dim_names or ()
    return mesh.size(names.index(name)) if name in names else 1


def stage_mesh(mesh: DeviceMesh, manifest: Manifest) -> DeviceMesh:
    """The ``(pp, tp)`` mesh over the world a pipeline artifact loads on by default: ranks row-major, stage by
    stage, as transformers' own ``(pp, ..., tp)`` mesh orders them. A collective (it creates the groups)."""
    return init_device_mesh(mesh.device_type, (manifest.pp, manifest.tp), mesh_dim_names=(PP, TP))


def pp_submesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The 1-D ``pp`` mesh of a pipeline load (``None`` without stages)."""
    if mesh is None or _size(mesh, PP) == 1:
        return None
    return mesh[PP]


def check_expert_mesh(manifest: Manifest, origin: str) -> None:
    """An expert mesh must be ``{"ep": tp}`` with an ``ep_plan``, and only then may tensors live on ``ep``."""
    expert_mesh = manifest.expert_mesh
    on_ep = sorted(t.name for t in manifest.tensors if t.placement.mesh == EP)
    if unknown := sorted({t.placement.mesh for t in manifest.tensors} - {TP, EP}):
        raise MeshError(f"{origin}: tensors are placed on unknown mesh dimension(s) {unknown}; expected 'tp' or 'ep'")
    if expert_mesh is None:
        if on_ep:
            raise MeshError(f"{origin}: tensor {on_ep[0]!r} is placed on the 'ep' mesh, but the manifest has none")
        return
    if set(expert_mesh) != {EP} or expert_mesh[EP] != manifest.tp or manifest.tp < 2 or not manifest.ep_plan:
        raise MeshError(
            f"{origin}: expert mesh {expert_mesh} with tp={manifest.tp} and ep_plan {manifest.ep_plan}: reshard loads "
            "expert-parallel artifacts with ep == tp > 1 and an ep_plan, and tensor-parallel artifacts only "
            "otherwise (convert again with --ep equal to --tp, or without --ep)"
        )


def ep_submesh(mesh: DeviceMesh, tp_mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D ``ep`` mesh the experts of an expert-parallel artifact live on, over the ranks of ``tp_mesh``.

    The caller's mesh's ``ep`` dimension if it has one (named, or flattened into it), which must span the same
    ranks as this rank's tp group; otherwise a mesh named ``("ep",)`` on the tp group's own process group (no new
    group, no collective). ``DistributedConfig(tp_size=N, ep_size=N)`` gives transformers a separate mesh over the
    same ranks: equal as a ``DeviceMesh`` for a 1-D world, and the same collectives on the same ranks.
    """
    try:
        ep_mesh = mesh[EP] if mesh.mesh_dim_names is not None else None
    except KeyError:
        ep_mesh = None
    if ep_mesh is None:
        return DeviceMesh.from_group(tp_mesh.get_group(), tp_mesh.device_type, mesh=tp_mesh.mesh, mesh_dim_names=(EP,))
    if ep_mesh.ndim != 1 or ep_mesh.mesh.tolist() != tp_mesh.mesh.tolist():
        raise MeshError(
            f"device mesh {mesh}: its 'ep' dimension spans ranks {ep_mesh.mesh.tolist()}, but this rank's 'tp' "
            f"group spans {tp_mesh.mesh.tolist()}; the artifact's experts live on the tp ranks (ep == tp, as in "
            "transformers without FSDP), so give 'ep' the tp ranks or leave it out"
        )
    return ep_mesh


def as_device(device: str | int | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``; a bare index means that accelerator (``0`` is ``cuda:0``)."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device(default_device_type(), device)
    return torch.device(device)


def default_device(mesh: DeviceMesh | None) -> torch.device:
    """The mesh's device type at this process's current index; CPU for a plain single process, as transformers."""
    device_type = mesh.device_type if mesh is not None else "cpu"
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.accelerator.current_device_index())
