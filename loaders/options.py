"""The options of a load, in one record: ``load_model``, ``load_state_dict``, ``open_artifact`` and ``rank_tensors``
take the same ones, and the download gets its part of them (``revision``, ``cache_dir``, ``token``) unchanged.

The public functions spell the options out as keyword arguments (as huggingface_hub's do) and build this record at
once; everything below them takes the record, so an option is added here and in those signatures only (a test
checks that they agree). Importing it imports nothing heavy (torch's types are for type checking only).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class LoadOptions:
    """How to load an artifact (every field is a keyword argument of ``load_model`` and ``load_state_dict``).

    Args:
        device_mesh: a 1-D mesh, or an n-D mesh with a ``tp`` dimension (replicas along the others load the same
            file). Default: a ``("tp",)`` mesh over the torchrun world, initialising the process group if needed.
            For an expert-parallel artifact, an ``ep`` dimension over the tp ranks may be given too; by default the
            experts go on a ``("ep",)`` mesh over the tp group.
        device: where the tensors go (default: the mesh's device, CPU in a plain single process). On CPU they
            stay zero-copy views of the mapped file.
        dtype: ``"auto"``/``None`` (as stored; ``load_model`` builds its model in config.json's dtype instead, as
            ``from_pretrained(dtype="auto")`` does), or a floating dtype: floating tensors stored in another one are
            cast as ``from_pretrained(..., dtype=)`` casts them, and are then copies, not views of the mapped file
            (logged once; ``reshard --dtype`` stores the artifact in the dtype it will be loaded in).
        verify: check every tensor's xxh3-128 against the manifest while mapping.
        populate: on CPU, make every page of the rank file resident before returning (``MADV_POPULATE_READ``)
            instead of on first use. Off by default: it never made the weights usable sooner where measured
            (see docs/performance.md).
        revision: for an ``hf://ORG/NAME`` artifact, the branch, tag or commit to load (as ``hf://ORG/NAME@REV``;
            giving both, they must agree). Refused for a folder or a bucket, which hold one artifact only.
        cache_dir: where downloads go: the reshard cache root for buckets (default ``$RESHARD_CACHE``, else
            ``~/.cache/reshard``); for ``hf://``, also the Hub cache the files go to (``from_pretrained``'s
            ``cache_dir``; default ``HF_HUB_CACHE``). Unused for a local folder.
        token: the Hub token for ``hf://`` (``None``: the logged-in one; ``False``: none), as huggingface_hub takes
            it. Buckets take their credentials from their backend's own settings.
    """

    device_mesh: DeviceMesh | None = None
    device: torch.device | str | int | None = None
    dtype: torch.dtype | str | None = "auto"
    verify: bool = False
    populate: bool = False
    revision: str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    token: str | bool | None = None

    @property
    def auto_dtype(self) -> bool:
        """The tensors stay as stored (``dtype`` is ``"auto"`` or ``None``)."""
        return self.dtype is None or self.dtype == "auto"

    @property
    def fetch(self) -> dict[str, Any]:
        """The keyword arguments of ``fetch_artifact`` these options set."""
        return {"revision": self.revision, "cache_dir": self.cache_dir, "token": self.token}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names, in order: the keyword arguments the public loaders share."""
        return tuple(field.name for field in dataclasses.fields(cls))
