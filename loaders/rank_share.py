"""One rank's tensors of an artifact, as stored: fetch, validation and mapping, with no mesh and no process group.

The part of a load that needs no ``torch.distributed``: what another runtime (a serving engine's loader, which has
its own notion of ranks and of parallel layers) reuses. ``open_artifact`` runs the same code with the rank its mesh
gives, then wraps the tensors as DTensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reshard.loaders.fetch import fetch_artifact, folder_identity, is_remote, refetch_rank_file
from reshard.loaders.mesh import as_device, check_expert_mesh
from reshard.loaders.options import LoadOptions
from reshard.loaders.rank_file import RankFile, open_rank_file
from reshard.loaders.regrid import regrid_refusal, regrid_tensors
from reshard.manifests import MANIFEST_NAME, Manifest, Placement, TensorEntry, read_manifest
from reshard.manifests.errors import FileFormatError, IntegrityError, ManifestError, MeshError

# (rank, tp) to read, from the manifest and where it came from: the rank file at the artifact's own tp, or the tp
# rank at another tp (cut anew from the old rank files)
Choice = Callable[[Manifest, str], tuple[int, int]]


@dataclass(frozen=True)
class RankTensors:
    """One rank's local tensors as stored (plain ``torch.Tensor``s; on CPU views of the mapped rank file) and the
    manifest's record of each (``entries``: placement, global shape, dtype, style, every rank's slice).

    ``rank`` is the rank file read (``stage * tp + tp rank`` with pipeline stages) or, at another tp than the
    artifact's, the tp rank the slices were cut for; ``tp`` is the tp they are cut for.
    """

    root: Path
    manifest: Manifest
    rank: int
    tp: int
    tensors: dict[str, torch.Tensor]
    rank_file: RankFile | None = None  # with populate, paged in in the background: ``wait_resident`` before use
    entries: dict[str, TensorEntry] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", {entry.name: entry for entry in self.manifest.held_by(self.rank)})

    @property
    def placements(self) -> dict[str, Placement]:
        """Each tensor's placement (``shard``, ``strided_shard``, ``replicate`` or ``plain``, on ``tp`` or ``ep``)."""
        return {name: entry.placement for name, entry in self.entries.items()}

    def wait_resident(self) -> None:
        """Return once the mapped weights are resident if they are being populated (at once otherwise)."""
        if self.rank_file is not None:
            self.rank_file.wait_resident()


def rank_tensors(
    artifact: str | os.PathLike[str],
    rank: int,
    *,
    tp: int | None = None,
    device: torch.device | str | int | None = None,
    verify: bool = False,
    populate: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> RankTensors:
    """Rank ``rank``'s tensors of ``artifact``, fetched if remote, checked against the manifest and mapped: no
    DTensor, no process group, so any runtime can place them on its own ranks.

    Args:
        artifact: a local folder, ``hf://ORG/NAME[@REVISION]`` or a bucket URL (only this rank's files are fetched).
        rank: the rank file to read (``stage * tp + tp rank`` with pipeline stages); with ``tp``, the tp rank.
        tp: cut the slices for this tp instead of the artifact's (a local folder without pipeline stages; refused,
            listing the tp sizes that work, where heads or experts do not divide).
        device, verify, populate, revision, cache_dir, token: as for ``load_state_dict`` (see ``LoadOptions``).

    Example:
        >>> part = rank_tensors("./SmolLM2-1.7B-tp2", 1)  # doctest: +SKIP
        >>> part.placements["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
        Placement(kind='shard', dim=0, split_factor=None, mesh='tp')
    """
    options = LoadOptions(
        device=device, verify=verify, populate=populate, revision=revision, cache_dir=cache_dir, token=token
    )
    remote = is_remote(artifact)

    def choose(manifest: Manifest, origin: str) -> tuple[int, int]:
        if tp is None or tp == manifest.tp:
            manifest.rank_file(rank)  # a rank the artifact has no file for: ManifestError naming the world size
            return rank, manifest.tp
        if remote or manifest.pp > 1:
            where = "a bucket or the Hub" if remote else "pipeline stages"
            raise MeshError(f"{origin}: converted for tp={manifest.tp}; an artifact with {where} loads at that tp only")
        check_expert_mesh(manifest, origin)
        if not 0 <= rank < tp:
            raise MeshError(f"{origin}: rank {rank} is not a rank of tp={tp}")
        return rank, tp

    return read_rank(artifact, choose, options, as_device(device) or torch.device("cpu"))


def read_rank(
    artifact: str | os.PathLike[str], choose: Choice, options: LoadOptions, device: torch.device
) -> RankTensors:
    """Fetch (if remote) what the chosen rank needs, read and check the manifest, and map the rank's tensors.

    ``choose`` may raise (a mesh that does not fit): for a remote artifact it runs before the rank file is fetched.
    A cached rank file that fails its checks was verified when downloaded, so its bytes changed since: it is evicted
    and fetched once more.
    """
    origin = f"{artifact}/{MANIFEST_NAME}"
    root = fetch_artifact(artifact, lambda manifest: choose(manifest, origin)[0], **options.fetch)
    folder = folder_identity(root)  # checked again once this rank's file is mapped
    manifest = read_manifest(root)
    origin = str(root / MANIFEST_NAME)
    rank, tp = choose(manifest, origin)
    opened: RankFile | None = None
    if tp != manifest.tp:  # at another world size: cut anew
        if reason := regrid_refusal(root, manifest, tp):
            raise MeshError(f"{origin}: converted for tp={manifest.tp}, it cannot load at tp={tp}: {reason}")
        local = regrid_tensors(root, manifest, tp, rank, device=device, verify=options.verify)
    else:
        verify, populate = options.verify, options.populate
        try:
            opened = open_rank_file(root, manifest, rank, device=device, verify=verify, populate=populate)
        except (IntegrityError, FileFormatError):
            if not is_remote(artifact):
                raise
            root = refetch_rank_file(artifact, root, manifest, rank, **options.fetch)
            opened = open_rank_file(root, manifest, rank, device=device, verify=verify, populate=populate)
        local = opened.tensors
    if folder_identity(root) != folder:  # the rank file's header and its bytes could then be two conversions'
        raise ManifestError(f"{root}: replaced while loading (another process wrote the artifact); load it again")
    return RankTensors(root, manifest, rank, tp, local, opened)
