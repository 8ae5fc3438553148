"""The reshard runtime: each rank maps only its own file of an artifact into DTensors.

``import reshard.loaders`` pulls in nothing but the format core (``reshard.manifests``); torch comes with
``load_state_dict`` and ``rank_tensors``, and transformers with ``load_model``, each the first time it is used
(module ``__getattr__``). Nothing here imports the offline stage.

- ``load_model(path, *, device_mesh=None, device=None, dtype="auto", ...)``: transformers' tensor-parallel model.
- ``load_state_dict(path, *, ...)``: the same tensors as a state dict of DTensors.
- ``rank_tensors(path, rank, *, ...)``: one rank's tensors as stored with their placement records, without a mesh
  or a process group (for another runtime's loader).
- ``LoadOptions``: the keyword options the loaders share, documented in one place.

Example (``torchrun --nproc-per-node 2 serve.py``):
    >>> from reshard.loaders import load_model, load_state_dict  # doctest: +SKIP
    >>> model = load_model("./SmolLM2-1.7B-tp2")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reshard.loaders.options import LoadOptions

if TYPE_CHECKING:
    from reshard.loaders.model import load_model
    from reshard.loaders.rank_share import RankTensors, rank_tensors
    from reshard.loaders.state_dict import load_state_dict

__all__ = ["LoadOptions", "RankTensors", "load_model", "load_state_dict", "rank_tensors"]


def __getattr__(name: str) -> Any:
    # Lazy: torch and transformers only when first used.
    if name == "load_model":
        from reshard.loaders.model import load_model

        return load_model
    if name == "load_state_dict":
        from reshard.loaders.state_dict import load_state_dict

        return load_state_dict
    if name in ("rank_tensors", "RankTensors"):
        from reshard.loaders import rank_share

        return getattr(rank_share, name)
    raise AttributeError(f"module 'reshard.loaders' has no attribute {name!r}")
